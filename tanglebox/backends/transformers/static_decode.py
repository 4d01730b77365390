"""The transformers backend's decode step on a static KV cache, ready for CUDA graphs.

The dynamic path (backend.py) grows every slot's cache by one column per step, so no two steps
have the same shapes and neither ``torch.compile`` nor CUDA graphs can capture a step; on a GPU
one stream is then bound by kernel launches. Here every step has the same shapes:

- One preallocated cache: per layer, keys and values of ``[rows, kv_heads, columns, head_dim]``;
  slot ``s`` owns row ``s``. Every step runs all rows, one token each, and every row writes its
  token's keys and values at the same column (the shared write column, a tensor read by the
  graph). A row that is not generating this step writes a token nobody will see.
- Which columns a row may see is a 4D additive mask over the fixed columns (0: a token of the
  row, the dtype's minimum: anything else); each row's RoPE position comes from
  ``position_ids``. Keys are cached after RoPE, so a token may sit in any column: attention
  does not care about column order once the true positions are applied. The write column is
  open for every row during the step (an idle row then attends to itself, never to nothing),
  and closed again afterwards for the rows that did not generate.
- A slot joins when it generates its first token after a prompt, which the dynamic path read:
  its cache is copied into columns ``0..n`` of its row, and the write column moves on to at
  least ``n``. A slot leaves (back to a dynamic cache, in position order) when it gets more
  than one token (a prompt chunk); ``forget`` closes the forgotten columns in place.
- When the write column reaches the end, every row's columns are compacted to its front, in
  position order; if the rows then fill more than half, the cache grows (by 4x, up to
  ``contextLength`` + 1 columns), which is one new shape: one more compilation.

The CPU keeps a ``positions`` table (``[rows, columns]``: the position held in each column, -1
for none); the mask is rebuilt from it after a compaction. The step's forward is optionally
``torch.compile``'d (``mode="reduce-overhead"``: CUDA graphs, on cuda); if compiling fails, the
step runs eagerly from then on (a step only writes its own column, so running it again is
harmless).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from transformers.cache_utils import Cache, StaticLayer

from tanglebox.backends.transformers.plan import require_torch

log = logging.getLogger(__name__)

FIRST_COLUMNS = 256  # the cache's first size; it grows by GROWTH up to contextLength + 1
GROWTH = 4


def decode_kind(setting: str, device: str) -> str:
    """The setting ``transformersDecode`` on a device: ``dynamic``, ``static`` (eager) or
    ``compiled`` (static, with ``torch.compile(mode="reduce-overhead")``: CUDA graphs)."""
    # ``auto`` stays dynamic on every device until the compiled step has been measured and
    # checked on a GPU (docs/benchmarks.md): CUDA-graph capture has only been written against
    # its test, never run, and a default must be the path that has been.
    if setting in ("dynamic", "auto"):
        return "dynamic"
    return "compiled" if device == "cuda" else "static"


class ColumnLayer(StaticLayer):
    """One layer's preallocated keys and values; every row writes at the shared column."""

    def __init__(self, keys: Any, values: Any, column: Any) -> None:
        super().__init__(max_cache_len=keys.shape[2])
        self.keys, self.values, self.column = keys, values, column
        self.dtype, self.device = keys.dtype, keys.device
        self.batch_size, self.num_heads = keys.shape[:2]
        self.k_head_dim, self.v_head_dim = keys.shape[-1], values.shape[-1]
        self.is_initialized = True

    def update(self, key_states: Any, value_states: Any, *args: Any,
               **kwargs: Any) -> tuple[Any, Any]:
        self.keys.index_copy_(2, self.column, key_states)
        self.values.index_copy_(2, self.column, value_states)
        return self.keys, self.values


