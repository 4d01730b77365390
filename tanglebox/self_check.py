"""Start-up self-check: the model generates a few tokens in a child process first.

A native crash (llama.cpp built with ``-march=native`` on a CPU whose AMX path segfaults in the
first decode, llama.cpp issue 20824; a wheel built for a CPU with instructions this one lacks)
kills the process it happens in, with no Python exception to catch. So, before the server
starts, ``run_self_check`` runs ``python -m tanglebox.self_check SETTINGS OVERRIDES`` in a child
process: the child loads the model exactly as serving does (``serving.build_engine``) and
generates a few tokens at temperature 0 through the engine. The parent reads how the child
ended. A crash becomes one line that names the cause and the fix (:class:`SettingsError`, so
``app.py`` prints it and exits 2) instead of a worker that gunicorn restarts forever.

The check runs for GGUF models on llama.cpp, the backend that is compiled on the user's
machine. torch and bitsandbytes ship wheels with runtime CPU dispatch, and loading a large
transformers model twice would double the start-up time, so that backend is not checked here
(the crash guard in ``serving`` still stops a worker that keeps crashing).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tanglebox.settings import SettingsError

CHECK_PROMPT = "Say OK."
CHECK_TOKENS = 4
SYSTEM_INFO_PREFIX = "system_info: "
FAILED = 2  # the child's exit status for an ordinary (Python-level) failure, one line on stderr
# What to run when the llama.cpp build is not safe on this CPU. pip's wheel cache is keyed by the
# source's URL, not by build options, so a wheel built before with other flags would be reused
# without the first command (pip issue 11164).
REBUILD_COMMAND = ("python -m pip cache remove llama_cpp_python && "
                   "python -m pip install --force-reinstall --no-deps -r requirements.txt")


def run_self_check(settings_path: str | Path, overrides: dict) -> str:
    """Generate a few tokens in a child process; returns the child's one-line report.

    Raises SettingsError with one line to act on when the child crashed or failed.
    """
    command = [sys.executable, "-m", "tanglebox.self_check", str(settings_path),
               json.dumps(overrides)]
    # The child imports this package from where the parent did, whatever the working folder.
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [root, os.environ.get("PYTHONPATH", "")]))}
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=env, text=True, errors="replace")
    return interpret(result.returncode, result.stdout, result.stderr)


def interpret(returncode: int, stdout: str, stderr: str) -> str:
    """What the child's end means: its report, or a SettingsError that names cause and fix."""
    lines = stdout.splitlines()
    system_info = next((line[len(SYSTEM_INFO_PREFIX):] for line in lines
                        if line.startswith(SYSTEM_INFO_PREFIX)), "")
    if returncode == 0:
        return lines[-1] if lines else "ok"
    if returncode < 0:
        raise SettingsError(_crash_line(-returncode, system_info))
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if returncode == FAILED and last:
        raise SettingsError(last.removeprefix("tanglebox: error: "))
    raise SettingsError(f"the start-up self-check failed (exit status {returncode})"
                        + (f": {last}" if last else ""))


def _crash_line(signum: int, system_info: str) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    if _has_feature(system_info, "AMX_INT8"):
        cause = ("it was built for this CPU with -march=native, and llama.cpp's AMX code "
                 "crashes (llama.cpp issue 20824)")
    elif signum == signal.SIGILL:
        cause = "it was built for a CPU with instructions this one lacks"
    else:
        cause = "the build or the model file may be broken"
    return (f"llama.cpp crashed in its first decode ({name}, signal {signum}): {cause}; "
            f"reinstall llama-cpp-python built for any x86-64 CPU: {REBUILD_COMMAND} "
            "(README: Troubleshooting)")


def _has_feature(system_info: str, feature: str) -> bool:
    """``llama_print_system_info`` lists compiled-in features as ``NAME = 1 |``."""
    return any(part.strip() == f"{feature} = 1" for part in system_info.split("|"))


def _child(settings_path: str, overrides: dict) -> str:
    """Load the model as serving does and generate a few tokens; returns a one-line report."""
    import time

    from tanglebox.chat_request import ChatRequest
    from tanglebox.engine import Done, Error
    from tanglebox.model_location import locate_model
    from tanglebox.prompting import USER, Message
    from tanglebox.serving import build_engine
    from tanglebox.settings import load_settings

    settings = load_settings(settings_path, overrides)
    location = locate_model(settings)
    if location.backend == "llama.cpp":
        import llama_cpp
        print(SYSTEM_INFO_PREFIX + llama_cpp.llama_print_system_info().decode(errors="replace"),
              flush=True)
    started = time.monotonic()
    engine = build_engine(settings, location)
    try:
        generation = engine.submit(ChatRequest((Message(USER, CHECK_PROMPT),), "", 0.0,
                                               CHECK_TOKENS))
        for event in generation.events():
            if isinstance(event, Error):
                raise SettingsError(f"the model failed its first reply: {event.message}")
            if isinstance(event, Done):
                return (f"self-check: {location.path.name} generated "
                        f"{event.completion_tokens} tokens in {time.monotonic() - started:.1f} s")
    finally:
        engine.stop(drain_seconds=0)
    raise SettingsError("the model ended its first reply without finishing it")


def main(argv: list[str]) -> int:
    try:
        print(_child(argv[0], json.loads(argv[1]) if len(argv) > 1 else {}), flush=True)
    except SettingsError as err:
        print(f"tanglebox: error: {err}", file=sys.stderr, flush=True)
        return FAILED
    sys.stdout.flush()
    # The engine thread and the model are done with; skip interpreter teardown of native state.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
