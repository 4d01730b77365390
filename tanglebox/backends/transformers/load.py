"""Loading a planned model: its tokenizer and weights, from a model folder or a ``.gguf`` file.

transformers dequantizes a GGUF file's weights at load, and refuses to combine a GGUF file with
a ``quantization_config``; for bitsandbytes the dequantized model is therefore written to a
temporary folder (fp16 safetensors) and loaded from there. A CPU plan for 8-bit weights
quantizes the loaded Linear layers with torch's dynamic int8; 4-bit layers that bitsandbytes'
AVX512-BF16 CPU kernel cannot take keep its generic one. After the load, a warning says
which parts of the model did not fit on the GPUs, and ``contextLength`` is capped to what the
model was trained for.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from tanglebox.backends.base import BackendError
from tanglebox.backends.transformers.plan import LoadingPlan, offload_warning, require_torch
from tanglebox.model_location import ModelLocation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    tokenizer: Any
    context_length: int  # contextLength, capped to what the model was trained for


def load_model(settings: Mapping[str, Any], location: ModelLocation,
               plan: LoadingPlan) -> LoadedModel:
    """Load the tokenizer and the weights as planned; raise BackendError (one line) on failure."""
    for note in plan.warnings:
        log.warning(note)
    verbose = settings["enableModelDebugOutput"]
    if verbose:
        log.info("transformers: loading %s on %s with %s", location.path, plan.device,
                 plan.from_pretrained)
    if plan.device == "cuda":
        _avoid_cudnn_attention()
    with _one_gguf_parse(location.gguf):
        tokenizer = _load_tokenizer(location)
        model = _load_weights(location, plan)
    if plan.quantization == "int8":
        quantize_linear_int8(model)
    if plan.quantization == "4bit":
        _keep_unpackable_4bit_layers_generic(model)
    # accelerate records the map only when it spreads the model over several devices.
    device_map = getattr(model, "hf_device_map", None)
    if device_map is None and plan.device != "cpu":
        device_map = {"": next(model.parameters()).device.type}
    if verbose and device_map:
        log.info("transformers: device map %s", device_map)
    warning = offload_warning(device_map, settings)
    if warning:
        log.warning(warning)
    context = settings["contextLength"]
    trained = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if trained and trained < context:
        log.warning("contextLength %d is above what %s was trained for; using %d",
                    context, location.path.name, trained)
        context = trained
    return LoadedModel(model, tokenizer, context)


def _avoid_cudnn_attention() -> None:
    """Leave cuDNN out of torch's scaled-dot-product attention (flash or memory-efficient run).

    The cuDNN kernel plans itself again whenever the sequence length changes, which it does
    at every decode step: measured on an H100 (torch 2.11, SmolLM2-135M fp16, one stream),
    2.0 ms of CPU per attention call, 60 of a step's 99 ms; without it a step takes 32 ms.
    The setting is process-wide; a Tanglebox process serves one model.
    """
    import torch

    torch.backends.cuda.enable_cudnn_sdp(False)


def _load_tokenizer(location: ModelLocation) -> Any:
    from transformers import AutoTokenizer
    try:
        if location.gguf:
            return AutoTokenizer.from_pretrained(location.path.parent,
                                                 gguf_file=location.path.name,
                                                 local_files_only=True)
        return AutoTokenizer.from_pretrained(location.path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.debug("loading the tokenizer failed", exc_info=True)
        raise BackendError(f"transformers could not load the tokenizer of {location.path.name} "
                           "(a model folder needs its tokenizer files, such as tokenizer.json): "
                           f"{_first_line(err)}") from None


def _load_weights(location: ModelLocation, plan: LoadingPlan) -> Any:
    torch = require_torch()
    from transformers import AutoModelForCausalLM, GgufConfig
    kwargs = dict(plan.from_pretrained, local_files_only=True)
    # dequantize=True: never fetch GGUF matmul kernels from the Hub at run time.
    gguf = {"gguf_file": location.path.name, "quantization_config": GgufConfig(dequantize=True)}
    try:
        if not location.gguf:
            return AutoModelForCausalLM.from_pretrained(location.path, **kwargs)
        if not plan.stage_gguf:
            return AutoModelForCausalLM.from_pretrained(location.path.parent, **kwargs, **gguf)
        log.info("transformers cannot quantize a GGUF file while loading it: writing it "
                 "dequantized (fp16) to a temporary folder first")
        with tempfile.TemporaryDirectory(prefix="tanglebox-gguf-") as folder:
            staged = AutoModelForCausalLM.from_pretrained(
                location.path.parent, dtype=torch.float16, local_files_only=True, **gguf)
            staged.save_pretrained(folder)
            del staged
            gc.collect()
            return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except torch.cuda.OutOfMemoryError:
        raise BackendError(f"{location.path.name} does not fit in GPU memory; lower \"vRamGb\" "
                           "(what does not fit then runs from CPU memory), set \"quantization\" "
                           "to 8bit or 4bit, or raise \"numberOfGpus\"") from None
    except (OSError, ValueError, KeyError, TypeError, ImportError, RuntimeError) as err:
        log.debug("loading the model failed", exc_info=True)
        raise BackendError(f"transformers could not load {location.path.name}: "
                           f"{_first_line(err)}") from None


def quantize_linear_int8(model: Any) -> None:
    """Store every Linear layer's weights in int8 (torch dynamic quantization, CPU only).

    Activations are quantized per call, so memory drops about 4x for those weights while the
    embeddings (and so a tied output layer's copy) stay fp32. ``torch.ao.quantization`` warns
    that it is deprecated in favour of torchao; it still works in the pinned torch.
    """
    torch = require_torch()
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:
        raise BackendError("this torch has no torch.ao.quantization.quantize_dynamic for 8-bit "
                           "weights on the CPU; set \"quantization\" to none") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    _return_freed_memory()


def _return_freed_memory() -> None:
    """Give the freed fp32 weights back to the OS: glibc keeps freed heap memory otherwise, and
    the process would look as big as before quantizing."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


# Rows per block in bitsandbytes 0.50's functional._convert_weight_packed_for_cpu.
_PACKED_ROWS = 32


def _keep_unpackable_4bit_layers_generic(model: Any) -> None:
    """Keep bitsandbytes' generic kernel for 4-bit layers its AVX512-BF16 kernel cannot take.

    On a CPU with AVX512-BF16 (Intel Sapphire Rapids and later, AMD Zen 4 and later) a 4-bit
    layer that runs on the CPU repacks its weight at its first forward; that needs
    ``out_features`` a multiple of 32 and ``in_features`` a multiple of the quantization block
    (64), else the first decode fails (``shape '[32, 0]' is invalid``, ``N must be divisible
    by block_n``). Text models' hidden and intermediate sizes are multiples of 64 (SmolLM2:
    576 and 1536), but Qwen2-MoE's shared-expert gate has ``out_features`` 1. 4-bit layers run
    on the CPU when a cuda plan leaves the whole model in CPU memory (too little "vRamGb"; the
    load warns); the answer must not crash there.
    """
    for module in model.modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        blocksize = getattr(module.weight, "blocksize", None) or 64
        if module.out_features % _PACKED_ROWS or module.in_features % blocksize:
            module.support_avx512bf16_for_cpu = False


@contextlib.contextmanager
def _one_gguf_parse(gguf: bool) -> Iterator[None]:
    """Parse a GGUF file once while loading it.

    transformers reads the file's header three times (config, tokenizer, weights), and the
    ``gguf`` package's pure-Python reader takes seconds per read of a 49k-token vocabulary on a
    small CPU; it also rebuilds gguf's tensor-name table once per module of the model (about
    400 times for SmolLM2). transformers imports both names from ``gguf`` at each call, so
    sharing one reader and one table per architecture for the load halves the load time.
    """
    if not gguf:
        yield
        return
    import gguf as gguf_package
    original_reader = gguf_package.GGUFReader
    original_name_map = gguf_package.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}
    name_maps: dict[tuple[Any, int], Any] = {}

    def shared_reader(path: Any, mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    def shared_name_map(arch: Any, n_blocks: int) -> Any:
        if (arch, n_blocks) not in name_maps:
            name_maps[arch, n_blocks] = original_name_map(arch, n_blocks)
        return name_maps[arch, n_blocks]

    gguf_package.GGUFReader = shared_reader
    gguf_package.get_tensor_name_map = shared_name_map
    try:
        yield
    finally:
        gguf_package.GGUFReader = original_reader
        gguf_package.get_tensor_name_map = original_name_map


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
