"""Run Tanglebox's commands as a user would, and read the one line a mistake must give."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINE = 400  # characters: an error stays one readable line, whatever caused it


def run_python(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """``python ARGS`` in ``folder``, with no TANGLEBOX_ variables from the test's environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANGLEBOX_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=120)


def run_app(folder: Path, settings_path: Path) -> subprocess.CompletedProcess:
    return run_python(folder, str(ROOT / "app.py"), "--settings", str(settings_path))


def one_error_line(result: subprocess.CompletedProcess, *expected: str) -> str:
    """The single ``tanglebox: error:`` line of a command that exited 2, holding ``expected``."""
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("tanglebox: error: ") and len(lines[0]) < MAX_LINE, lines[0]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]
