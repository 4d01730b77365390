"""How to load a model, decided from the settings and what the machine has, without torch.

:func:`loading_config` is one pure function of the settings and a :class:`DeviceInfo` (probed
on the machine, or written by a test), so every combination is unit-tested without a GPU and
without torch installed:

- cuda: fp16. ``quantization`` 8bit (what ``use8BitCompression`` always meant) or 4bit (NF4,
  double quantization, fp16 compute) through bitsandbytes. ``numberOfGpus`` x ``vRamGb`` become
  accelerate's ``device_map="auto"`` with a per-GPU ``max_memory``; CPU memory takes what does
  not fit, and the load then warns, because those layers run much slower.
- cpu: fp32. 8bit falls back (with a warning) to torch's dynamic int8 quantization of the
  Linear layers: weights stored in int8, activations quantized on the fly. 4bit has no CPU
  fallback and is refused in one line.
- mps: fp16; no quantization.

The plan names dtypes by their torch names; :attr:`LoadingPlan.from_pretrained` turns it into
``from_pretrained``'s keyword arguments, and only that (and probing the machine) imports torch.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from tanglebox.backends.base import BackendError

BITSANDBYTES_INSTALL = "pip install bitsandbytes==0.50.2"
# Tokens per decode call: prompt chunks are cut to this, beside the generating streams.
BATCH_TOKENS = {"cpu": 256, "mps": 512, "cuda": 1024}


@dataclass(frozen=True)
class DeviceInfo:
    """What :func:`loading_config` needs to know about the machine (probed, or given by tests)."""

    cuda_devices: int = 0
    gpu_memory_bytes: tuple[int, ...] = ()  # per CUDA device, for vRamGb 0 (no limit)
    mps: bool = False
    bitsandbytes: bool = False
    cpu_int8: bool = True  # torch has a quantized engine (x86/fbgemm/qnnpack) for int8 on the CPU
    cpu_available_bytes: int = 0  # RAM for what does not fit on the GPUs; 0: unknown

    @classmethod
    def probe(cls) -> DeviceInfo:
        torch = require_torch()
        cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
        # Device properties, not mem_get_info: that would open a CUDA context on every GPU.
        memory = tuple(torch.cuda.get_device_properties(i).total_memory for i in range(cuda))
        mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
        engines = set(torch.backends.quantized.supported_engines) - {"none"}
        return cls(cuda_devices=cuda, gpu_memory_bytes=memory, mps=mps,
                   bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None,
                   cpu_int8=bool(engines), cpu_available_bytes=_available_ram())


@dataclass(frozen=True)
class LoadingPlan:
    device: str  # "cpu", "cuda" or "mps"
    quantization: str  # "none", "8bit" or "4bit" (bitsandbytes), "int8" (torch, on the CPU)
    dtype: str  # the weights' torch dtype by name: "float32" or "float16"
    device_map: str | dict[str, str] | None = None  # accelerate's; None: load on the CPU
    max_memory: dict[int | str, int | str] | None = None  # per device, for device_map "auto"
    stage_gguf: bool = False  # a GGUF file for bitsandbytes: dequantize to a folder first
    batch_tokens: int = 256
    warnings: tuple[str, ...] = ()
    # More keyword arguments for from_pretrained (the benchmark's disable_mmap, say).
    extra_arguments: Mapping[str, Any] = field(default_factory=dict)

    @property
    def from_pretrained(self) -> dict[str, Any]:
        """The keyword arguments for ``from_pretrained``; this imports torch (and transformers,
        for a bitsandbytes quantization)."""
        torch = require_torch()
        arguments: dict[str, Any] = {"dtype": getattr(torch, self.dtype)}
        if self.device_map is not None:
            arguments["device_map"] = self.device_map
        if self.max_memory is not None:
            arguments["max_memory"] = self.max_memory
        if self.quantization in ("8bit", "4bit"):
            arguments["quantization_config"] = bitsandbytes_config(self.quantization)
        return {**arguments, **self.extra_arguments}


def requested_quantization(settings: Mapping[str, Any]) -> str:
    """``quantization``, where ``auto`` follows the original's ``use8BitCompression``."""
    quantization = settings["quantization"]
    if quantization == "auto":
        return "8bit" if settings["use8BitCompression"] else "none"
    return quantization


