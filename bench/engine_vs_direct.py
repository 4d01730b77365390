"""Single-stream speed through the engine vs llama-cpp-python called directly, in one run.

``python -m bench.engine_vs_direct [--tokens 128] [--rounds 5]``

Each round runs the three contestants back to back on the same prompt at temperature 0
(greedy, so each generates the same tokens), and the medians are compared: absolute speeds on a
shared machine drift, ratios measured side by side hold. Also reports model load time.

- engine: Tanglebox's Engine + llama.cpp backend (what every route uses), one slot busy;
- llama-cpp-python high level: ``Llama.create_completion(stream=True)``;
- llama-cpp-python low level: a plain ``llama_decode`` loop, one token per call.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "Write a long story about a dragon who learns to bake bread."


def engine_run(engine, max_tokens: int) -> tuple[int, float]:
    from tanglebox.chat_request import ChatRequest
    from tanglebox.engine import Delta, Done
    from tanglebox.prompting import USER, Message
    generation = engine.submit(ChatRequest((Message(USER, PROMPT),), "", 0.0, max_tokens))
    first = None
    for event in generation.events():
        if isinstance(event, Delta) and first is None:
            first = time.perf_counter()
        if isinstance(event, Done):
            return event.completion_tokens - 1, time.perf_counter() - first
    raise RuntimeError("no reply")


def high_level_run(llm, prompt_text: str, max_tokens: int) -> tuple[int, float]:
    first, count = None, 0
    for _ in llm.create_completion(prompt_text, max_tokens=max_tokens, temperature=0.0,
                                   stream=True):
        count += 1
        if first is None:
            first = time.perf_counter()
    return count - 1, time.perf_counter() - first


def low_level_run(backend, prompt_tokens: list[int], max_tokens: int) -> tuple[int, float]:
    from tanglebox.backends.base import DecodeItem
    backend.forget(0, 0)
    logits = backend.decode([DecodeItem(0, prompt_tokens, 0)])[0]
    position, first = len(prompt_tokens), time.perf_counter()
    for _ in range(max_tokens - 1):
        token = int(np.argmax(logits))
        logits = backend.decode([DecodeItem(0, [token], position)])[0]
        position += 1
    return max_tokens - 1, time.perf_counter() - first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from llama_cpp import Llama

    from tanglebox.backends.llama_cpp_backend import LlamaCppBackend, cpu_threads
    from tanglebox.model_location import embedded_model_path
    from tanglebox.serving import build_engine, preflight
    from tanglebox.settings import load_settings

    path = embedded_model_path()
    settings = load_settings(Path(tempfile.mkdtemp()) / "settings.json",
                             {"parallelSlots": 1, "contextLength": 2048})
    started = time.perf_counter()
    engine = build_engine(settings, preflight(settings))
    engine_load = time.perf_counter() - started
    started = time.perf_counter()
    llm = Llama(str(path), n_ctx=2048, n_threads=cpu_threads(), n_threads_batch=cpu_threads(),
                verbose=False)
    direct_load = time.perf_counter() - started
    low = LlamaCppBackend(path, 2048, 1, 0, "cpu")
    prompt_text = engine.render(_request()).text
    prompt_tokens = low.tokenize(prompt_text)

    rates: dict[str, list[float]] = {"engine": [], "high": [], "low": []}
    for _ in range(args.rounds):
        for name, run in (("engine", lambda: engine_run(engine, args.tokens)),
                          ("high", lambda: high_level_run(llm, prompt_text, args.tokens)),
                          ("low", lambda: low_level_run(low, prompt_tokens, args.tokens))):
            tokens, seconds = run()
            rates[name].append(tokens / seconds)
    engine.stop(drain_seconds=1)
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"machine: {platform.machine()}, {_cpu_count()} cores, Python {platform.python_version()}")
    print(f"model: {path.name}; {args.tokens} tokens per reply; {args.rounds} rounds, medians\n")
    print("| path | load s | tokens/s | engine ÷ this |")
    print("|---|---|---|---|")
    print(f"| Tanglebox engine (llama.cpp backend) | {engine_load:.2f} | {median['engine']:.1f} | 1.00 |")
    print(f"| llama-cpp-python `Llama.create_completion` | {direct_load:.2f} | {median['high']:.1f} | "
          f"{median['engine'] / median['high']:.2f} |")
    print(f"| llama-cpp-python low-level `llama_decode` loop | – | {median['low']:.1f} | "
          f"{median['engine'] / median['low']:.2f} |")


def _request():
    from tanglebox.chat_request import ChatRequest
    from tanglebox.prompting import USER, Message
    return ChatRequest((Message(USER, PROMPT),), "", 0.0, 1)


def _cpu_count() -> int:
    return os.cpu_count() or 1


if __name__ == "__main__":
    main()
