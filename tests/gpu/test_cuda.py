"""The transformers backend on an NVIDIA GPU: the real SmolLM2 GGUF in fp16, 8-bit and 4-bit
(bitsandbytes), within a VRAM limit with CPU offload, and over two GPUs. Skipped, with the
reason, where CUDA (or bitsandbytes, for the quantized loads) is absent."""

from __future__ import annotations

import importlib.util
import logging

import pytest

torch = pytest.importorskip("torch")

from tanglebox.backends import load_backend  # noqa: E402
from tanglebox.chat_request import ChatRequest  # noqa: E402
from tanglebox.engine import Done, Engine  # noqa: E402
from tanglebox.model_location import locate_model  # noqa: E402
from tanglebox.prompting import USER, Message  # noqa: E402
from tanglebox.settings import load_settings  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.real_model]
if not torch.cuda.is_available():
    pytest.skip("CUDA not available", allow_module_level=True)
needs_bitsandbytes = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes not installed (pip install bitsandbytes==0.50.2)")


def load(tmp_path, **values):
    settings = load_settings(tmp_path / "settings.json",
                             {"backend": "transformers", "device": "cuda", "contextLength": 1024,
                              "parallelSlots": 2, **values})
    return load_backend(settings, locate_model(settings))


def answer(backend, question: str) -> str:
    engine = Engine(backend, "auto")
    engine.start()
    try:
        generation = engine.submit(ChatRequest((Message(USER, question),), "", 0.0, 40))
        done = [event for event in generation.events() if isinstance(event, Done)][-1]
        return done.text
    finally:
        engine.stop(drain_seconds=5)  # also closes the backend


def allocated_after_load(tmp_path, **values) -> tuple[int, str]:
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    backend = load(tmp_path, **values)
    used = torch.cuda.memory_allocated() - before
    return used, answer(backend, "What is the capital of France?")


@pytest.mark.parametrize("quantization", [
    "none",
    pytest.param("8bit", marks=needs_bitsandbytes),
    pytest.param("4bit", marks=needs_bitsandbytes),
])
def test_loads_on_the_gpu_and_answers(tmp_path, quantization):
    backend = load(tmp_path, quantization=quantization)
    assert backend.device == "cuda"
    assert {p.device.type for p in backend.model.parameters()} == {"cuda"}
    # cuDNN's attention plans itself at every decode step: 3x slower steps (docs/benchmarks.md)
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    if quantization != "none":
        import bitsandbytes as bnb
        kind = bnb.nn.Linear8bitLt if quantization == "8bit" else bnb.nn.Linear4bit
        assert any(isinstance(module, kind) for module in backend.model.modules())
    text = answer(backend, "What is the capital of France?")
    if quantization == "4bit":
        assert text.strip()  # NF4 may cost a 135M model its facts; it must still generate
    else:
        assert "Paris" in text


@needs_bitsandbytes
def test_quantized_weights_take_less_gpu_memory(tmp_path):
    used = {}
    for quantization in ("none", "8bit", "4bit"):
        folder = tmp_path / quantization
        folder.mkdir()
        used[quantization], text = allocated_after_load(folder, quantization=quantization)
        assert text.strip()
    assert used["4bit"] < used["8bit"] < used["none"]


@needs_bitsandbytes
def test_use8bitcompression_keeps_its_original_meaning(tmp_path):
    backend = load(tmp_path, use8BitCompression=True)
    assert getattr(backend.model, "is_loaded_in_8bit", False)
    backend.close()


def test_what_does_not_fit_in_vram_runs_from_cpu_memory_with_a_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    backend = load(tmp_path, vRamGb=0.1)  # about a third of the fp16 model
    placed = set(backend.model.hf_device_map.values())
    assert "cpu" in placed and placed & {0, "cuda:0"}
    assert any("did not fit" in record.getMessage() for record in caplog.records)
    assert "Paris" in answer(backend, "What is the capital of France?")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_spreads_over_two_gpus(tmp_path):
    backend = load(tmp_path, numberOfGpus=2, vRamGb=0.15)
    placed = set(backend.model.hf_device_map.values())
    assert {0, 1} <= placed
    assert "Paris" in answer(backend, "What is the capital of France?")
