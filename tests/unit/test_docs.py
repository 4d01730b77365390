"""README stays true: the settings table matches the declaration; CI runs README's test command."""

from __future__ import annotations

import json
import re

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


def test_ci_runs_exactly_the_readme_test_command():
    commands = re.findall(r"```bash\n(.+?)\n```", README)
    test_command = next(c for c in commands if "pytest" in c)
    ci_lines = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci_lines[-1] == test_command


def test_the_readme_run_command_installs_then_starts_app_py():
    assert "python -m pip install -q -r requirements.txt && python app.py" in README
