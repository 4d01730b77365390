"""README stays true: the settings table matches the declaration; CI runs README's test command."""

from __future__ import annotations

import json
import re
import subprocess

from tanglebox.settings import SETTINGS
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_settings_rows() -> dict[str, str]:
    table = README.split("<!-- settings-table:start -->")[1].split("<!-- settings-table:end -->")[0]
    rows = {}
    for line in table.splitlines():
        match = re.match(r"\| `(\w+)` \| `(.*?)` \|", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def test_every_setting_is_in_the_readme_table_with_its_default():
    rows = readme_settings_rows()
    assert list(rows) == [s.key for s in SETTINGS]
    for setting in SETTINGS:
        assert json.loads(rows[setting.key]) == setting.default, setting.key


def two_commands() -> list[str]:
    section = README.split("## Two commands\n")[1].split("\n## ")[0]
    return re.findall(r"```bash\n(.+?)\n```", section)[:2]


def test_ci_runs_exactly_the_readme_run_and_test_commands():
    run_command, test_command = two_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    extraction = next(line for line in ci.splitlines() if line.startswith("mapfile -t COMMANDS"))
    script = extraction + '\nprintf "%s\\n" "${COMMANDS[@]}"'
    printed = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.splitlines()
    assert printed[:2] == [run_command, test_command]
    assert 'setsid bash -c "$RUN_COMMAND"' in ci
    assert ci.strip().splitlines()[-1] == 'bash -c "$TEST_COMMAND"'
    assert 'python3 -m venv "$WORK/venv"' in ci and '. "$WORK/venv/bin/activate"' in ci


def test_the_readme_run_command_installs_then_starts_app_py():
    assert "python -m pip install -q -r requirements.txt && python app.py" in README
