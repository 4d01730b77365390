"""``kvCacheType``: the llama.cpp backend keeps its KV cache at the precision asked, through the
settings as users set it, and still answers.

A slot's saved sequence state (``llama_state_seq_get_size``) is its KV cache for the tokens it
holds, so its size says which precision the context really uses.
"""

from __future__ import annotations

import llama_cpp
import pytest

from tanglebox.backends import load_backend
from tanglebox.chat_request import ChatRequest
from tanglebox.engine import Done, Engine
from tanglebox.model_location import locate_model
from tanglebox.prompting import USER, Message
from tanglebox.settings import SettingsError, load_settings
from tests.replies import collect_reply

pytestmark = pytest.mark.real_model

QUESTION = "Name three colours of the rainbow."


def slot_bytes_after_reply(tmp_path, kv_cache_type: str) -> tuple[int, int, str]:
    """The bytes of slot 0's KV state after one greedy reply, the tokens it holds, the reply."""
    settings = load_settings(tmp_path / f"{kv_cache_type}.json",
                             {"backend": "llama.cpp", "contextLength": 512, "parallelSlots": 1,
                              "kvCacheType": kv_cache_type})
    backend = load_backend(settings, locate_model(settings))
    engine = Engine(backend, "auto", seed=1)
    engine.start()
    try:
        generation = engine.submit(ChatRequest((Message(USER, QUESTION),), "", 0.0, 24))
        text, done = collect_reply(generation)
        assert isinstance(done, Done), done
        size = llama_cpp.llama_state_seq_get_size(backend._ctx, 0)
        return size, done.prompt_tokens + done.completion_tokens, text
    finally:
        engine.stop(drain_seconds=5)


def test_quantized_kv_caches_take_less_memory_per_token_and_still_answer(tmp_path):
    per_token = {}
    for kv_cache_type in ("f16", "q8_0", "q4_0"):
        size, tokens, text = slot_bytes_after_reply(tmp_path, kv_cache_type)
        assert text.strip(), f"{kv_cache_type}: an empty reply"
        per_token[kv_cache_type] = size / tokens
    # q8_0 stores 34 bytes per 32 values (f16: 64), q4_0 18 per 32.
    assert per_token["q8_0"] < 0.6 * per_token["f16"]
    assert per_token["q4_0"] < 0.6 * per_token["q8_0"]


def test_an_unknown_kv_cache_type_is_a_settings_error_naming_the_choices(tmp_path):
    with pytest.raises(SettingsError) as raised:
        load_settings(tmp_path / "settings.json", {"kvCacheType": "q2_k"})
    message = str(raised.value)
    assert "kvCacheType" in message and "q8_0" in message
