"""Embeddings on transformers: the mean of the last hidden state over each input's tokens.

Used only by the embedding thread (``tanglebox.embeddings``), beside the engine's thread that
generates with the same model: a forward pass keeps no state in the model (each call here gets
no cache), so the two may run at once. The tokenizer is a copy of the backend's: a fast
tokenizer is a Rust object that refuses to be used by two threads at once ("Already
borrowed"), and the engine's thread tokenizes prompts meanwhile.

The base model (``model.base_model``: the decoder without its language-model head) gives the
last hidden state after the final norm, the same tensor llama.cpp pools, so both backends give
nearly the same vectors for the same GGUF file. Inputs run in batches of about
``batch_tokens`` padded tokens, shortest first to waste little padding, right-padded with an
attention mask: in a causal model a real token never attends to the padding after it, and the
mean counts real tokens only.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from tanglebox.backends.base import BackendError
from tanglebox.backends.transformers.plan import require_torch
from tanglebox.backends.transformers.tokens import adds_bos


class TransformersEmbeddings:
    """Mean-pooled vectors of token lists on a TransformersBackend's model; see the module."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        model = backend.model
        if model is None:
            raise BackendError("the model has been unloaded")
        self._torch = require_torch()
        self._base = model.base_model
        if self._base is model:
            raise BackendError("it has no base model to read hidden states from")
        self._device = model.device
        self._tokenizer = copy.deepcopy(backend.tokenizer)
        self._bos = self._tokenizer.bos_token_id if adds_bos(self._tokenizer) else None
        self.context_length = backend.context_length
        self.dimensions = int(model.config.hidden_size)
        self.batch_tokens = backend.batch_tokens

    @property
    def closed(self) -> bool:
        return self._backend.model is None  # TransformersBackend.close drops it

    def tokenize(self, text: str) -> list[int]:
        """As the backend tokenizes a prompt: special tokens parsed, BOS where the model wants
        one."""
        tokens = self._tokenizer.encode(text, add_special_tokens=False)
        if self._bos is not None and (not tokens or tokens[0] != self._bos):
            tokens.insert(0, self._bos)
        return tokens

    def embed_tokens(self, inputs: list[list[int]]) -> list[np.ndarray]:
        """One float32 vector per token list (not normalised), in order."""
        if self.closed:
            raise BackendError("the model has been unloaded")
        vectors: list[np.ndarray | None] = [None] * len(inputs)
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        with self._torch.inference_mode():
            start = 0
            while start < len(order):
                end = start + 1  # the longest of a batch is its last: padded size = rows * it
                while (end < len(order)
                       and (end + 1 - start) * len(inputs[order[end]]) <= self.batch_tokens):
                    end += 1
                batch = order[start:end]
                for i, vector in zip(batch, self._mean_hidden([inputs[i] for i in batch])):
                    vectors[i] = vector
                start = end
        return vectors  # type: ignore[return-value]

    def close(self) -> None:
        """Nothing of its own to free: the model is the backend's."""

    def _mean_hidden(self, inputs: list[list[int]]) -> list[np.ndarray]:
        torch = self._torch
        longest = max(len(tokens) for tokens in inputs)
        ids = torch.zeros((len(inputs), longest), dtype=torch.long)
        mask = torch.zeros((len(inputs), longest), dtype=torch.long)
        for row, tokens in enumerate(inputs):
            ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, :len(tokens)] = 1
        out = self._base(input_ids=ids.to(self._device), attention_mask=mask.to(self._device),
                         use_cache=False)
        hidden = out.last_hidden_state.float()
        weights = mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
        means = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
        return list(means.cpu().numpy())