def loading_config(settings: Mapping[str, Any], device: DeviceInfo,
                   gguf: bool = False) -> LoadingPlan:
    """Plan how to load the model; raise BackendError (one line) for what cannot work here."""
    where = _where(settings)
    name, quantization = settings["device"], requested_quantization(settings)
    notes: list[str] = []
    if settings["use8BitCompression"] and quantization != "8bit":
        notes.append(f"\"use8BitCompression\" is ignored: \"quantization\" is {quantization}")

    if name == "cuda":
        if device.cuda_devices == 0:
            raise BackendError(f"{where}\"device\" is cuda, but {_CUDA_MISSING}")
        if quantization != "none" and not device.bitsandbytes:
            raise BackendError(f"{where}\"quantization\" {quantization} on cuda needs the "
                               f"bitsandbytes package: {BITSANDBYTES_INSTALL} (README: GPUs "
                               "and quantization), or set \"quantization\" to none")
        memory = _max_memory(settings, device, notes)
        return LoadingPlan("cuda", quantization, "float16", device_map="auto", max_memory=memory,
                           stage_gguf=gguf and quantization != "none",
                           batch_tokens=BATCH_TOKENS["cuda"], warnings=tuple(notes))

    if name == "mps":
        if not device.mps:
            raise BackendError(f"{where}\"device\" is mps, but {_MPS_MISSING}")
        if quantization != "none":
            raise BackendError(f"{where}\"quantization\" {quantization} is not available on mps "
                               "(bitsandbytes needs cuda, torch's int8 runs on the CPU); set "
                               "\"quantization\" to none, or \"device\" to cuda or cpu")
        return LoadingPlan("mps", "none", "float16", device_map={"": "mps"},
                           batch_tokens=BATCH_TOKENS["mps"], warnings=tuple(notes))

    if name != "cpu":
        raise BackendError(f"{where}\"device\" {name} is not one the transformers backend runs "
                           "on; set it to cpu, cuda or mps")
    if quantization == "4bit":
        raise BackendError(f"{where}\"quantization\" 4bit needs cuda (bitsandbytes NF4); on cpu "
                           "set \"quantization\" to 8bit (torch int8) or none")
    if quantization == "8bit":
        if not device.cpu_int8:
            raise BackendError(f"{where}\"quantization\" 8bit on cpu needs torch's quantized "
                               "int8 engine, which this torch build lacks; set \"quantization\" "
                               "to none")
        notes.append("8-bit weights (\"use8BitCompression\" / \"quantization\": 8bit) come from "
                     "bitsandbytes on cuda; on cpu the fallback is torch's dynamic int8 "
                     "quantization of the Linear layers")
        quantization = "int8"
    return LoadingPlan("cpu", quantization, "float32", batch_tokens=BATCH_TOKENS["cpu"],
                       warnings=tuple(notes))


def bitsandbytes_config(quantization: str) -> Any:
    """8-bit LLM.int8, or 4-bit NF4 with double quantization and fp16 compute.

    ``llm_int8_enable_fp32_cpu_offload`` lets layers that do not fit within ``vRamGb`` stay on
    the CPU (unquantized) instead of failing the load; the load warns when that happens.
    """
    torch = require_torch()
    from transformers import BitsAndBytesConfig
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=torch.float16,
                              bnb_4bit_use_double_quant=True,
                              llm_int8_enable_fp32_cpu_offload=True)


def _max_memory(settings: Mapping[str, Any], device: DeviceInfo,
                notes: list[str]) -> dict[int | str, int | str]:
    wanted = settings["numberOfGpus"]
    count = min(wanted, device.cuda_devices)
    if wanted > count:
        notes.append(f"\"numberOfGpus\" is {wanted}, but this machine has {count} CUDA "
                     f"device(s); using {count}")
    limit = settings["vRamGb"]
    memory: dict[int | str, int | str] = {}
    for index in range(count):
        if limit > 0:
            memory[index] = f"{limit:g}GiB"
        elif index < len(device.gpu_memory_bytes):
            # vRamGb 0: no limit of ours; accelerate caps it to what the GPU has free.
            memory[index] = device.gpu_memory_bytes[index]
    if device.cpu_available_bytes:
        # Offload room: what does not fit on the GPUs runs from RAM (warned after the load).
        memory["cpu"] = f"{max(1, int(device.cpu_available_bytes * 0.9 / 2**30))}GiB"
    return memory


def offload_warning(device_map: Mapping[str, Any] | None,
                    settings: Mapping[str, Any]) -> str | None:
    """A warning when part of a GPU-loaded model ended up in CPU memory (or on disk).

    Only loads with a device map (cuda, mps) have one; a CPU load has none.
    """
    if not device_map:
        return None
    offloaded = [name for name, where in device_map.items() if where in ("cpu", "disk")]
    if not offloaded:
        return None
    shown = ", ".join(offloaded[:3]) + (", ..." if len(offloaded) > 3 else "")
    return (f"{len(offloaded)} of {len(device_map)} parts of the model ({shown}) did not fit in "
            f"\"numberOfGpus\" {settings['numberOfGpus']} x \"vRamGb\" {settings['vRamGb']:g} "
            "and run from CPU memory, which is much slower; raise \"vRamGb\" or "
            "\"numberOfGpus\", or set \"quantization\" to 8bit or 4bit")


_CUDA_MISSING = ("CUDA is not available on this machine (torch.cuda.is_available() is False); "
                 "install a CUDA build of torch (README: GPUs and quantization) or set "
                 "\"device\" to cpu")
_MPS_MISSING = ("the Apple GPU backend is not available (torch.backends.mps.is_available() is "
                "False; it needs an Apple-silicon Mac and an arm64 build of torch); set "
                "\"device\" to cpu")


def device_problem(device: str) -> str | None:
    """Why this machine cannot run the transformers backend on ``device``, or None."""
    try:
        torch = require_torch()
    except BackendError as err:
        return str(err)
    if device == "cuda" and not torch.cuda.is_available():
        return _CUDA_MISSING
    if device == "mps" and not (getattr(torch.backends, "mps", None)
                                and torch.backends.mps.is_available()):
        return _MPS_MISSING
    return None


def require_torch() -> Any:
    """torch, once torch and transformers are both importable; else BackendError with the fix."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as err:
        raise BackendError(f"the transformers backend needs torch and transformers ({err.name} "
                           "is missing): pip install -r requirements-transformers.txt (for a GPU "
                           "first a CUDA build of torch: README, GPUs and quantization)") from None
    return torch


def _available_ram() -> int:
    try:
        import psutil  # a dependency of accelerate
        return int(psutil.virtual_memory().available)
    except ImportError:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _where(settings: Mapping[str, Any]) -> str:
    path = getattr(settings, "path", None)
    return f"{path.name}: " if path is not None else ""
