"""Hugging Face transformers + torch: model folders, and ``.gguf`` files through transformers'
``gguf_file`` loading, on cpu, cuda or mps.

Loading is planned by one pure function, :func:`loading_config`, from the settings and what the
machine has (:class:`DeviceInfo`), so every combination is unit-tested without a GPU:

- cuda: fp16. ``quantization`` 8bit (what ``use8BitCompression`` always meant) or 4bit (NF4,
  double quantization, fp16 compute) through bitsandbytes. ``numberOfGpus`` x ``vRamGb`` become
  accelerate's ``device_map="auto"`` with a per-GPU ``max_memory``; CPU memory takes what does
  not fit, and the load then warns, because those layers run much slower.
- cpu: fp32. 8bit falls back (with a warning) to torch's dynamic int8 quantization of the
  Linear layers: weights stored in int8, activations quantized on the fly. 4bit has no CPU
  fallback and is refused in one line.
- mps: fp16; no quantization.

transformers dequantizes a GGUF file's weights at load, and refuses to combine a GGUF file with
a ``quantization_config``; for bitsandbytes the dequantized model is therefore written to a
temporary folder (fp16 safetensors) and loaded from there.

Decoding: every slot has its own ``DynamicCache``. Items that append one token each (the
generating slots) run as one batched forward: their caches are left-padded into one batch
cache, with an attention mask hiding the padding and each row's own position ids, and that
batch is kept across steps while the same slots generate (it is rebuilt when a slot joins or
leaves). Prompt chunks run one slot at a time. All calls come from the engine's thread. On 2
CPU cores four batched streams make 1.3x to 2.7x the tokens/s of one (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import inspect
import json
import logging
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from tanglebox.backends.base import BackendError, DecodeItem
from tanglebox.model_location import ModelLocation
from tanglebox.prompting import ModelChatFormat

log = logging.getLogger(__name__)

BITSANDBYTES_INSTALL = "pip install bitsandbytes==0.50.2"
# Tokens that end an assistant turn in common chat formats (ChatML, Llama 3, Phi-3, Gemma),
# besides the model's own eos token ids; each counts only where the vocabulary has it.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endoftext|>",
                      "<end_of_turn>")
# Tokens per decode call: prompt chunks are cut to this, beside the generating streams.
BATCH_TOKENS = {"cpu": 256, "mps": 512, "cuda": 1024}


# -- what the machine has, and the plan ---------------------------------------------------


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
        torch = _torch()
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
    from_pretrained: dict[str, Any]  # keyword arguments for from_pretrained
    stage_gguf: bool = False  # a GGUF file for bitsandbytes: dequantize to a folder first
    batch_tokens: int = 256
    warnings: tuple[str, ...] = ()


def requested_quantization(settings: Mapping[str, Any]) -> str:
    """``quantization``, where ``auto`` follows the original's ``use8BitCompression``."""
    quantization = settings["quantization"]
    if quantization == "auto":
        return "8bit" if settings["use8BitCompression"] else "none"
    return quantization


