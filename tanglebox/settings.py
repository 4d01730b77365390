"""The settings loaded and checked; every setting is declared in ``tanglebox.settings_table``.

Precedence, lowest to highest: the table's defaults, ``settings.json``, command-line flags,
environment variables (``TANGLEBOX_`` + the key in upper snake case, e.g.
``TANGLEBOX_MAX_NEW_TOKENS``).

A wrong value is a :class:`SettingsError` whose message names the key and the file; ``app.py``
prints it on one line and exits with status 2. Every JSON text (the file, a variable's value)
is decoded by :func:`parse_json`, so a file of any bytes is either settings or that one line.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tanglebox.settings_table import SETTINGS, SETTINGS_BY_KEY, Setting

# A settings file is a few kB. The cap makes a wrong file (a model, /dev/zero) one line too.
MAX_SETTINGS_FILE_BYTES = 4 * 1024 * 1024
SHOWN_VALUE_CHARS = 80  # of a wrong value, in the error line
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON can escape one; UTF-8 cannot hold it
# An origin as browsers send it: scheme, host name or [IPv6], optional port. No `*`: a
# wildcard would let any site in (README: the widget), and no `;` or spaces, which would
# reach the Content-Security-Policy header.
ORIGIN = re.compile(r"https?://"
                    r"(?:[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*|\[[0-9A-Fa-f:.]+\])"  # name or [IPv6]
                    r"(?::[0-9]{1,5})?")

# remoteEndpoints: each entry's keys, their type, and whether they must be there.
ENDPOINT_FIELDS: dict[str, tuple[type, bool]] = {
    "name": (str, True), "baseUrl": (str, True), "model": (str, False),
    "apiKeyEnv": (str, False), "maxConcurrent": (int, False), "timeoutSeconds": (int, False)}
UPSTREAM_URL = re.compile(r"https?://[^\s/?#]+(?:/[^\s?#]*)?")
# The databases Tanglebox supports (tanglebox.database checks the rest when it connects).
DATABASE_URL = re.compile(r"(sqlite|sqlite\+pysqlite|postgresql|postgresql\+psycopg)://.*",
                          re.DOTALL)


class SettingsError(Exception):
    """A setting the user must change before the server can start."""


@dataclass
class Settings:
    """Resolved settings: ``values`` by key, plus where they came from."""

    values: dict[str, Any]
    path: Path
    filled_in: list[str] = field(default_factory=list)  # keys missing from the file, now added
    created: bool = False  # the file did not exist and was written with the defaults

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def relative_path(self, value: str) -> Path:
        """A path setting resolved against the folder of settings.json."""
        path = Path(value)
        try:
            path = path.expanduser()
        except RuntimeError:  # ~user of no such user: then it is a plain name
            pass
        return path if path.is_absolute() else self.path.parent / path


def defaults() -> dict[str, Any]:
    return {s.key: _copy(s.default) for s in SETTINGS}


def env_name(key: str) -> str:
    """``maxNewTokens`` -> ``TANGLEBOX_MAX_NEW_TOKENS``; ``use8BitCompression`` -> ``..._USE_8BIT_COMPRESSION``."""
    return "TANGLEBOX_" + re.sub(r"(?<=[a-z])(?=[A-Z0-9])", "_", key).upper()


def load_settings(path: str | os.PathLike | None = None,
                  overrides: dict[str, Any] | None = None,
                  environ: dict[str, str] | None = None,
                  write_missing: bool = True) -> Settings:
    """Read settings.json (writing it with defaults when missing), then apply overrides."""
    path = Path(path or "settings.json")
    values = defaults()
    filled_in: list[str] = []
    data = _read_settings_file(path)
    loaded_from_file = data is not None
    if loaded_from_file:
        loaded = parse_json(data, where=str(path))
        if not isinstance(loaded, dict):
            raise SettingsError(f"{path}: must hold a JSON object of settings")
        for key, value in loaded.items():
            values[key] = check_value(key, value, source=str(path))
        filled_in = [s.key for s in SETTINGS if s.key not in loaded]
        if filled_in and write_missing:
            _write(path, values)
    elif write_missing:
        _write(path, values)
    for key, value in (overrides or {}).items():
        values[key] = check_value(key, value, source="the command line")
    for key, raw in (os.environ if environ is None else environ).items():
        setting = _setting_for_env(key)
        if setting is not None:
            values[setting.key] = check_value(setting.key, _parse_env(setting, raw), source=key)
    settings = Settings(values=values, path=path.resolve(), filled_in=filled_in,
                        created=write_missing and not filled_in and not loaded_from_file)
    _check_combinations(settings)
    return settings


def parse_json(data: bytes | str, where: str) -> Any:
    """Decode JSON, or raise a SettingsError naming ``where`` and what to change.

    Bytes may be UTF-8 (with or without a byte-order mark), UTF-16 or UTF-32, as Windows
    editors save them; ``json`` tells them apart (RFC 4627, section 3).
    """
    try:
        return json.loads(data)
    except json.JSONDecodeError as err:
        raise SettingsError(f"{where}: not valid JSON (line {err.lineno}, column {err.colno}): "
                            f"{err.msg}") from None
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1 if isinstance(data, bytes) else 1
        raise SettingsError(f"{where}: line {line} is not UTF-8 text; save the file as UTF-8") \
            from None
    except RecursionError:
        raise SettingsError(f"{where}: nested too deeply to read; settings are one object of "
                            "plain values") from None
    except ValueError:  # the only other one: Python's limit on the digits of an integer
        raise SettingsError(f"{where}: holds a number of more than {sys.get_int_max_str_digits()} "
                            "digits; no setting takes one that long") from None


def check_value(key: str, value: Any, source: str) -> Any:
    """Return ``value`` if it suits setting ``key``; else raise a SettingsError saying why."""
    setting = SETTINGS_BY_KEY.get(key)
    if setting is None:
        close = [k for k in SETTINGS_BY_KEY if k.lower() == key.lower()]
        hint = f" (did you mean \"{close[0]}\"?)" if close else ""
        raise SettingsError(f"{source}: unknown setting \"{key}\"{hint}; "
                            "README's settings table lists them all")
    kinds = setting.kind if isinstance(setting.kind, tuple) else (setting.kind,)
    # bool is an int in Python, and JSON true must not pass for a number.
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise SettingsError(f"{source}: \"{key}\" must be {_kind_name(kinds)}, "
                            f"got {_shown(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise SettingsError(f"{source}: \"{key}\" must be a finite number")
    if setting.choices and value not in setting.choices:
        raise SettingsError(f"{source}: \"{key}\" must be one of "
                            f"{', '.join(setting.choices)}; got {_shown(value)}")
    if setting.minimum is not None and value < setting.minimum:
        raise SettingsError(f"{source}: \"{key}\" must be at least {setting.minimum:g}, "
                            f"got {_shown(value)}")
    if setting.maximum is not None and value > setting.maximum:
        raise SettingsError(f"{source}: \"{key}\" must be at most {setting.maximum:g}, "
                            f"got {_shown(value)}")
    if key == "remoteEndpoints":
        check_remote_endpoints(value, source)
        return value
    if kinds == (list,) and not all(isinstance(item, str) for item in value):
        raise SettingsError(f"{source}: \"{key}\" must be a list of strings")
    texts = value if kinds == (list,) else [value] if isinstance(value, str) else []
    if any(LONE_SURROGATE.search(text) for text in texts):
        raise SettingsError(f"{source}: \"{key}\" holds a lone surrogate (an escape such as "
                            "\\ud800, half of a character); write the character itself")
    return value


def check_remote_endpoints(endpoints: list, source: str) -> None:
    """Each entry of ``remoteEndpoints`` is an object of the known keys, names unique."""
    names: set[str] = set()
    for index, endpoint in enumerate(endpoints):
        where = f"{source}: \"remoteEndpoints\"[{index}]"
        if not isinstance(endpoint, dict):
            raise SettingsError(f"{where} must be an object such as "
                                '{"name": "big", "baseUrl": "http://10.0.0.5:8000/v1"}')
        for field_name, value in endpoint.items():
            if field_name not in ENDPOINT_FIELDS:
                raise SettingsError(f"{where} has an unknown key \"{field_name}\"; the keys "
                                    f"are {', '.join(ENDPOINT_FIELDS)}")
            kind, required = ENDPOINT_FIELDS[field_name]
            ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 1
                  if kind is int else isinstance(value, str) and bool(value or not required))
            if not ok or (isinstance(value, str) and LONE_SURROGATE.search(value)):
                wanted = "a whole number of at least 1" if kind is int else "a non-empty string"
                raise SettingsError(f"{where}.{field_name} must be {wanted}, got {_shown(value)}")
        for field_name, (_, required) in ENDPOINT_FIELDS.items():
            if required and field_name not in endpoint:
                raise SettingsError(f"{where} needs \"{field_name}\"")
        if not UPSTREAM_URL.fullmatch(endpoint["baseUrl"]):
            raise SettingsError(f"{where}.baseUrl must be an http:// or https:// URL such as "
                                f"http://10.0.0.5:8000/v1, got {_shown(endpoint['baseUrl'])}")
        if endpoint["name"] in names:
            raise SettingsError(f"{where}.name \"{endpoint['name']}\" is used twice; each "
                                "remote model needs its own name")
        names.add(endpoint["name"])


def _check_combinations(settings: Settings) -> None:
    v, where = settings.values, settings.path.name
    if not v["modelName"] and not v["remoteEndpoints"]:
        raise SettingsError(f"{where}: \"modelName\" is empty and there are no "
                            "\"remoteEndpoints\": nothing to serve; name a model or add an "
                            "endpoint")
    if v["maxNewTokens"] > v["maxNewTokensLimit"]:
        raise SettingsError(f"{where}: \"maxNewTokens\" ({v['maxNewTokens']}) is above "
                            f"\"maxNewTokensLimit\" ({v['maxNewTokensLimit']}); lower one or raise the other")
    if v["useSsl"] and not (v["sslCertFile"] and v["sslKeyFile"]):
        raise SettingsError(f"{where}: \"useSsl\" needs \"sslCertFile\" and \"sslKeyFile\" "
                            "(PEM files, relative to settings.json)")
    for entry in v["metricsAllowedAddresses"]:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise SettingsError(f"{where}: \"metricsAllowedAddresses\" entries must be IP "
                                f"addresses or networks like 10.0.0.0/8; got {_shown(entry)}") \
                from None
    if not DATABASE_URL.fullmatch(v["databaseUrl"]):
        scheme = v["databaseUrl"].split(":", 1)[0]  # not the rest: it may hold a password
        raise SettingsError(f"{where}: \"databaseUrl\" must be sqlite:///FILE or "
                            "postgresql+psycopg://USER:PASSWORD@HOST/NAME; got a URL "
                            f"starting {_shown(scheme)}")
    for key in ("allowedOrigins", "widgetAllowedOrigins"):
        for origin in v[key]:
            if not ORIGIN.fullmatch(origin):
                raise SettingsError(f"{where}: \"{key}\" entries must be origins like "
                                    f"https://example.com (scheme, host and port only: no path, "
                                    f"no *); got {_shown(origin)}")


def _setting_for_env(name: str) -> Setting | None:
    if not name.startswith("TANGLEBOX_"):
        return None
    for setting in SETTINGS:
        if env_name(setting.key) == name:
            return setting
    return None


def _parse_env(setting: Setting, raw: str) -> Any:
    kinds = setting.kind if isinstance(setting.kind, tuple) else (setting.kind,)
    if str in kinds:
        return raw
    try:
        return parse_json(raw, where=env_name(setting.key))
    except SettingsError:
        return raw  # check_value then reports the wrong type, naming the variable


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {bool: "true or false", int: "a whole number", float: "a number",
             str: "a string", list: "a list"}
    if float in kinds:
        return "a number"
    return " or ".join(names[k] for k in kinds)


def _shown(value: Any) -> str:
    """A wrong value as JSON, cut short: the error stays one readable line."""
    try:
        text = json.dumps(value)
    except (ValueError, RecursionError):  # a number too long to print, or a deep list
        text = type(value).__name__
    return text if len(text) <= SHOWN_VALUE_CHARS else text[:SHOWN_VALUE_CHARS] + "..."


def _read_settings_file(path: Path) -> bytes | None:
    """The file's bytes; None when there is no file."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_SETTINGS_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise SettingsError(f"{path}: cannot be read ({err.strerror}); give --settings a "
                            "readable JSON file") from None
    if len(data) > MAX_SETTINGS_FILE_BYTES:
        raise SettingsError(f"{path}: larger than {MAX_SETTINGS_FILE_BYTES // 1024 // 1024} MB, "
                            "so not a settings file; give --settings the JSON file of settings")
    return data


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def _write(path: Path, values: dict[str, Any]) -> None:
    try:
        path.write_text(json.dumps(values, indent=4) + "\n", encoding="utf-8")
    except OSError as err:
        raise SettingsError(f"{path}: cannot be written: {err.strerror}") from None
