"""The transformers backend on a tiny random Llama (built from a config, saved with a byte-level
BPE tokenizer), and the ``from_pretrained`` arguments of its loading plan, without a GPU.
The plan's decisions without torch: test_transformers_plan.py; bitsandbytes' quantized
weights on the CPU: test_transformers_bitsandbytes.py."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer, decoders, models  # noqa: E402

from tanglebox.backends.base import BackendError, DecodeItem  # noqa: E402
from tanglebox.backends.transformers.backend import TransformersBackend  # noqa: E402
from tanglebox.backends.transformers.load import _one_gguf_parse  # noqa: E402
from tanglebox.backends.transformers.plan import (  # noqa: E402
    DeviceInfo, device_problem, loading_config, offload_warning, requested_quantization)
from tanglebox.backends.transformers.tokens import TokenBytes  # noqa: E402
from tanglebox.chat_request import ChatRequest  # noqa: E402
from tanglebox.engine import Engine  # noqa: E402
from tanglebox.model_location import ModelLocation  # noqa: E402
from tanglebox.prompting import USER, Message  # noqa: E402
from tests.loading_plans import CPU_BOX, GIB, GPU_BOX, plan_settings, settings_for  # noqa: E402
from tests.replies import collect_reply  # noqa: E402
from tests.tiny_llama import (  # noqa: E402
    CHATML, byte_level_tokenizer, prefill, prompt_tokens, save_tiny_llama)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def backend(tmp_path, model_folder):
    settings = settings_for(tmp_path, parallelSlots=4)
    loaded = TransformersBackend.load(settings, ModelLocation(model_folder, "transformers", False))
    yield loaded
    loaded.close()


# -- loading a model folder -------------------------------------------------------------------


def test_load_reports_the_model_and_its_chat_format(backend, model_folder):
    assert backend.name == "transformers"
    assert backend.model_name == model_folder.name
    assert backend.device == "cpu"
    assert backend.context_length == 256  # contextLength 4096 capped to what the model knows
    assert backend.max_sequences == 4
    assert backend.chat_format.chat_template == CHATML
    assert backend.chat_format.eos_token == "<|im_end|>"


def test_a_folder_without_weights_is_one_line_naming_it(tmp_path, model_folder):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((model_folder / name).read_bytes())
    with pytest.raises(BackendError) as caught:
        TransformersBackend.load(settings_for(tmp_path),
                                 ModelLocation(broken, "transformers", False))
    assert "broken-model" in str(caught.value) and "\n" not in str(caught.value)


def test_sharing_one_gguf_parse_is_undone_after_the_load():
    import gguf
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _one_gguf_parse(True):
        first = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is first
    assert gguf.GGUFReader is reader and gguf.get_tensor_name_map is name_map


def test_tokenize_parses_special_tokens_and_adds_no_bos_unless_the_model_wants_one(backend):
    start = backend.tokenizer.convert_tokens_to_ids("<|im_start|>")
    end = backend.tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokens = backend.tokenize("<|im_start|>user\nhi<|im_end|>")
    assert tokens[0] == start and tokens[-1] == end
    assert backend.tokenize("hi")[0] != start


def test_tokenize_adds_bos_once_when_the_tokenizer_does(backend):
    with_bos = TransformersBackend(
        backend.model, byte_level_tokenizer(bos_first=True), model_name="m", device="cpu",
        context_length=256, max_sequences=1, batch_tokens=64)
    bos = with_bos.tokenizer.bos_token_id
    assert with_bos.tokenize("hi")[0] == bos
    assert with_bos.tokenize("<|im_start|>hi")[:2] != [bos, bos]


def test_token_bytes_are_the_real_bytes_even_for_part_of_a_character(backend):
    text = "héllo wörld 😀 ok"
    tokens = backend.tokenize(text)
    pieces = [backend.token_bytes(token) for token in tokens]
    assert b"".join(pieces) == text.encode("utf-8")
    assert "é".encode() in pieces  # a merged token holding a whole two-byte character
    assert b"\xf0" in pieces  # the emoji's first byte alone: not text by itself


def test_special_tokens_stand_for_no_text_and_end_the_turn(backend):
    end = backend.tokenizer.convert_tokens_to_ids("<|im_end|>")
    other_end = backend.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert backend.token_bytes(end) == b""
    assert backend.is_end_of_turn(end) and backend.is_end_of_turn(other_end)
    assert not backend.is_end_of_turn(backend.tokenize("a")[0])


def test_sentencepiece_tokens_map_spaces_and_byte_fallback_to_bytes():
    vocab = {"<unk>": 0, "▁hello": 1, "▁": 2, "<0xC3>": 3, "<0xA9>": 4, "h": 5}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>",
                                     byte_fallback=True))
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")
    table = TokenBytes(hf)
    assert table[1] == b" hello"
    assert table[3] + table[4] == "é".encode()
    assert table[0] == b""  # <unk> is special
    assert table[999] == b""  # beyond the vocabulary


# -- decode, forget, batching ------------------------------------------------------------------


def test_prefix_reuse_after_forget_gives_the_same_logits(backend):
    tokens = prompt_tokens(backend, "What is 2 + 2?")
    whole = prefill(backend, 0, tokens)
    keep = len(tokens) - 5
    backend.forget(0, keep)
    again = backend.decode([DecodeItem(0, tokens[keep:], keep)])[0]
    np.testing.assert_allclose(again, whole, rtol=1e-5, atol=1e-5)
    backend.forget(0, 0)
    chunked = backend.decode([DecodeItem(0, tokens[:7], 0, want_logits=False)])
    assert chunked == [None]
    rest = backend.decode([DecodeItem(0, tokens[7:], 7)])[0]
    np.testing.assert_allclose(rest, whole, rtol=1e-5, atol=1e-5)


def test_decode_refuses_a_position_the_cache_does_not_hold(backend):
    tokens = prompt_tokens(backend, "hi")
    prefill(backend, 0, tokens)
    with pytest.raises(ValueError):
        backend.decode([DecodeItem(0, [5], len(tokens) + 3)])
    with pytest.raises(ValueError):
        backend.decode([DecodeItem(1, [5], 0), DecodeItem(1, [6], 1)])


def generate_alone(backend, slot: int, tokens: list[int], steps: int) -> list[np.ndarray]:
    """Greedy steps for one slot, one decode call per token: the reference for batching."""
    backend.forget(slot, 0)
    logits = [prefill(backend, slot, tokens)]
    position = len(tokens)
    for _ in range(steps):
        token = int(np.argmax(logits[-1]))
        logits.append(backend.decode([DecodeItem(slot, [token], position)])[0])
        position += 1
    return logits


def test_batched_steps_equal_single_steps_as_slots_join_and_leave(backend):
    prompts = [prompt_tokens(backend, text) for text in
               ("What is 2 + 2?", "hi", "Tell me a long story about dragons, please.")]
    steps = 6
    expected = [generate_alone(backend, 3, tokens, steps) for tokens in prompts]
    for slot in range(3):
        backend.forget(slot, 0)
    backend.forget(3, 0)

    logits = {0: [prefill(backend, 0, prompts[0])], 1: [prefill(backend, 1, prompts[1])]}
    positions = {0: len(prompts[0]), 1: len(prompts[1])}
    for step in range(steps):
        slots = [0, 1] if step < 2 else [0, 1, 2]
        items = [DecodeItem(slot, [int(np.argmax(logits[slot][-1]))], positions[slot])
                 for slot in slots if slot in logits]
        if step == 2:  # slot 2's prompt arrives beside the two streams, in the same call
            items.append(DecodeItem(2, prompts[2], 0))
            positions[2] = 0
        if step == 4:  # slot 1 leaves the batch (its reply ended)
            items = [item for item in items if item.slot != 1]
        results = backend.decode(items)
        for item, result in zip(items, results):
            logits.setdefault(item.slot, []).append(result)
            positions[item.slot] += len(item.tokens)
    for slot in range(3):
        got = logits[slot]
        for index, reference in enumerate(expected[slot][:len(got)]):
            np.testing.assert_allclose(got[index], reference, rtol=1e-4, atol=1e-4,
                                       err_msg=f"slot {slot}, step {index}")


def test_forget_on_a_batched_slot_keeps_the_others_intact(backend):
    a, b = prompt_tokens(backend, "one"), prompt_tokens(backend, "two two two")
    reference_b = generate_alone(backend, 3, b, 3)
    backend.forget(3, 0)
    prefill(backend, 0, a)
    last_b = prefill(backend, 1, b)
    position_b = len(b)
    for step in range(3):
        token_b = int(np.argmax(last_b))
        result = backend.decode([DecodeItem(0, [7], len(a) + step),
                                 DecodeItem(1, [token_b], position_b)])
        last_b, position_b = result[1], position_b + 1
        np.testing.assert_allclose(last_b, reference_b[step + 1], rtol=1e-4, atol=1e-4)
    backend.forget(0, 2)  # slot 0 takes a new conversation sharing 2 tokens
    fresh = prefill(backend, 2, a)
    again = backend.decode([DecodeItem(0, a[2:], 2)])[0]
    np.testing.assert_allclose(again, fresh, rtol=1e-5, atol=1e-5)


def test_replies_through_the_engine_match_alone_and_in_parallel(backend):
    engine = Engine(backend, "auto")
    engine.start()
    try:
        request = ChatRequest((Message(USER, "Hello there"),), "", 0.0, 12)
        alone, done = collect_reply(engine.submit(request))
        assert done.finish_reason in ("stop", "length") and alone == done.text
        together = [engine.submit(request) for _ in range(3)]
        assert [collect_reply(generation)[0] for generation in together] == [alone] * 3
    finally:
        engine.stop(drain_seconds=5)


def test_cpu_int8_quantizes_the_linear_layers_and_still_decodes(tmp_path, model_folder):
    location = ModelLocation(model_folder, "transformers", False)
    (tmp_path / "int8").mkdir()
    int8 = TransformersBackend.load(settings_for(tmp_path / "int8", use8BitCompression=True),
                                    location)
    fp32 = TransformersBackend.load(settings_for(tmp_path), location)
    layer = int8.model.model.layers[0].mlp.down_proj
    assert isinstance(layer, torch.ao.nn.quantized.dynamic.Linear)
    assert layer.weight().dtype == torch.qint8
    tokens = prompt_tokens(int8, "What is 2 + 2?")
    quantized, reference = prefill(int8, 0, tokens), prefill(fp32, 0, tokens)
    assert np.isfinite(quantized).all()
    assert np.corrcoef(quantized, reference)[0, 1] > 0.95


# -- the loading plan's from_pretrained arguments ----------------------------------------------


def test_cpu_plan_is_fp32_without_quantization():
    plan = loading_config(plan_settings(device="cpu"), CPU_BOX)
    assert plan.device == "cpu" and plan.quantization == "none"
    assert plan.from_pretrained == {"dtype": torch.float32}
    assert plan.warnings == ()


@pytest.mark.parametrize("values", [{"use8BitCompression": True}, {"quantization": "8bit"}])
def test_cpu_8bit_falls_back_to_torch_int8_with_a_warning(values):
    plan = loading_config(plan_settings(device="cpu", **values), CPU_BOX)
    assert plan.quantization == "int8"
    assert "quantization_config" not in plan.from_pretrained
    assert any("torch's dynamic int8" in note for note in plan.warnings)


def test_cuda_plan_spreads_over_the_gpus_within_vram_with_cpu_offload_room():
    plan = loading_config(plan_settings(device="cuda", numberOfGpus=2, vRamGb=8), GPU_BOX)
    assert plan.device == "cuda" and plan.quantization == "none"
    assert plan.from_pretrained["dtype"] == torch.float16
    assert plan.from_pretrained["device_map"] == "auto"
    assert plan.from_pretrained["max_memory"] == {0: "8GiB", 1: "8GiB", "cpu": "57GiB"}
    assert "quantization_config" not in plan.from_pretrained


def test_use8bitcompression_on_cuda_is_bitsandbytes_8bit():
    plan = loading_config(plan_settings(device="cuda", use8BitCompression=True), GPU_BOX)
    config = plan.from_pretrained["quantization_config"]
    assert isinstance(config, transformers.BitsAndBytesConfig)
    assert config.load_in_8bit and not config.load_in_4bit
    assert config.llm_int8_enable_fp32_cpu_offload
    assert plan.from_pretrained["max_memory"] == {0: "8GiB", "cpu": "57GiB"}  # numberOfGpus 1


def test_4bit_on_cuda_is_nf4_with_double_quantization_and_fp16_compute():
    plan = loading_config(plan_settings(device="cuda", quantization="4bit", vRamGb=7.5), GPU_BOX)
    config = plan.from_pretrained["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.float16
    assert plan.from_pretrained["max_memory"][0] == "7.5GiB"


def test_explicit_quantization_overrides_use8bitcompression_with_a_warning():
    settings = plan_settings(device="cuda", use8BitCompression=True, quantization="none")
    assert requested_quantization(settings) == "none"
    plan = loading_config(settings, GPU_BOX)
    assert "quantization_config" not in plan.from_pretrained
    assert any("use8BitCompression" in note for note in plan.warnings)


def test_more_gpus_asked_than_present_uses_those_present_with_a_warning():
    plan = loading_config(plan_settings(device="cuda", numberOfGpus=4), GPU_BOX)
    assert sorted(k for k in plan.from_pretrained["max_memory"] if k != "cpu") == [0, 1]
    assert any("numberOfGpus" in note for note in plan.warnings)


def test_vram_zero_means_no_limit_but_the_gpus_own_memory():
    plan = loading_config(plan_settings(device="cuda", numberOfGpus=2, vRamGb=0), GPU_BOX)
    memory = plan.from_pretrained["max_memory"]
    assert memory[0] == 20 * GIB and memory[1] == 22 * GIB


def test_mps_plan_is_fp16_on_the_apple_gpu_and_refuses_quantization():
    box = DeviceInfo(mps=True)
    plan = loading_config(plan_settings(device="mps"), box)
    assert plan.from_pretrained == {"dtype": torch.float16, "device_map": {"": "mps"}}
    with pytest.raises(BackendError, match="mps"):
        loading_config(plan_settings(device="mps", use8BitCompression=True), box)
    with pytest.raises(BackendError, match="mps.is_available"):
        loading_config(plan_settings(device="mps"), CPU_BOX)


def test_device_problem_names_what_is_missing():
    assert device_problem("cpu") is None
    if not torch.cuda.is_available():
        assert "torch.cuda.is_available() is False" in device_problem("cuda")
    if not torch.backends.mps.is_available():
        assert "mps" in device_problem("mps")


def test_the_planned_max_memory_makes_accelerate_spread_and_offload(model_folder):
    """accelerate reads our max_memory as planned: layers over GPU 0 and 1, the rest offloaded."""
    from accelerate import infer_auto_device_map, init_empty_weights
    config = transformers.AutoConfig.from_pretrained(model_folder)
    config.num_hidden_layers = 8
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    vram_gb = weight_bytes / 3 / GIB  # each GPU takes about a third; the CPU the rest
    settings = plan_settings(device="cuda", numberOfGpus=2, vRamGb=vram_gb)
    memory = loading_config(settings, GPU_BOX).from_pretrained["max_memory"]
    device_map = infer_auto_device_map(model, max_memory=memory,
                                       no_split_module_classes=model._no_split_modules)
    assert {0, 1, "cpu"} <= set(device_map.values())
    assert device_map["model.embed_tokens"] == 0 and device_map["model.layers.7"] == "cpu"
    warning = offload_warning(device_map, settings)
    assert warning and "\"vRamGb\"" in warning and "\"numberOfGpus\" 2" in warning