def loading_config(settings: Mapping[str, Any], device: DeviceInfo,
                   gguf: bool = False) -> LoadingPlan:
    """Plan how to load the model; raise BackendError (one line) for what cannot work here."""
    torch = _torch()
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
        kwargs: dict[str, Any] = {"dtype": torch.float16, "device_map": "auto",
                                  "max_memory": _max_memory(settings, device, notes)}
        if quantization != "none":
            kwargs["quantization_config"] = bitsandbytes_config(quantization)
        return LoadingPlan("cuda", quantization, kwargs, stage_gguf=gguf and quantization != "none",
                           batch_tokens=BATCH_TOKENS["cuda"], warnings=tuple(notes))

    if name == "mps":
        if not device.mps:
            raise BackendError(f"{where}\"device\" is mps, but {_MPS_MISSING}")
        if quantization != "none":
            raise BackendError(f"{where}\"quantization\" {quantization} is not available on mps "
                               "(bitsandbytes needs cuda, torch's int8 runs on the CPU); set "
                               "\"quantization\" to none, or \"device\" to cuda or cpu")
        return LoadingPlan("mps", "none", {"dtype": torch.float16, "device_map": {"": "mps"}},
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
    return LoadingPlan("cpu", quantization, {"dtype": torch.float32},
                       batch_tokens=BATCH_TOKENS["cpu"], warnings=tuple(notes))


def bitsandbytes_config(quantization: str) -> Any:
    """8-bit LLM.int8, or 4-bit NF4 with double quantization and fp16 compute.

    ``llm_int8_enable_fp32_cpu_offload`` lets layers that do not fit within ``vRamGb`` stay on
    the CPU (unquantized) instead of failing the load; the load warns when that happens.
    """
    torch = _torch()
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
        torch = _torch()
    except BackendError as err:
        return str(err)
    if device == "cuda" and not torch.cuda.is_available():
        return _CUDA_MISSING
    if device == "mps" and not (getattr(torch.backends, "mps", None)
                                and torch.backends.mps.is_available()):
        return _MPS_MISSING
    return None


# -- the backend ----------------------------------------------------------------------------


@dataclass
class _Batch:
    """The generating slots' caches, left-padded into one batch cache, kept between steps."""

    slots: list[int]
    pads: list[int]  # padding positions at the left of each row
    cache: Any  # DynamicCache of batch len(slots)
    mask: Any  # attention mask (rows x cached positions): 0 on padding
    rows: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rows = {slot: row for row, slot in enumerate(self.slots)}


class TransformersBackend:
    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any, *, model_name: str, device: str,
                 context_length: int, max_sequences: int, batch_tokens: int) -> None:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer
        self._torch = _torch()
        self._DynamicCache = DynamicCache
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.device = device
        self.context_length = context_length
        self.max_sequences = max_sequences
        self.batch_tokens = batch_tokens
        self.chat_format = chat_format_of(tokenizer)
        self._end_of_turn = frozenset(end_of_turn_ids(model, tokenizer))
        self._bos = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
        self._bytes = TokenBytes(tokenizer)
        self._input_device = model.device
        parameters = inspect.signature(model.forward).parameters
        self._keep_one = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        # Plain full-attention caches can be cropped and stacked into a batch; others (sliding
        # window, linear attention) are rebuilt by re-reading the kept prefix, one slot a time.
        self._plain_cache = all(type(layer) is DynamicLayer for layer in self._new_cache().layers)
        self._caches: list[Any] = [None] * max_sequences
        self._tokens: list[list[int]] = [[] for _ in range(max_sequences)]
        self._batch: _Batch | None = None

    @classmethod
    def load(cls, settings: Mapping[str, Any], location: ModelLocation) -> TransformersBackend:
        plan = loading_config(settings, DeviceInfo.probe(), gguf=location.gguf)
        return cls.load_planned(settings, location, plan)

    @classmethod
    def load_planned(cls, settings: Mapping[str, Any], location: ModelLocation,
                     plan: LoadingPlan) -> TransformersBackend:
        started = time.monotonic()
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
            model = _load_model(location, plan)
        if plan.quantization == "int8":
            quantize_linear_int8(model)
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
        backend = cls(model, tokenizer, model_name=location.path.name, device=plan.device,
                      context_length=context, max_sequences=settings["parallelSlots"],
                      batch_tokens=plan.batch_tokens)
        log.info("transformers: loaded %s in %.1f s on %s (%s, %s weights)", location.path.name,
                 time.monotonic() - started, plan.device,
                 str(plan.from_pretrained["dtype"]).removeprefix("torch."), plan.quantization)
        return backend

    # -- tokens -------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        tokens = self.tokenizer.encode(text, add_special_tokens=False)
        if self._bos is not None and (not tokens or tokens[0] != self._bos):
            tokens.insert(0, self._bos)
        return tokens

    def token_bytes(self, token: int) -> bytes:
        return self._bytes[token]

    def is_end_of_turn(self, token: int) -> bool:
        return token in self._end_of_turn

    # -- the model ----------------------------------------------------------------------

    def decode(self, items: list[DecodeItem]) -> list[np.ndarray | None]:
        if len({item.slot for item in items}) != len(items):
            raise ValueError("a decode call takes at most one item per slot")
        for item in items:
            if item.position != len(self._tokens[item.slot]):
                raise ValueError(f"slot {item.slot} holds {len(self._tokens[item.slot])} "
                                 f"positions, not {item.position}")
        stepping = [i for i, item in enumerate(items) if self._steps_in_batch(item)]
        if len(stepping) < 2:
            stepping = []
        results: list[np.ndarray | None] = [None] * len(items)
        with self._torch.inference_mode():
            if stepping:
                for i, logits in zip(stepping, self._decode_batch([items[i] for i in stepping])):
                    results[i] = logits
            for i, item in enumerate(items):
                if i not in stepping:
                    results[i] = self._decode_slot(item.slot, item.tokens, item.want_logits)
        return results

    def forget(self, slot: int, keep: int) -> None:
        tokens = self._tokens[slot]
        if keep >= len(tokens):
            return
        with self._torch.inference_mode():
            cache = self._cache_of(slot)
            if keep > 0 and self._plain_cache:
                cache.crop(keep - len(tokens))  # a negative count: remove that many positions
                del tokens[keep:]
                return
            kept = tokens[:keep]
            self._caches[slot], self._tokens[slot] = None, []
            for start in range(0, len(kept), self.batch_tokens):
                self._decode_slot(slot, kept[start:start + self.batch_tokens], False)

    def close(self) -> None:
        self._batch = None
        self._caches = [None] * self.max_sequences
        self.model = None
        gc.collect()
        if self.device == "cuda":
            self._torch.cuda.empty_cache()

    # -- internals ----------------------------------------------------------------------

    def _new_cache(self) -> Any:
        return self._DynamicCache(config=self.model.config)

    def _steps_in_batch(self, item: DecodeItem) -> bool:
        return (self._plain_cache and len(item.tokens) == 1 and item.want_logits
                and len(self._tokens[item.slot]) > 0)

    def _cache_of(self, slot: int) -> Any:
        if self._batch is not None and slot in self._batch.rows:
            self._split_batch()
        if self._caches[slot] is None:
            self._caches[slot] = self._new_cache()
        return self._caches[slot]

    def _decode_slot(self, slot: int, tokens: list[int], want_logits: bool) -> np.ndarray | None:
        torch = self._torch
        cache = self._cache_of(slot)
        start = len(self._tokens[slot])
        ids = torch.tensor([tokens], dtype=torch.long, device=self._input_device)
        positions = torch.arange(start, start + len(tokens), device=self._input_device)
        out = self.model(input_ids=ids, position_ids=positions.unsqueeze(0),
                         past_key_values=cache, use_cache=True, **self._keep_one)
        self._tokens[slot].extend(tokens)
        return _to_numpy(out.logits[0, -1]) if want_logits else None

    def _decode_batch(self, items: list[DecodeItem]) -> list[np.ndarray]:
        torch = self._torch
        slots = [item.slot for item in items]
        if self._batch is None or set(self._batch.slots) != set(slots):
            self._split_batch()
            self._batch = self._stack(slots)
        batch = self._batch
        rows = len(batch.slots)
        ids = torch.empty((rows, 1), dtype=torch.long)
        for item in items:
            ids[batch.rows[item.slot], 0] = item.tokens[0]
        positions = torch.tensor([[len(self._tokens[slot])] for slot in batch.slots])
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((rows, 1))], dim=1)
        out = self.model(input_ids=ids.to(self._input_device), attention_mask=batch.mask,
                         position_ids=positions.to(self._input_device),
                         past_key_values=batch.cache, use_cache=True, **self._keep_one)
        logits = _to_numpy(out.logits[:, -1])
        for item in items:
            self._tokens[item.slot].append(item.tokens[0])
        return [logits[batch.rows[item.slot]].copy() for item in items]

    def _stack(self, slots: list[int]) -> _Batch:
        torch = self._torch
        caches = [self._cache_of(slot) for slot in slots]
        lengths = [len(self._tokens[slot]) for slot in slots]
        longest = max(lengths)
        pads = [longest - length for length in lengths]
        layers = []
        for index in range(len(caches[0].layers)):
            keys = [_left_pad(torch, cache.layers[index].keys, pad)
                    for cache, pad in zip(caches, pads)]
            values = [_left_pad(torch, cache.layers[index].values, pad)
                      for cache, pad in zip(caches, pads)]
            layers.append((torch.cat(keys), torch.cat(values)))
        mask = torch.ones((len(slots), longest), dtype=torch.long, device=self._input_device)
        for row, pad in enumerate(pads):
            mask[row, :pad] = 0
        for slot in slots:
            self._caches[slot] = None
        return _Batch(slots, pads, self._DynamicCache(ddp_cache_data=layers), mask)

    def _split_batch(self) -> None:
        batch, self._batch = self._batch, None
        if batch is None:
            return
        for row, (slot, pad) in enumerate(zip(batch.slots, batch.pads)):
            # Copies, so a finished slot does not keep the whole batch's tensors alive.
            layers = [(layer.keys[row:row + 1, :, pad:].clone(),
                       layer.values[row:row + 1, :, pad:].clone())
                      for layer in batch.cache.layers]
            self._caches[slot] = self._DynamicCache(ddp_cache_data=layers)