class StaticDecode:
    """The generating slots' rows in one static cache; see the module for the flow."""

    def __init__(self, model: Any, rows: int, limit: int, *, compiled: bool = False,
                 keep_one: dict[str, int] | None = None, columns: int = FIRST_COLUMNS) -> None:
        self._torch = require_torch()
        self.model = model
        self.rows = rows
        self.limit = limit  # columns enough for the longest sequence (contextLength + 1)
        self._keep_one = keep_one or {}
        self.compactions = 0  # times the write column reached the end
        self._first_columns = columns
        self._device = model.device
        self._dtype = model.dtype
        self._minimum = self._torch.finfo(self._dtype).min
        self._columns = 0  # 0 until the first slot joins (its cache gives the shapes)
        self._next = 0  # the shared write column of the next step
        self._positions = np.full((rows, 0), -1, dtype=np.int64)
        self._held: set[int] = set()
        self._cache: Any = None
        self._mask: Any = None
        self._columns_by_device: dict[Any, Any] = {}  # the write column, one tensor per device
        self._compiled: Callable[..., Any] | None = None  # None: steps run eagerly
        if compiled:
            self._compiled = self._torch.compile(self._eager, mode="reduce-overhead",
                                                 dynamic=False, fullgraph=False)

    @property
    def compiled(self) -> bool:
        """Whether steps run compiled (False after a failed compilation: they run eagerly)."""
        return self._compiled is not None

    @property
    def columns(self) -> int:
        """The cache's length in columns now (0 before the first slot joins)."""
        return self._columns

    def holds(self, slot: int) -> bool:
        return slot in self._held

    def join(self, slot: int, layers: list[tuple[Any, Any]], length: int) -> None:
        """Copy a slot's cache (per layer: keys and values of ``[1, kv_heads, length, head_dim]``,
        in position order) into its row."""
        if self._cache is None:
            self._allocate(layers, self._size_for(length + 1, length + 1))
        elif length >= self._columns:
            self._resize(self._size_for(2 * length, length + 1))
        for layer, (keys, values) in zip(self._cache.layers, layers):
            layer.keys[slot, :, :length] = keys[0]
            layer.values[slot, :, :length] = values[0]
        self._positions[slot] = -1
        self._positions[slot, :length] = np.arange(length)
        self._mask[slot].fill_(self._minimum)
        self._mask[slot, :, :, :length] = 0
        self._next = max(self._next, length)
        self._held.add(slot)

    def step(self, slots: list[int], tokens: list[int], positions: list[int]) -> np.ndarray:
        """One token for each of ``slots`` (held rows); their logits, one row per slot."""
        torch = self._torch
        if self._next >= self._columns:
            self._make_room()
        column = self._next
        ids = torch.zeros((self.rows, 1), dtype=torch.long)
        where = torch.zeros((self.rows, 1), dtype=torch.long)
        ids[slots, 0] = torch.tensor(tokens)
        where[slots, 0] = torch.tensor(positions)
        self._mask[:, :, :, column] = 0
        for layer_column in self._columns_by_device.values():
            layer_column.fill_(column)
        logits = self._run(ids.to(self._device), where.to(self._device))
        generating = set(slots)
        idle = [row for row in range(self.rows) if row not in generating]
        if idle:
            self._mask[idle, :, :, column] = self._minimum
        self._positions[slots, column] = positions
        self._next += 1
        if len(slots) < self.rows:
            logits = logits[torch.tensor(slots, device=logits.device)]
        return logits.float().cpu().numpy()

    def forget(self, slot: int, keep: int) -> None:
        """Close the row's columns at positions ``keep`` and beyond; 0 frees the row."""
        dropped = np.flatnonzero(self._positions[slot] >= keep)
        self._positions[slot, dropped] = -1
        if len(dropped):
            self._mask[slot, :, :, self._torch.from_numpy(dropped).to(self._device)] = (
                self._minimum)
        if keep == 0:
            self._held.discard(slot)

    def release(self, slot: int) -> list[tuple[Any, Any]]:
        """The row's cache in position order (per layer: keys and values, copies); the row is
        freed."""
        held = self._positions[slot]
        columns = np.flatnonzero(held >= 0)
        columns = columns[np.argsort(held[columns], kind="stable")]
        layers = []
        for layer in self._cache.layers:
            index = self._torch.from_numpy(columns).to(layer.keys.device)
            layers.append((layer.keys[slot:slot + 1, :, index],  # indexing copies
                           layer.values[slot:slot + 1, :, index]))
        self.forget(slot, 0)
        return layers

    def close(self) -> None:
        self._cache = self._mask = None
        self._held.clear()

    # -- internals ----------------------------------------------------------------------

    def _eager(self, ids: Any, positions: Any, mask: Any) -> Any:
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask,
                         past_key_values=self._cache, use_cache=True, **self._keep_one)
        return out.logits[:, -1]

    def _run(self, ids: Any, positions: Any) -> Any:
        if self._compiled is None:
            return self._eager(ids, positions, self._mask)
        try:
            if self._device.type == "cuda":
                self._torch.compiler.cudagraph_mark_step_begin()
            return self._compiled(ids, positions, self._mask)
        except Exception as error:  # noqa: BLE001 - any compiler failure: decode eagerly
            log.warning("transformers: torch.compile of the decode step failed (%s); "
                        "decoding on the static cache without it",
                        str(error).splitlines()[0] if str(error) else type(error).__name__)
            self._compiled = None
            return self._eager(ids, positions, self._mask)

    def _allocate(self, layers: list[tuple[Any, Any]], columns: int) -> None:
        torch = self._torch
        self._columns_by_device = {}
        built = []
        for keys, values in layers:
            device = keys.device
            if device not in self._columns_by_device:
                self._columns_by_device[device] = torch.zeros(1, dtype=torch.long, device=device)
            shape = (self.rows, keys.shape[1], columns)
            built.append(ColumnLayer(keys.new_zeros(shape + (keys.shape[3],)),
                                     values.new_zeros(shape + (values.shape[3],)),
                                     self._columns_by_device[device]))
        self._cache = Cache(layers=built)
        self._mask = torch.full((self.rows, 1, 1, columns), self._minimum, dtype=self._dtype,
                                device=self._device)
        self._positions = np.full((self.rows, columns), -1, dtype=np.int64)
        self._columns = columns
        self._mark_static()

    def _mark_static(self) -> None:
        """Fixed addresses, so CUDA graphs read the tensors that the steps mutate in place."""
        mark = self._torch._dynamo.mark_static_address
        for layer in self._cache.layers:
            mark(layer.keys)
            mark(layer.values)
        for column in self._columns_by_device.values():
            mark(column)
        mark(self._mask)

    def _make_room(self) -> None:
        """The write column reached the end: compact, and grow where the rows are crowded."""
        self.compactions += 1
        self._compact()
        crowded = self._next * 2 > self._columns and self._columns < self.limit
        if crowded or self._next >= self._columns:
            self._resize(self._size_for(max(2 * self._next, self._columns + 1), self._next + 1))

    def _size_for(self, wanted: int, needed: int) -> int:
        """The next size of at least ``wanted`` columns, capped to the limit (but >= needed)."""
        size = self._columns or self._first_columns
        while size < wanted:
            size *= GROWTH
        return min(size, max(self.limit, needed))

    def _compact(self) -> None:
        """Every row's columns to its front, in position order; the write column after them."""
        torch = self._torch
        held = self._positions
        order = np.argsort(np.where(held >= 0, held, np.iinfo(np.int64).max), axis=1,
                           kind="stable")
        self._positions = np.take_along_axis(held, order, axis=1)
        order_tensor = torch.from_numpy(order)
        for layer in self._cache.layers:
            index = order_tensor.to(layer.keys.device)[:, None, :, None]
            layer.keys.copy_(layer.keys.gather(2, index.expand_as(layer.keys)))
            layer.values.copy_(layer.values.gather(2, index.expand_as(layer.values)))
        self._mask.copy_(self._mask_of(self._positions))
        self._next = int((self._positions >= 0).sum(axis=1).max())

    def _resize(self, columns: int) -> None:
        """A new cache of ``columns`` columns holding the compacted rows (one new shape)."""
        self._compact()
        old, positions, kept = self._cache.layers, self._positions, self._next
        self._allocate([(layer.keys[:1, :, :1], layer.values[:1, :, :1]) for layer in old],
                       columns)
        for layer, previous in zip(self._cache.layers, old):
            layer.keys[:, :, :kept] = previous.keys[:, :, :kept]
            layer.values[:, :, :kept] = previous.values[:, :, :kept]
        self._positions[:, :kept] = positions[:, :kept]
        self._mask.copy_(self._mask_of(self._positions))
        log.info("transformers: the static KV cache grows to %d columns", columns)

    def _mask_of(self, positions: np.ndarray) -> Any:
        mask = np.where(positions >= 0, 0.0, self._minimum)[:, None, None, :]
        return self._torch.from_numpy(mask).to(device=self._device, dtype=self._dtype)
