"""Choose the next token from a model's logits: temperature 0 is greedy (argmax).

Above 0: top-k 40, then nucleus (top-p 0.95), then a draw at the given temperature, as
llama.cpp's default sampler chain does. Done once here for every backend.
"""

from __future__ import annotations

import numpy as np

TOP_K = 40
TOP_P = 0.95


def sample_token(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    k = min(TOP_K, logits.shape[-1])
    candidates = np.argpartition(logits, -k)[-k:]
    scores = logits[candidates].astype(np.float64) / temperature
    order = np.argsort(-scores)
    candidates, scores = candidates[order], scores[order]
    probs = np.exp(scores - scores[0])
    probs /= probs.sum()
    keep = int(np.searchsorted(np.cumsum(probs), TOP_P)) + 1
    probs = probs[:keep] / probs[:keep].sum()
    return int(candidates[rng.choice(keep, p=probs)])
