"""Run Tanglebox: ``python app.py [--settings PATH] [--port N] [--model-path PATH] [--device D]
[--cpu-ggml] [--host H]``.

Checks the settings, the model, the address and the TLS files first, then lets the model
generate a few tokens in a child process (``tanglebox.self_check``: a native crash is caught
there); a mistake is one line on stderr and exit status 2. Then it serves with gunicorn's gevent worker, the same stack as
production (README: Deployment).
"""

from __future__ import annotations

import argparse
import sys

from tanglebox.listener import check_listener
from tanglebox.self_check import run_self_check
from tanglebox.serving import TangleboxServer, WORKER_BOOT_ERROR, preflight
from tanglebox.settings import SettingsError, load_settings

USAGE_ERROR = 2


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python app.py",
                                     description="Serve a language model: chat UI, REST and websockets.")
    parser.add_argument("--settings", default="settings.json", metavar="PATH",
                        help="settings file (created with defaults when missing)")
    parser.add_argument("--port", type=int, help="TCP port (setting: port)")
    parser.add_argument("--host", help="address to listen on (setting: host)")
    parser.add_argument("--model-path", help="a .gguf file or a transformers folder (setting: modelName)")
    parser.add_argument("--device", help="cpu, cuda, mps or cpu-ggml (setting: device)")
    parser.add_argument("--cpu-ggml", action="store_true",
                        help="run a GGUF file with llama.cpp on the CPU (same as --device cpu-ggml)")
    return parser.parse_args(argv)


def overrides_from(args: argparse.Namespace) -> dict:
    overrides = {"port": args.port, "host": args.host, "modelName": args.model_path,
                 "device": "cpu-ggml" if args.cpu_ggml else args.device}
    return {key: value for key, value in overrides.items() if value is not None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = load_settings(args.settings, overrides_from(args))
        location = preflight(settings)
        check_listener(settings)
        if settings.created:
            print(f"tanglebox: wrote {args.settings} with the default settings", file=sys.stderr)
        elif settings.filled_in:
            print(f"tanglebox: {args.settings}: added missing settings with their defaults: "
                  f"{', '.join(settings.filled_in)}", file=sys.stderr)
        if location is not None and location.backend == "llama.cpp":
            print(f"tanglebox: {run_self_check(args.settings, overrides_from(args))}",
                  file=sys.stderr, flush=True)
    except SettingsError as err:
        print(f"tanglebox: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    scheme = "https" if settings["useSsl"] else "http"
    host = "localhost" if settings["host"] in ("0.0.0.0", "::", "127.0.0.1") else settings["host"]
    served = ", ".join(([f"{location.path.name} ({location.backend})"] if location else [])
                       + [f"{e['name']} (remote)" for e in settings["remoteEndpoints"]])
    print(f"tanglebox: serving {served} at {scheme}://{host}:{settings['port']}",
          file=sys.stderr, flush=True)
    try:
        TangleboxServer(settings, location).run()
    except SystemExit as exit_:
        # gunicorn halts with its boot-error code when the worker could not load the model;
        # the worker has already printed the one-line reason.
        return USAGE_ERROR if exit_.code == WORKER_BOOT_ERROR else (exit_.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
