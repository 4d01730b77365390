"""A tiny random Llama (built from a config, saved with a byte-level BPE tokenizer) for the
transformers backend's tests, and the steps those tests share. Needs torch and transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from tanglebox.backends.base import DecodeItem

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_level_tokenizer(bos_first: bool = False):
    """GPT-2 style byte-level BPE: 256 byte characters, a few merges (one is the whole of
    "é"), ChatML special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)}
    merges = [("Ã", "©"), ("l", "l"), ("Ġ", "w"), ("Ġw", "o")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>")
    if bos_first:
        bos = hf.convert_tokens_to_ids("<|im_start|>")
        hf.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    hf.chat_template = CHATML
    return hf


def save_tiny_llama(folder: Path, hidden_size: int = 64, intermediate_size: int = 128) -> Path:
    """Two layers, 4 attention heads over 2 key/value heads, tied embeddings, 256 positions.

    The default widths make every Linear layer one that bitsandbytes can repack for CPUs with
    AVX512-BF16 (out_features a multiple of 32, in_features of its 64-weight quantization
    block): a 4-bit load there repacks each weight at its first forward, and narrower rows
    failed it (tests/unit/test_transformers_bitsandbytes.py).
    """
    tokenizer = byte_level_tokenizer()
    tokenizer.save_pretrained(folder)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def prompt_tokens(backend, text: str) -> list[int]:
    return backend.tokenize(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")


def prefill(backend, slot: int, tokens: list[int]) -> np.ndarray:
    return backend.decode([DecodeItem(slot, tokens, 0)])[0]
