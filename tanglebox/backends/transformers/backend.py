"""The batched transformers backend: decode and forget on per-slot caches.

Every slot has its own ``DynamicCache``. With ``transformersDecode: static`` (not the default
yet: see static_decode.decode_kind), the generating slots step on one preallocated cache
instead, of the same shapes every step, so the step can be captured as CUDA graphs:
static_decode.py. The rest of this docstring is the dynamic path, which prompt chunks always
take. Items that append one token each (the
generating slots) run as one batched forward: their caches are left-padded into one batch
cache, with an attention mask hiding the padding and each row's own position ids, and that
batch is kept across steps while the same slots generate (it is rebuilt when a slot joins or
leaves). Prompt chunks run one slot at a time. All calls come from the engine's thread. On 2
CPU cores four batched streams make 1.3x to 2.7x the tokens/s of one (docs/benchmarks.md).
"""

from __future__ import annotations

import gc
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from tanglebox.backends.base import DecodeItem
from tanglebox.backends.transformers.load import load_model
from tanglebox.backends.transformers.plan import (DeviceInfo, LoadingPlan, loading_config,
                                                  require_torch)
from tanglebox.backends.transformers.static_decode import StaticDecode, decode_kind
from tanglebox.backends.transformers.tokens import (TokenBytes, adds_bos, chat_format_of,
                                                    end_of_turn_ids)
from tanglebox.model_location import ModelLocation

if TYPE_CHECKING:
    from tanglebox.backends.transformers.embeddings import TransformersEmbeddings

log = logging.getLogger(__name__)


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
    supports_grammar = False  # no grammar sampler here: a request with one is refused

    def __init__(self, model: Any, tokenizer: Any, *, model_name: str, device: str,
                 context_length: int, max_sequences: int, batch_tokens: int,
                 decode: str = "dynamic") -> None:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer
        self._torch = require_torch()
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
        self._bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
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
        self._static: StaticDecode | None = None
        self.decode_kind = "dynamic"
        self.use_decode(decode)

    @classmethod
    def load(cls, settings: Mapping[str, Any], location: ModelLocation) -> TransformersBackend:
        plan = loading_config(settings, DeviceInfo.probe(), gguf=location.gguf)
        return cls.load_planned(settings, location, plan)

    @classmethod
    def load_planned(cls, settings: Mapping[str, Any], location: ModelLocation,
                     plan: LoadingPlan) -> TransformersBackend:
        started = time.monotonic()
        loaded = load_model(settings, location, plan)
        backend = cls(loaded.model, loaded.tokenizer, model_name=location.path.name,
                      device=plan.device, context_length=loaded.context_length,
                      max_sequences=settings["parallelSlots"], batch_tokens=plan.batch_tokens,
                      decode=decode_kind(settings["transformersDecode"], plan.device))
        log.info("transformers: loaded %s in %.1f s on %s (%s, %s weights, %s decoding)",
                 location.path.name, time.monotonic() - started, plan.device, plan.dtype,
                 plan.quantization, backend.decode_kind)
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
        if len(stepping) < (1 if self._static else 2):  # the dynamic batch starts at two
            stepping = []
        results: list[np.ndarray | None] = [None] * len(items)
        with self._torch.inference_mode():
            if stepping:
                step = self._decode_static if self._static else self._decode_batch
                for i, logits in zip(stepping, step([items[i] for i in stepping])):
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
            if self._static is not None and self._static.holds(slot):
                self._static.forget(slot, keep)  # in place: closes the forgotten columns
                del tokens[keep:]
                return
            cache = self._cache_of(slot)
            if keep > 0 and self._plain_cache:
                cache.crop(keep - len(tokens))  # a negative count: remove that many positions
                del tokens[keep:]
                return
            kept = tokens[:keep]
            self._caches[slot], self._tokens[slot] = None, []
            for start in range(0, len(kept), self.batch_tokens):
                self._decode_slot(slot, kept[start:start + self.batch_tokens], False)

    def use_decode(self, kind: str, columns: int | None = None) -> None:
        """Step the generating slots ``dynamic``-ally, on a ``static`` cache, or on a
        ``compiled`` one (static_decode.py); ``columns``: the static cache's first size."""
        with self._torch.inference_mode():
            self._split_batch()
            for slot in range(self.max_sequences):
                if self._static is not None and self._static.holds(slot):
                    self._cache_of(slot)  # the slot's rows back in its own cache
        self._static = None
        attention = getattr(self.model.config, "_attn_implementation", "eager")
        if kind != "dynamic" and (not self._plain_cache or attention not in ("sdpa", "eager")):
            log.warning("transformers: %s decoding needs full attention on sdpa or eager "
                        "(this model: %s); decoding dynamically", kind, attention)
            kind = "dynamic"
        if kind != "dynamic":
            self._static = StaticDecode(
                self.model, self.max_sequences, self.context_length + 1,
                compiled=kind == "compiled", keep_one=self._keep_one,
                **({"columns": columns} if columns else {}))
        self.decode_kind = kind

    def close(self) -> None:
        self._static = None
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
        if self._static is not None and self._static.holds(slot):
            self._caches[slot] = self._DynamicCache(ddp_cache_data=self._static.release(slot))
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

    def _decode_static(self, items: list[DecodeItem]) -> list[np.ndarray]:
        static = self._static
        for item in items:
            if not static.holds(item.slot):
                cache = self._cache_of(item.slot)
                layers = [(layer.keys, layer.values) for layer in cache.layers]
                static.join(item.slot, layers, len(self._tokens[item.slot]))
                self._caches[item.slot] = None
        slots = [item.slot for item in items]
        logits = static.step(slots, [item.tokens[0] for item in items],
                             [len(self._tokens[slot]) for slot in slots])
        for item in items:
            self._tokens[item.slot].append(item.tokens[0])
        return [row.copy() for row in logits]

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

    # -- embeddings (tanglebox.embeddings) ------------------------------------------------

    def open_embeddings(self) -> "TransformersEmbeddings":
        """Mean-pooled embeddings on this model, for the embedding thread (see the module)."""
        from tanglebox.backends.transformers.embeddings import TransformersEmbeddings
        return TransformersEmbeddings(self)


def _left_pad(torch: Any, states: Any, pad: int) -> Any:
    return states if pad == 0 else torch.nn.functional.pad(states, (0, 0, pad, 0))


def _to_numpy(logits: Any) -> np.ndarray:
    return logits.float().cpu().numpy()
