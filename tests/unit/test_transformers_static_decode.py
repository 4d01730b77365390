"""The transformers backend's static decode path (static_decode.py) against the dynamic one, on
the tiny random Llama of tests/tiny_llama.py: the same greedy tokens and close logits while
slots join, leave, rewind and take new turns, across compactions and growth of the static cache;
compiled with torch.compile on the CPU where inductor has a C++ compiler, and with CUDA graphs
where cuda is available. The setting ``transformersDecode`` and what it picks per device."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tanglebox.backends.base import DecodeItem  # noqa: E402
from tanglebox.backends.transformers.backend import TransformersBackend  # noqa: E402
from tanglebox.backends.transformers.static_decode import decode_kind  # noqa: E402
from tanglebox.chat_request import ChatRequest  # noqa: E402
from tanglebox.engine import Engine  # noqa: E402
from tanglebox.model_location import ModelLocation  # noqa: E402
from tanglebox.prompting import USER, Message  # noqa: E402
from tanglebox.settings import SettingsError, load_settings  # noqa: E402
from tests.loading_plans import settings_for  # noqa: E402
from tests.replies import collect_reply  # noqa: E402
from tests.tiny_llama import prompt_tokens, save_tiny_llama  # noqa: E402

SLOTS = 4
TEXTS = ("What is 2 + 2?", "hi", "Tell me a long story about dragons, please.", "Why is it blue?")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def loaded(tmp_path, model_folder):
    backend = TransformersBackend.load(settings_for(tmp_path, parallelSlots=SLOTS),
                                       ModelLocation(model_folder, "transformers", False))
    yield backend
    backend.close()


def twin(backend: TransformersBackend, decode: str,
         context_length: int | None = None) -> TransformersBackend:
    """Another backend on the same weights, decoding ``decode``."""
    return TransformersBackend(backend.model, backend.tokenizer, model_name="m", device="cpu",
                               context_length=context_length or backend.context_length,
                               max_sequences=SLOTS, batch_tokens=64, decode=decode)


def drive(backend: TransformersBackend, steps: int = 14) -> dict[int, list[np.ndarray]]:
    """A scripted run, greedy: every call's logits per slot. Slots 0 and 1 start together;
    slot 2's prompt arrives beside the streams; slot 1's reply ends; slot 3 starts; slot 0
    rewinds three tokens and goes on; slot 1 takes a new turn (a prompt chunk after a rewind);
    slot 2 is forgotten and starts over; slot 3 pauses two steps."""
    prompts = [prompt_tokens(backend, text) for text in TEXTS]
    fed: dict[int, list[int]] = {slot: [] for slot in range(SLOTS)}
    seen: dict[int, list[np.ndarray]] = {slot: [] for slot in range(SLOTS)}
    pending: dict[int, int] = {}
    generating: set[int] = set()

    def call(chunks: list[tuple[int, list[int]]]) -> None:
        items = [DecodeItem(slot, [pending.pop(slot, int(np.argmax(seen[slot][-1])))],
                            len(fed[slot])) for slot in sorted(generating)]
        items += [DecodeItem(slot, tokens, len(fed[slot])) for slot, tokens in chunks]
        for item, logits in zip(items, backend.decode(items)):
            fed[item.slot].extend(item.tokens)
            seen[item.slot].append(logits)
        generating.update(slot for slot, _ in chunks)

    call([(0, prompts[0]), (1, prompts[1])])
    for step in range(steps):
        chunks = []
        if step == 2:
            chunks.append((2, prompts[2]))
        if step == 4:
            generating.discard(1)
        if step == 5:
            chunks.append((3, prompts[3]))
        if step == 6:
            keep = len(fed[0]) - 3
            backend.forget(0, keep)
            pending[0] = fed[0][keep]  # the same token again: the same logits again
            del fed[0][keep:]
        if step == 8:
            keep = len(prompts[1]) + 1
            backend.forget(1, keep)
            del fed[1][keep:]
            chunks.append((1, prompts[3][:6]))
        if step == 10:
            backend.forget(2, 0)
            fed[2] = []
            generating.discard(2)
            chunks.append((2, prompts[0]))
        if step == 11:
            generating.discard(3)  # slot 3 pauses two steps, then goes on token by token
        if step == 13:
            generating.add(3)
        call(chunks)
    return seen


def assert_same_run(got: dict[int, list[np.ndarray]], expected: dict[int, list[np.ndarray]],
                    atol: float = 1e-4) -> None:
    for slot in range(SLOTS):
        assert ([int(np.argmax(logits)) for logits in got[slot]]
                == [int(np.argmax(logits)) for logits in expected[slot]]), f"slot {slot}"
        assert len(got[slot]) == len(expected[slot])
        for index, (a, b) in enumerate(zip(got[slot], expected[slot])):
            np.testing.assert_allclose(a, b, rtol=atol, atol=atol,
                                       err_msg=f"slot {slot}, call {index}")


def test_static_steps_give_the_dynamic_tokens_as_slots_join_leave_and_rewind(loaded):
    dynamic = drive(twin(loaded, "dynamic"))
    static_backend = twin(loaded, "static")
    assert static_backend.decode_kind == "static"
    static = drive(static_backend)
    assert_same_run(static, dynamic)
    # Slot 0, rewound at step 6 to the token it was fed at step 3, saw the same logits again.
    np.testing.assert_allclose(static[0][7], static[0][4], rtol=1e-4, atol=1e-4)


def test_one_stream_steps_on_the_static_cache(loaded):
    backend = twin(loaded, "static")
    tokens = prompt_tokens(backend, "hi")
    first = backend.decode([DecodeItem(0, tokens, 0)])[0]
    backend.decode([DecodeItem(0, [int(np.argmax(first))], len(tokens))])
    assert backend._static.holds(0)  # a lone stream is not left to the dynamic path


def test_the_static_cache_compacts_and_grows_with_the_same_results(loaded):
    expected = drive(twin(loaded, "dynamic"), steps=60)
    backend = twin(loaded, "dynamic", context_length=100)
    backend.use_decode("static", columns=16)  # 16 columns to start with: soon full
    got = drive(backend, steps=60)
    # It grew from 16 columns to its cap (contextLength + 1) and compacted again there.
    assert backend._static.columns == 101 and backend._static.compactions >= 2
    assert_same_run(got, expected)


def test_switching_decoding_gives_the_static_rows_back_to_the_slots(loaded):
    def run(backend: TransformersBackend, switch: bool) -> np.ndarray:
        tokens = prompt_tokens(backend, "What is 2 + 2?")
        last = backend.decode([DecodeItem(0, tokens, 0)])[0]
        for position in range(len(tokens), len(tokens) + 3):
            last = backend.decode([DecodeItem(0, [int(np.argmax(last))], position)])[0]
        if switch:
            backend.use_decode("dynamic")
        return backend.decode([DecodeItem(0, [5, 6], len(tokens) + 3)])[0]

    static = twin(loaded, "static")
    got = run(static, switch=True)
    assert static.decode_kind == "dynamic"
    np.testing.assert_allclose(got, run(twin(loaded, "dynamic"), switch=False),
                               rtol=1e-4, atol=1e-4)


def engine_replies(backend: TransformersBackend) -> tuple[list[str], int]:
    """Replies through the engine: one alone, then three at once, then a next turn that
    reuses the first conversation's cached prefix; and the static cache's columns (0: none)."""
    engine = Engine(backend, "auto")
    engine.start()
    try:
        first = ChatRequest((Message(USER, "Hello there"),), "", 0.0, 12)
        alone, _ = collect_reply(engine.submit(first))
        texts = [alone]
        together = [engine.submit(ChatRequest((Message(USER, text),), "", 0.0, 12))
                    for text in TEXTS[:3]]
        texts += [collect_reply(generation)[0] for generation in together]
        follow = ChatRequest((Message(USER, "Hello there"), Message("assistant", alone),
                              Message(USER, "And then?")), "", 0.0, 12)
        texts.append(collect_reply(engine.submit(follow))[0])
        return texts, backend._static.columns if backend._static else 0
    finally:
        engine.stop(drain_seconds=5)


def test_replies_through_the_engine_are_the_same_static_and_dynamic(loaded):
    static, static_columns = engine_replies(twin(loaded, "static"))
    dynamic, dynamic_columns = engine_replies(twin(loaded, "dynamic"))
    assert static == dynamic
    assert static_columns and not dynamic_columns  # the static cache took the steps


def _has_cpp_compiler() -> bool:
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not _has_cpp_compiler(), reason="torch.compile's inductor needs a C++ "
                    "compiler on the CPU (g++ or clang++), and none is installed")
def test_the_compiled_static_step_gives_the_dynamic_tokens_on_the_cpu(loaded):
    expected = drive(twin(loaded, "dynamic"), steps=8)
    backend = twin(loaded, "compiled")
    got = drive(backend, steps=8)
    assert backend._static.compiled  # it compiled: no fallback to eager steps
    assert_same_run(got, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need cuda")
def test_cuda_graphs_capture_the_static_step(tmp_path, model_folder):
    from torch._dynamo.utils import counters
    backend = TransformersBackend.load(settings_for(tmp_path, device="cuda", parallelSlots=SLOTS,
                                                    transformersDecode="static"),
                                       ModelLocation(model_folder, "transformers", False))
    assert backend.decode_kind == "compiled"  # static on cuda
    counters.clear()
    got = drive(backend, steps=8)
    assert backend._static.compiled
    assert counters["inductor"]["cudagraph_skips"] == 0
    backend.use_decode("dynamic")
    assert_same_run(got, drive(backend, steps=8), atol=2e-2)  # fp16 on the GPU


@pytest.mark.parametrize("setting, device, kind", [
    ("auto", "cpu", "dynamic"), ("auto", "mps", "dynamic"), ("auto", "cuda", "dynamic"),
    ("static", "cpu", "static"), ("static", "cuda", "compiled"), ("dynamic", "cuda", "dynamic"),
])
def test_transformers_decode_picks_the_path_per_device(setting, device, kind):
    assert decode_kind(setting, device) == kind


def test_the_loaded_backend_follows_the_setting(tmp_path, model_folder):
    location = ModelLocation(model_folder, "transformers", False)
    assert TransformersBackend.load(settings_for(tmp_path), location).decode_kind == "dynamic"
    (tmp_path / "static").mkdir()
    static = TransformersBackend.load(settings_for(tmp_path / "static",
                                                   transformersDecode="static"), location)
    assert static.decode_kind == "static"


def test_a_wrong_transformers_decode_names_the_values(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"transformersDecode": "fast"}))
    with pytest.raises(SettingsError, match='"transformersDecode" must be one of auto, static, '
                                            'dynamic; got "fast"'):
        load_settings(path)
