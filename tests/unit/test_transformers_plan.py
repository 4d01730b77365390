"""The transformers loading plan for every device and quantization, with torch, transformers,
bitsandbytes and accelerate made unimportable: the plan is decided without them (and these
tests run where they are not installed)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tanglebox.backends.base import BackendError
from tanglebox.backends.transformers.plan import (DeviceInfo, device_problem, loading_config,
                                                  offload_warning)
from tests.conftest import ROOT
from tests.loading_plans import CPU_BOX, GIB, GPU_BOX, plan_settings, settings_for

HEAVY = ("torch", "transformers", "bitsandbytes", "accelerate")


@pytest.fixture(autouse=True)
def without_torch(monkeypatch):
    """An import of torch (or the others) now fails, as on a machine without them."""
    for name in HEAVY:
        monkeypatch.setitem(sys.modules, name, None)


def test_the_plan_module_imports_and_plans_where_torch_cannot_be_imported():
    script = textwrap.dedent(f"""
        import json, sys
        for name in {HEAVY!r}:
            sys.modules[name] = None
        from tanglebox.backends.transformers.plan import DeviceInfo, loading_config
        from tanglebox.settings import defaults
        settings = defaults()
        settings.update(backend="transformers", device="cuda", quantization="4bit")
        plan = loading_config(settings, DeviceInfo(cuda_devices=1, bitsandbytes=True))
        print(json.dumps([plan.device, plan.quantization, plan.dtype, plan.device_map]))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["cuda", "4bit", "float16", "auto"]


# -- what each device gets -------------------------------------------------------------------


def test_cpu_plan_is_float32_weights_loaded_without_a_device_map():
    plan = loading_config(plan_settings(device="cpu"), CPU_BOX)
    assert (plan.device, plan.quantization, plan.dtype) == ("cpu", "none", "float32")
    assert plan.device_map is None and plan.max_memory is None
    assert plan.batch_tokens == 256 and plan.warnings == ()


def test_cuda_plan_is_float16_spread_by_accelerate_within_vram_with_cpu_offload_room():
    plan = loading_config(plan_settings(device="cuda", numberOfGpus=2, vRamGb=8), GPU_BOX)
    assert (plan.device, plan.quantization, plan.dtype) == ("cuda", "none", "float16")
    assert plan.device_map == "auto"
    assert plan.max_memory == {0: "8GiB", 1: "8GiB", "cpu": "57GiB"}
    assert plan.batch_tokens == 1024


@pytest.mark.parametrize("values, quantization", [
    ({"use8BitCompression": True}, "8bit"),
    ({"quantization": "8bit"}, "8bit"),
    ({"quantization": "4bit"}, "4bit"),
    ({"use8BitCompression": True, "quantization": "none"}, "none"),
])
def test_cuda_quantization_follows_the_settings(values, quantization):
    plan = loading_config(plan_settings(device="cuda", **values), GPU_BOX)
    assert plan.quantization == quantization and plan.dtype == "float16"


def test_cuda_memory_limits_count_only_the_gpus_present_and_vram_zero_means_their_own():
    plan = loading_config(plan_settings(device="cuda", numberOfGpus=4, vRamGb=0), GPU_BOX)
    assert plan.max_memory == {0: 20 * GIB, 1: 22 * GIB, "cpu": "57GiB"}
    assert any("numberOfGpus" in note for note in plan.warnings)


def test_mps_plan_is_float16_on_the_apple_gpu():
    plan = loading_config(plan_settings(device="mps"), DeviceInfo(mps=True))
    assert (plan.device, plan.quantization, plan.dtype) == ("mps", "none", "float16")
    assert plan.device_map == {"": "mps"} and plan.max_memory is None


def test_from_pretrained_arguments_need_torch_and_say_how_to_install_it():
    plan = loading_config(plan_settings(device="cpu"), CPU_BOX)
    with pytest.raises(BackendError, match="pip install -r requirements-transformers.txt"):
        plan.from_pretrained  # the dtype is torch's


def test_a_gpu_device_on_a_machine_without_torch_says_how_to_install_it():
    assert "requirements-transformers.txt" in device_problem("cuda")


# -- what cannot work here, and warnings ----------------------------------------------------


def test_cpu_4bit_is_refused_in_one_line_naming_the_key_and_file(tmp_path):
    settings = settings_for(tmp_path, quantization="4bit")
    with pytest.raises(BackendError) as caught:
        loading_config(settings, CPU_BOX)
    message = str(caught.value)
    assert "\n" not in message and "settings.json" in message and "\"quantization\"" in message


def test_cpu_8bit_is_refused_when_torch_has_no_int8_engine():
    with pytest.raises(BackendError, match="quantization"):
        loading_config(plan_settings(quantization="8bit"), DeviceInfo(cpu_int8=False))


def test_gguf_with_bitsandbytes_is_staged_through_a_folder():
    settings = plan_settings(device="cuda", quantization="4bit")
    assert loading_config(settings, GPU_BOX, gguf=True).stage_gguf
    assert not loading_config(settings, GPU_BOX, gguf=False).stage_gguf
    assert not loading_config(plan_settings(device="cuda"), GPU_BOX, gguf=True).stage_gguf


def test_cuda_quantization_without_bitsandbytes_says_how_to_install_it():
    box = DeviceInfo(cuda_devices=1, cpu_available_bytes=8 * GIB)
    with pytest.raises(BackendError, match="pip install bitsandbytes"):
        loading_config(plan_settings(device="cuda", quantization="8bit"), box)
    assert loading_config(plan_settings(device="cuda"), box).quantization == "none"


def test_cuda_on_a_machine_without_cuda_is_one_line_with_the_fix():
    with pytest.raises(BackendError) as caught:
        loading_config(plan_settings(device="cuda"), CPU_BOX)
    assert "torch.cuda.is_available() is False" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_offload_warning_only_when_part_of_the_model_left_the_gpus():
    settings = plan_settings(numberOfGpus=1, vRamGb=4)
    on_gpu = {"model.embed_tokens": 0, "model.layers": 0, "lm_head": 0}
    assert offload_warning(on_gpu, settings) is None
    assert "1 of 1 parts" in offload_warning({"": "cpu"}, settings)
    assert offload_warning(None, settings) is None
    split = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu",
             "lm_head": "cpu"}
    assert "2 of 4 parts" in offload_warning(split, settings)
