"""``python app.py`` with something wrong: one line naming what to change, exit 2, no server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.live_server import free_port


def start(tmp_path, settings: dict | None, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "settings.json"
    if settings is not None:
        path.write_text(json.dumps(settings))
    return subprocess.run([sys.executable, str(ROOT / "app.py"), "--settings", str(path), *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


@pytest.mark.parametrize("settings, args, message", [
    ({"temperature": "warm"}, (), '"temperature" must be a number'),
    ({"colour": 1}, (), 'unknown setting "colour"'),
    ({"modelName": "missing.gguf"}, (), '"modelName" is missing.gguf, which does not exist'),
    ({"conversationTemplate": "alpaca"}, (), '"conversationTemplate" is "alpaca"'),
    ({"widgetModel": "other"}, (), '"widgetModel" is "other", which is not a model served'),
    ({}, ("--device", "tpu"), '"device" must be one of'),
    ({}, ("--model-path", "nowhere/model.gguf"), "does not exist"),
    ({"device": "cuda", "backend": "llama.cpp"}, (), "built without GPU support"),
])
def test_a_startup_mistake_is_one_line_and_exit_2(tmp_path, settings, args, message):
    result = start(tmp_path, settings, *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tanglebox: error: ") and message in lines[0]
    assert "Traceback" not in result.stderr


def test_a_text_file_as_model_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    result = start(tmp_path, {"modelName": "notes.txt"})
    assert result.returncode == 2 and "give a .gguf file" in result.stderr


def test_a_folder_without_config_is_refused(tmp_path):
    (tmp_path / "empty-model").mkdir()
    result = start(tmp_path, {"modelName": "empty-model"})
    assert result.returncode == 2 and "no config.json" in result.stderr


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    (tmp_path / "renamed.gguf").write_bytes(b"PK\x03\x04" + b"\0" * 64)
    result = start(tmp_path, {"modelName": "renamed.gguf"})
    assert result.returncode == 2 and "renamed.gguf, which is not a GGUF file" in result.stderr


def test_a_corrupt_gguf_fails_to_load_with_exit_2(tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03\0\0\0" + b"\xff" * 64)
    result = start(tmp_path, {"modelName": "broken.gguf", "port": free_port()})
    assert result.returncode == 2, result.stderr
    assert "tanglebox: error: " in result.stderr and "broken.gguf" in result.stderr
    assert "Traceback" not in result.stderr
