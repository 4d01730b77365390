"""``remoteEndpoints`` and an empty ``modelName``: checked at start, one line naming the key."""

from __future__ import annotations

import json

import pytest

from tanglebox.serving import preflight
from tanglebox.settings import SettingsError, load_settings
from tanglebox.upstream_client import upstreams_from_settings
from tests.unit.test_startup import start

GOOD = {"name": "big", "baseUrl": "http://10.0.0.5:8000/v1"}


def settings_with(tmp_path, endpoints, **values):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"remoteEndpoints": endpoints, **values}))
    return load_settings(path)


@pytest.mark.parametrize("endpoints, message", [
    (["http://x/v1"], '"remoteEndpoints"[0] must be an object'),
    ([{**GOOD, "url": "x"}], '"remoteEndpoints"[0] has an unknown key "url"'),
    ([{"baseUrl": "http://x/v1"}], '"remoteEndpoints"[0] needs "name"'),
    ([{"name": "big"}], '"remoteEndpoints"[0] needs "baseUrl"'),
    ([{**GOOD, "name": ""}], '"remoteEndpoints"[0].name must be a non-empty string'),
    ([{**GOOD, "baseUrl": "ftp://x/v1"}], '"remoteEndpoints"[0].baseUrl must be an http://'),
    ([{**GOOD, "baseUrl": "localhost:8000"}], '"remoteEndpoints"[0].baseUrl must be an http://'),
    ([{**GOOD, "maxConcurrent": 0}], '"remoteEndpoints"[0].maxConcurrent must be a whole number'),
    ([{**GOOD, "maxConcurrent": "2"}], '"remoteEndpoints"[0].maxConcurrent must be a whole number'),
    ([{**GOOD, "timeoutSeconds": True}], '"remoteEndpoints"[0].timeoutSeconds must be a whole'),
    ([GOOD, {**GOOD, "baseUrl": "https://y/v1"}], '"remoteEndpoints"[1].name "big" is used twice'),
])
def test_a_wrong_endpoint_is_one_line_naming_it(tmp_path, endpoints, message):
    with pytest.raises(SettingsError) as error:
        settings_with(tmp_path, endpoints)
    assert message in str(error.value) and "settings.json" in str(error.value)
    assert "\n" not in str(error.value)


def test_nothing_to_serve_is_refused(tmp_path):
    with pytest.raises(SettingsError, match='"modelName" is empty and there are no '
                                            '"remoteEndpoints"'):
        settings_with(tmp_path, [], modelName="")


def test_the_key_comes_from_the_named_variable_and_never_shows(tmp_path):
    settings = settings_with(tmp_path, [{**GOOD, "apiKeyEnv": "BIG_KEY", "maxConcurrent": 8}])
    (upstream,) = upstreams_from_settings(settings, {"BIG_KEY": "sk-hidden-123"})
    assert (upstream.name, upstream.model, upstream.api_key, upstream.max_concurrent,
            upstream.timeout) == ("big", "big", "sk-hidden-123", 8, 60)
    assert "sk-hidden-123" not in repr(upstream)
    assert "sk-hidden-123" not in json.dumps(settings.values)


def test_a_key_variable_that_is_not_set_stops_the_start(tmp_path):
    settings = settings_with(tmp_path, [{**GOOD, "apiKeyEnv": "NO_SUCH_KEY_VARIABLE"}],
                             modelName="")
    with pytest.raises(SettingsError, match=r'"remoteEndpoints"\[0\].apiKeyEnv names '
                                            "NO_SUCH_KEY_VARIABLE, which is not set"):
        preflight(settings)


def test_a_remote_name_equal_to_the_local_model_s_id_is_refused(tmp_path):
    settings = settings_with(tmp_path, [{**GOOD, "name": "SmolLM2-135M-Instruct"}])
    with pytest.raises(SettingsError, match="the local model's id; rename one of them"):
        preflight(settings)


def test_remote_only_needs_no_model_file(tmp_path):
    assert preflight(settings_with(tmp_path, [GOOD], modelName="")) is None


def test_endpoints_can_come_from_the_environment(tmp_path):
    settings = load_settings(tmp_path / "settings.json",
                             environ={"TANGLEBOX_REMOTE_ENDPOINTS": json.dumps([GOOD])})
    assert settings["remoteEndpoints"] == [GOOD]


def test_app_py_stops_with_one_line_and_exit_2(tmp_path):
    result = start(tmp_path, {"modelName": "", "remoteEndpoints": [
        {**GOOD, "apiKeyEnv": "NO_SUCH_KEY_VARIABLE"}]})
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("tanglebox: error: ") and "NO_SUCH_KEY_VARIABLE" in line
