"""The transformers backend on the real SmolLM2-135M-Instruct GGUF, at temperature 0: replies
batched with other replies equal replies generated alone, the CPU's 8-bit fallback (torch int8)
still answers correctly, and a GGUF file reaches bitsandbytes through a staged folder."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest

from tanglebox.backends import load_backend
from tanglebox.backends.transformers.backend import TransformersBackend
from tanglebox.backends.transformers.plan import DeviceInfo, loading_config
from tanglebox.chat_request import ChatRequest
from tanglebox.engine import Done, Engine
from tanglebox.model_location import locate_model
from tanglebox.prompting import USER, Message
from tanglebox.settings import load_settings
from tests.replies import collect_reply

pytestmark = pytest.mark.real_model
pytest.importorskip("transformers")


def start_engine(tmp_path_factory, **values) -> Engine:
    settings = load_settings(tmp_path_factory.mktemp("settings") / "settings.json",
                             {"backend": "transformers", "contextLength": 1024, **values})
    engine = Engine(load_backend(settings, locate_model(settings)), "auto")
    engine.start()
    return engine


def reply(generation) -> tuple[str, Done]:
    streamed, done = collect_reply(generation)
    assert isinstance(done, Done), done
    return streamed, done


def request(question: str, max_new_tokens: int = 40) -> ChatRequest:
    return ChatRequest((Message(USER, question),), "", 0.0, max_new_tokens)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    engine = start_engine(tmp_path_factory, parallelSlots=3)
    yield engine
    engine.stop(drain_seconds=5)


def test_replies_generated_together_equal_replies_generated_alone(engine):
    questions = ["What is the capital of France?", "What is 2 + 2?", "Name three colours."]
    alone = [reply(engine.submit(request(q)))[1].text for q in questions]
    together = [engine.submit(request(q)) for q in questions]  # one batched forward per step
    results = [reply(generation) for generation in together]
    assert [done.text for _, done in results] == alone
    assert all(streamed == done.text for streamed, done in results)
    assert "Paris" in alone[0] and "4" in alone[1]


def test_cpu_8bit_falls_back_to_torch_int8_and_still_answers(tmp_path_factory, caplog):
    engine = start_engine(tmp_path_factory, use8BitCompression=True, parallelSlots=1)
    try:
        assert any("torch's dynamic int8" in record.getMessage() for record in caplog.records)
        layer = engine.backend.model.model.layers[0].mlp.down_proj
        assert "quantized" in type(layer).__module__
        _, done = reply(engine.submit(request("What is the capital of France?")))
        assert "Paris" in done.text
    finally:
        engine.stop(drain_seconds=5)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="bitsandbytes not installed (pip install bitsandbytes==0.50.2)")
def test_a_gguf_file_reaches_bitsandbytes_through_a_staged_folder(tmp_path):
    """The cuda plan for a GGUF file with use8BitCompression, placed on the CPU (bitsandbytes
    runs there too): transformers refuses a quantization_config beside gguf_file, so the file is
    dequantized to a temporary folder and quantized from there."""
    import bitsandbytes as bnb
    settings = load_settings(tmp_path / "settings.json",
                             {"backend": "transformers", "use8BitCompression": True,
                              "parallelSlots": 1, "contextLength": 1024})
    location = locate_model(settings)
    gpu_box = DeviceInfo(cuda_devices=1, bitsandbytes=True, cpu_available_bytes=2**33)
    plan = loading_config({**settings.values, "device": "cuda"}, gpu_box, gguf=location.gguf)
    assert plan.stage_gguf
    on_cpu = dataclasses.replace(plan, device="cpu", max_memory={"cpu": "4GiB"})
    backend = TransformersBackend.load_planned(settings, location, on_cpu)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in backend.model.modules())
    engine = Engine(backend, "auto")
    engine.start()
    try:
        _, done = reply(engine.submit(request("What is the capital of France?")))
        assert "Paris" in done.text
    finally:
        engine.stop(drain_seconds=5)
