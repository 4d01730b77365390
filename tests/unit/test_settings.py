"""settings.json: generated, filled in, checked; flags and environment variables override."""

from __future__ import annotations

import json

import pytest

from tanglebox.settings import SETTINGS, SettingsError, defaults, env_name, load_settings


def test_a_missing_file_is_written_with_every_default(tmp_path):
    path = tmp_path / "settings.json"
    settings = load_settings(path)
    assert json.loads(path.read_text()) == defaults()
    assert settings["port"] == 8080 and settings["conversationTemplate"] == "auto"


def test_missing_keys_are_filled_in_and_reported(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"port": 9000, "temperature": 0.2}))
    settings = load_settings(path)
    assert settings["port"] == 9000
    assert "maxNewTokens" in settings.filled_in and "port" not in settings.filled_in
    written = json.loads(path.read_text())
    assert written["port"] == 9000 and written["maxNewTokens"] == 512


def test_every_original_key_is_declared():
    original = {"conversationTemplate", "device", "enableApi", "enableModelDebugOutput",
                "enableWebLogOutput", "isApiTokensRequired", "maintenanceMode", "maxNewTokens",
                "modelName", "numberOfGpus", "port", "temperature", "use8BitCompression",
                "useSsl", "vRamGb"}
    assert original == {s.key for s in SETTINGS if s.original}


@pytest.mark.parametrize("values, message", [
    ({"port": "8080"}, '"port" must be a whole number'),
    ({"temperature": True}, '"temperature" must be a number'),
    ({"temperature": 3}, '"temperature" must be at most 2'),
    ({"maxNewTokens": 0}, '"maxNewTokens" must be at least 1'),
    ({"device": "tpu"}, '"device" must be one of cpu, cuda, mps, cpu-ggml'),
    ({"colour": "blue"}, 'unknown setting "colour"'),
    ({"Port": 1}, 'did you mean "port"'),
    ({"allowedOrigins": ["*"]}, '"allowedOrigins" entries must be origins'),
    ({"maxNewTokens": 5000}, '"maxNewTokens" (5000) is above "maxNewTokensLimit"'),
    ({"useSsl": True}, '"useSsl" needs "sslCertFile"'),
])
def test_a_wrong_value_names_the_key_and_the_file(tmp_path, values, message):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(values))
    with pytest.raises(SettingsError) as error:
        load_settings(path)
    assert message in str(error.value)
    assert "settings.json" in str(error.value)


def test_invalid_json_says_where(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text('{"port": 80,}')
    with pytest.raises(SettingsError, match=r"not valid JSON \(line 1"):
        load_settings(path)


def test_command_line_beats_file_and_environment_beats_both(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"port": 9000, "temperature": 0.5}))
    settings = load_settings(path, {"port": 9100, "temperature": 0.1},
                             environ={"TANGLEBOX_TEMPERATURE": "0.9", "TANGLEBOX_ENABLE_API": "false"})
    assert settings["port"] == 9100
    assert settings["temperature"] == 0.9
    assert settings["enableApi"] is False


def test_a_wrong_environment_variable_is_named(tmp_path):
    with pytest.raises(SettingsError, match="TANGLEBOX_PORT"):
        load_settings(tmp_path / "s.json", environ={"TANGLEBOX_PORT": "eighty"})


def test_environment_names():
    assert env_name("maxNewTokens") == "TANGLEBOX_MAX_NEW_TOKENS"
    assert env_name("vRamGb") == "TANGLEBOX_V_RAM_GB"
    assert env_name("use8BitCompression") == "TANGLEBOX_USE_8BIT_COMPRESSION"


def test_the_committed_settings_file_holds_every_key_with_its_default():
    from tests.conftest import ROOT
    assert json.loads((ROOT / "settings.json").read_text()) == defaults()
