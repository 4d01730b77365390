"""settings.json of any bytes: settings, or one line naming the file and what to change, exit 2."""

from __future__ import annotations

import json
import os

import pytest

from tanglebox.settings import SettingsError, load_settings
from tests.commands import MAX_LINE, one_error_line, run_app
from tests.live_server import free_port


@pytest.mark.parametrize("content, message", [
    (b'{"widgetTitle": "Caf\xe9"}', "line 1 is not UTF-8 text; save the file as UTF-8"),
    (b'{\n  "port": 8080,\n  "widgetTitle": "\xff"\n}', "line 3 is not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"port": ' + b"9" * 5000 + b"}", "a number of more than 4300 digits"),
    (b'{"widgetTitle": "\\ud800"}', '"widgetTitle" holds a lone surrogate'),
    (b'{"port": ' + b"[" * 900 + b"]" * 900 + b"}", '"port" must be a whole number, got [[['),
    (b'{"port": "' + b"8" * 100_000 + b'"}', '"port" must be a whole number, got "888'),
    (b"\0" * (5 * 1024 * 1024), "larger than 4 MB"),
], ids=["latin-1", "bad-byte-line-3", "deep-nesting", "5000-digits", "lone-surrogate",
        "deep-value", "long-value", "5-MB-of-zeros"])
def test_a_settings_file_of_any_bytes_is_one_line_and_exit_2(tmp_path, content, message):
    path = tmp_path / "settings.json"
    path.write_bytes(content)
    one_error_line(run_app(tmp_path, path), "settings.json", message)


def a_folder(folder):
    (folder / "settings.json").mkdir()
    return folder / "settings.json"


def under_a_file(folder):
    (folder / "notes.txt").write_text("not a folder")
    return folder / "notes.txt" / "settings.json"


@pytest.mark.parametrize("make", [a_folder, under_a_file])
def test_a_settings_path_that_cannot_be_read_is_one_line_and_exit_2(tmp_path, make):
    path = make(tmp_path)
    one_error_line(run_app(tmp_path, path), str(path), "cannot be read",
                   "give --settings a readable JSON file")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root reads a file whatever its mode")
def test_a_settings_file_without_read_permission_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text("{}")
    path.chmod(0)
    one_error_line(run_app(tmp_path, path), "cannot be read (Permission denied)")


@pytest.mark.parametrize("model_name, message", [
    ("x" * 5000, '"modelName" cannot be checked (File name too long)'),
    ("~no-such-user/model.gguf", '"modelName" is ~no-such-user/model.gguf, which does not exist'),
], ids=["too-long-for-the-file-system", "home-of-no-such-user"])
def test_a_model_path_of_any_text_is_one_line_and_exit_2(tmp_path, model_name, message):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"modelName": model_name}))
    one_error_line(run_app(tmp_path, path), "settings.json", message)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig", "utf-32"])
def test_json_as_windows_editors_save_it_is_read_and_rewritten_as_utf8(tmp_path, encoding):
    path = tmp_path / "settings.json"
    path.write_bytes('{"port": 9000, "widgetTitle": "Café"}'.encode(encoding))
    settings = load_settings(path, environ={})
    assert settings["port"] == 9000 and settings["widgetTitle"] == "Café"
    # The missing keys were filled in, and the file is UTF-8 from then on.
    assert json.loads(path.read_text(encoding="utf-8"))["widgetTitle"] == "Café"


@pytest.mark.parametrize("variable, raw, message", [
    ("TANGLEBOX_PORT", "[" * 100_000 + "]" * 100_000, '"port" must be a whole number'),
    ("TANGLEBOX_SEED", "9" * 5000, '"seed" must be a whole number, got "999'),
    ("TANGLEBOX_WIDGET_TITLE", "Caf\udce9", '"widgetTitle" holds a lone surrogate'),
])
def test_an_environment_variable_of_any_text_names_itself(tmp_path, variable, raw, message):
    # A variable that is not UTF-8 reaches Python as a lone surrogate (surrogateescape).
    with pytest.raises(SettingsError) as error:
        load_settings(tmp_path / "settings.json", environ={variable: raw})
    assert str(error.value).startswith(variable) and message in str(error.value)
    assert len(str(error.value)) < MAX_LINE


@pytest.mark.parametrize("origin", [
    "*", "https://*", "https://*.example.com", "http://*:8080", "https://example.com/",
    "https://example.com/path", "example.com", "https://a.example.com; script-src *",
    "https://a.example.com;script-src", "https://exa mple.com", "ftp://example.com",
])
@pytest.mark.parametrize("key", ["widgetAllowedOrigins", "allowedOrigins"])
def test_an_origin_setting_takes_origins_only_never_a_wildcard(tmp_path, key, origin):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({key: ["https://docs.example.com", origin]}))
    with pytest.raises(SettingsError, match=f'"{key}" entries must be origins like'):
        load_settings(path, environ={})


def test_origins_with_a_port_or_an_ip_address_are_accepted(tmp_path):
    origins = ["https://docs.example.com", "http://127.0.0.1:8080", "http://[::1]:8080",
               "https://xn--caf-dma.example"]
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"widgetAllowedOrigins": origins, "allowedOrigins": origins}))
    settings = load_settings(path, environ={})
    assert settings["widgetAllowedOrigins"] == origins == settings["allowedOrigins"]


def test_a_widget_wildcard_stops_python_app_py(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"widgetAllowedOrigins": ["https://*"], "port": free_port()}))
    one_error_line(run_app(tmp_path, path), '"widgetAllowedOrigins" entries must be origins',
                    "no *", 'got "https://*"')