def _left_pad(torch: Any, states: Any, pad: int) -> Any:
    return states if pad == 0 else torch.nn.functional.pad(states, (0, 0, pad, 0))


def _to_numpy(logits: Any) -> np.ndarray:
    return logits.float().cpu().numpy()


# -- the tokenizer's view of the model's format ---------------------------------------------


def chat_format_of(tokenizer: Any) -> ModelChatFormat:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one renders conversations
        template = template.get("default") or next(iter(template.values()), None)
    return ModelChatFormat(template or None, tokenizer.bos_token or "",
                           tokenizer.eos_token or "")


def end_of_turn_ids(model: Any, tokenizer: Any) -> set[int]:
    """The eos token id(s) of the generation config, model config and tokenizer, plus the
    common end-of-turn tokens that the vocabulary has."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    return ids


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS token in front of a text (the model was trained so)."""
    bos = tokenizer.bos_token_id
    return (bos is not None and tokenizer.encode("a", add_special_tokens=True)[:1] == [bos]
            and tokenizer.encode("a", add_special_tokens=False)[:1] != [bos])


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character standing for each byte."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_LEVEL = _byte_level_alphabet()
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenBytes:
    """The bytes each token stands for, computed once per token.

    Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) writes each byte as a printable character;
    SentencePiece (Llama 2, Mistral) writes a space as ``▁`` and falls back to ``<0xNN>`` byte
    tokens. Either way a token may hold part of a UTF-8 character, which ``tokenizer.decode``
    would turn into U+FFFD; the engine's incremental decoder needs the real bytes. Special
    tokens (end of turn, role markers) stand for no text.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._style = _decoder_style(tokenizer)
        self._added = dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self._size = len(tokenizer)
        self._cache: dict[int, bytes] = {}

    def __getitem__(self, token: int) -> bytes:
        data = self._cache.get(token)
        if data is None:
            data = self._cache[token] = self._compute(token)
        return data

    def _compute(self, token: int) -> bytes:
        if not 0 <= token < self._size:
            return b""
        added = self._added.get(token)
        if added is not None:
            return b"" if added.special else added.content.encode("utf-8")
        piece = self._tokenizer.convert_ids_to_tokens(token)
        if piece is None:
            return b""
        if self._style == "byte_level" and all(c in _BYTE_LEVEL for c in piece):
            return bytes(_BYTE_LEVEL[c] for c in piece)
        if self._style == "sentencepiece":
            match = _BYTE_PIECE.fullmatch(piece)
            return bytes([int(match.group(1), 16)]) if match else piece.replace("▁", " ").encode()
        return self._tokenizer.decode([token]).encode("utf-8")


def _decoder_style(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "other"
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders") or [decoder]
    kinds = {part.get("type") for part in parts}
    if "ByteLevel" in kinds:
        return "byte_level"
    if kinds & {"ByteFallback", "Metaspace"} or any(
            part.get("type") == "Replace" and "▁" in json.dumps(part.get("pattern"))
            for part in parts):
        return "sentencepiece"
    return "other"


# -- loading --------------------------------------------------------------------------------


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


def _load_model(location: ModelLocation, plan: LoadingPlan) -> Any:
    torch = _torch()
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
    torch = _torch()
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


# -- small helpers --------------------------------------------------------------------------


def _torch() -> Any:
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


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
