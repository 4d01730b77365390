"""bitsandbytes' 8-bit and 4-bit weights as the cuda plans load them, on its CPU backend, and
the repacking of 4-bit weights that bitsandbytes 0.50 does on CPUs with AVX512-BF16 (Intel
Sapphire Rapids and later, AMD Zen 4 and later), forced here on any CPU."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tanglebox.backends.transformers.backend import TransformersBackend  # noqa: E402
from tanglebox.backends.transformers.plan import loading_config  # noqa: E402
from tanglebox.model_location import ModelLocation  # noqa: E402
from tests.loading_plans import GPU_BOX, plan_settings, settings_for  # noqa: E402
from tests.tiny_llama import prefill, prompt_tokens, save_tiny_llama  # noqa: E402

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes not installed (pip install bitsandbytes==0.50.2); it runs on the CPU too")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def avx512_bf16(monkeypatch):
    """bitsandbytes takes this CPU for one with AVX512-BF16: each 4-bit layer built from now on
    repacks its weight for that kernel at its first forward on the CPU.

    The repacking is plain torch, so it runs anywhere; the kernel for the repacked weights
    exists only on such CPUs (elsewhere the generic kernel reads them as noise), so tests with
    this fixture check the repacking, and the logits only of layers that were not repacked.
    """
    import bitsandbytes.nn.modules
    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)


def load_with_the_cuda_plan(tmp_path, folder, quantization: str) -> TransformersBackend:
    """The cuda plan, with the whole model in CPU memory."""
    plan = loading_config(plan_settings(device="cuda", quantization=quantization), GPU_BOX)
    on_cpu = dataclasses.replace(plan, device="cpu", max_memory={"cpu": "2GiB"})
    location = ModelLocation(folder, "transformers", False)
    return TransformersBackend.load_planned(settings_for(tmp_path), location, on_cpu)


def fp32_logits(tmp_path, folder, tokens: list[int]) -> np.ndarray:
    (tmp_path / "fp32").mkdir()
    location = ModelLocation(folder, "transformers", False)
    return prefill(TransformersBackend.load(settings_for(tmp_path / "fp32"), location), 0, tokens)


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_the_cuda_plans_bitsandbytes_weights_load_and_decode(tmp_path, model_folder, quantization):
    """The plan's BitsAndBytesConfig through from_pretrained, on bitsandbytes' CPU backend:
    everything of the cuda load but the GPU placement."""
    import bitsandbytes as bnb
    quantized = load_with_the_cuda_plan(tmp_path, model_folder, quantization)
    kind = bnb.nn.Linear8bitLt if quantization == "8bit" else bnb.nn.Linear4bit
    assert isinstance(quantized.model.model.layers[0].mlp.down_proj, kind)
    tokens = prompt_tokens(quantized, "What is 2 + 2?")
    logits = prefill(quantized, 0, tokens)
    assert np.isfinite(logits).all()
    assert np.corrcoef(logits, fp32_logits(tmp_path, model_folder, tokens))[0, 1] > 0.9


def test_the_test_models_4bit_weights_take_the_avx512_bf16_repacking_losslessly(
        tmp_path, model_folder, avx512_bf16):
    """The test above, on a CPU with AVX512-BF16: every layer of the tiny model repacks."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    quantized = load_with_the_cuda_plan(tmp_path, model_folder, "4bit")
    layers = [m for m in quantized.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    weights = [layer.weight.data.clone() for layer in layers]
    prefill(quantized, 0, prompt_tokens(quantized, "What is 2 + 2?"))  # the first forward
    assert len(layers) == 14  # 7 per layer: q, k, v, o, gate, up, down
    for layer, weight in zip(layers, weights):
        assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False), layer
        unpacked, _ = _convert_weight_packed_for_cpu_inverse(layer.weight.data,
                                                             layer.weight.quant_state)
        assert torch.equal(unpacked, weight)


def test_4bit_layers_too_narrow_to_repack_keep_the_generic_kernel_and_answer(
        tmp_path_factory, tmp_path, avx512_bf16):
    """No layer here can repack: rows shorter than a quantization block (hidden size 32 < 64,
    as in the test model that failed on such CPUs with "shape '[32, 0]' is invalid"), or
    out_features not a multiple of 32 (key/value 16, MLP 48). They answer, as elsewhere."""
    import bitsandbytes as bnb
    narrow = save_tiny_llama(tmp_path_factory.mktemp("narrow-llama"), hidden_size=32,
                             intermediate_size=48)
    quantized = load_with_the_cuda_plan(tmp_path, narrow, "4bit")
    tokens = prompt_tokens(quantized, "What is 2 + 2?")
    logits = prefill(quantized, 0, tokens)
    layers = [m for m in quantized.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
                              for layer in layers)
    assert np.isfinite(logits).all()
    assert np.corrcoef(logits, fp32_logits(tmp_path, narrow, tokens))[0, 1] > 0.9
