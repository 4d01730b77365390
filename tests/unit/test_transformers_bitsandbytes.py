"""bitsandbytes' 8-bit and 4-bit weights as the cuda plans load them, on its CPU backend."""

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


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_the_cuda_plans_bitsandbytes_weights_load_and_decode(tmp_path, model_folder, quantization):
    """The plan's BitsAndBytesConfig through from_pretrained, on bitsandbytes' CPU backend:
    everything of the cuda load but the GPU placement."""
    import bitsandbytes as bnb
    plan = loading_config(plan_settings(device="cuda", quantization=quantization), GPU_BOX)
    on_cpu = dataclasses.replace(plan, device="cpu", max_memory={"cpu": "2GiB"})
    location = ModelLocation(model_folder, "transformers", False)
    quantized = TransformersBackend.load_planned(settings_for(tmp_path), location, on_cpu)
    kind = bnb.nn.Linear8bitLt if quantization == "8bit" else bnb.nn.Linear4bit
    assert isinstance(quantized.model.model.layers[0].mlp.down_proj, kind)
    (tmp_path / "fp32").mkdir()
    reference = TransformersBackend.load(settings_for(tmp_path / "fp32"), location)
    tokens = prompt_tokens(reference, "What is 2 + 2?")
    logits = prefill(quantized, 0, tokens)
    assert np.isfinite(logits).all()
    assert np.corrcoef(logits, prefill(reference, 0, tokens))[0, 1] > 0.9
