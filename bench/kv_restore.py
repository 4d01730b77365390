"""A conversation's next turn after a restart: its KV cache loaded from disk against read cold.

``python -m bench.kv_restore [--tokens 2000] [--rounds 3]``

Once: a conversation of about ``--tokens`` prompt tokens gets its first reply from an engine
with a KV cache folder; the slot is then dropped (``forget``, timed: the save the engine's
thread does when it gives a slot to another conversation) and the engine stops; the folder is
kept as it is then. Each round then starts two fresh backends and
engines, as a restarted server would, and asks both the conversation's next turn (the history,
the reply, a new question) at temperature 0:

- restored: with a copy of the saved folder (the backend loads the saved state into the slot
  and reads only the tokens after it);
- cold: with the KV cache off (it reads the whole history).

Time to first token: from submitting the request to its first text. The rounds alternate
which goes first; the result is the median of the rounds' restored ÷ cold ratios (goal ≤ 0.3),
with the two replies checked equal (greedy on the same tokens).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.machine import cpu_model, load_average
from tanglebox.backends import load_backend
from tanglebox.chat_request import ChatRequest
from tanglebox.engine import Delta, Done, Engine, engine_from_settings
from tanglebox.model_location import locate_model
from tanglebox.prompting import ASSISTANT, USER, Message
from tanglebox.settings import load_settings

COLOURS = ("red", "green", "blue", "amber", "violet", "silver", "ochre", "teal")
ANIMALS = ("fox", "heron", "otter", "badger", "lynx", "crane", "hare", "wren")
PLACES = ("mill", "harbour", "orchard", "bridge", "market", "quarry", "chapel", "meadow")
FIRST_QUESTION = "Which animal did note 3 mention? Answer in one short sentence."
NEXT_QUESTION = "And which place did note 5 mention? Answer in one short sentence."
CONTEXT_LENGTH = 4096
REPLY_TOKENS = 24


def long_conversation(count_tokens: Callable[[tuple[Message, ...]], int],
                      target_tokens: int = 2000) -> tuple[Message, ...]:
    """Notes sent by the user, each acknowledged, until the prompt holds ``target_tokens``,
    then ``FIRST_QUESTION``; ``count_tokens`` measures a conversation's prompt."""
    history: list[Message] = []
    note = 0
    while True:
        question = (*history, Message(USER, FIRST_QUESTION))
        if count_tokens(question) >= target_tokens:
            return question
        lines = []
        for _ in range(4):
            note += 1
            lines.append(f"Note {note}: the {COLOURS[note % 8]} {ANIMALS[note * 3 % 8]} went to "
                         f"the {PLACES[note * 5 % 8]} on day {note} and counted {note * 7} stones.")
        history += [Message(USER, " ".join(lines)),
                    Message(ASSISTANT, f"Noted, up to note {note}.")]


def prompt_counter(engine: Engine) -> Callable[[tuple[Message, ...]], int]:
    def count(messages: tuple[Message, ...]) -> int:
        return len(engine.backend.tokenize(engine.render(ChatRequest(messages, "", 0.0, 1)).text))
    return count


def start_engine(folder: Path, kv_cache_megabytes: int) -> Engine:
    """A fresh backend and engine, as a restarted server makes them."""
    settings = load_settings(folder / "settings.json", {
        "contextLength": CONTEXT_LENGTH, "parallelSlots": 1,
        "kvCacheDiskMegabytes": kv_cache_megabytes}, environ={})
    return engine_from_settings(settings, load_backend(settings, locate_model(settings)))


def ask(engine: Engine, messages: tuple[Message, ...]) -> tuple[float, Done]:
    """Seconds to the first text, and the final event."""
    started = time.monotonic()
    first: float | None = None
    for event in engine.submit(ChatRequest(messages, "", 0.0, REPLY_TOKENS)).events():
        if isinstance(event, Delta) and event.text and first is None:
            first = time.monotonic() - started
        if not isinstance(event, Delta):
            assert isinstance(event, Done), event
            return (first if first is not None else time.monotonic() - started), event
    raise RuntimeError("the reply never ended")


def next_turn(workspace: Path, saved: Path | None,
              messages: tuple[Message, ...]) -> tuple[float, Done]:
    """Start fresh (with a copy of the ``saved`` folder, or no KV cache) and ask the next turn."""
    folder = Path(tempfile.mkdtemp(dir=workspace))
    if saved is not None:
        shutil.copytree(saved, folder / "kv-cache")
    engine = start_engine(folder, 4096 if saved is not None else 0)
    try:
        return ask(engine, messages)
    finally:
        engine.stop(drain_seconds=1)
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    load_before = load_average()
    with tempfile.TemporaryDirectory() as workspace_name:
        workspace = Path(workspace_name)
        first_folder = workspace / "first"
        first_folder.mkdir()
        engine = start_engine(first_folder, 4096)
        conversation = long_conversation(prompt_counter(engine), args.tokens)
        _, first = ask(engine, conversation)
        # What the engine's thread spends saving a dropped slot: the backend's forget, timed
        # here while the engine is idle, as the engine calls it when it gives the slot away.
        started = time.perf_counter()
        engine.backend.forget(0, 0)
        save_s = time.perf_counter() - started
        engine.stop(drain_seconds=1)
        saved = first_folder / "kv-cache"
        saved_mb = sum(p.stat().st_size for p in saved.rglob("*.kvstate")) / 2**20
        turn = (*conversation, Message(ASSISTANT, first.text), Message(USER, NEXT_QUESTION))
        rows = []
        for round_ in range(args.rounds):
            order = ("restored", "cold") if round_ % 2 == 0 else ("cold", "restored")
            results = {kind: next_turn(workspace, saved if kind == "restored" else None, turn)
                       for kind in order}
            rows.append(results)
    ratios = [r["restored"][0] / r["cold"][0] for r in rows]
    print(f"machine: {cpu_model() or platform.processor()}, Python {platform.python_version()}; "
          f"load average before {load_before[0]:.2f}, after {load_average()[0]:.2f}")
    print(f"conversation: {first.prompt_tokens} prompt tokens at the first turn; saved state "
          f"{saved_mb:.1f} MB, saved in {save_s * 1000:.0f} ms "
          f"({save_s * 1000 / saved_mb:.1f} ms/MB); next turn at temperature 0, "
          f"{REPLY_TOKENS} new tokens at most\n")
    print("| round | restored: TTFT s | cached tokens | cold: TTFT s | prompt tokens | "
          "restored ÷ cold | same reply |")
    print("|---|---|---|---|---|---|---|")
    for round_, (r, ratio) in enumerate(zip(rows, ratios), 1):
        (restored_s, restored), (cold_s, cold) = r["restored"], r["cold"]
        print(f"| {round_} | {restored_s:.3f} | {restored.cached_tokens} | {cold_s:.3f} | "
              f"{cold.prompt_tokens} | {ratio:.3f} | {restored.text == cold.text} |")
    median = statistics.median(ratios)
    print(f"\nmedian restored ÷ cold time to first token: {median:.3f} (goal ≤ 0.3: "
          f"{'met' if median <= 0.3 else 'missed'})")


if __name__ == "__main__":
    main()
