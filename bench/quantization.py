"""Memory and speed of the transformers backend for each kind of weights, on one device.

``python -m bench.quantization [--device cpu|cuda] [--tokens 48] [--rounds 3]
[--models smollm2,random] [--threads N]``

Modes: on cpu ``fp32`` and ``int8`` (torch dynamic int8 of the Linear layers, what
``quantization: 8bit`` falls back to there); on cuda ``fp16``, ``8bit`` and ``4bit``
(bitsandbytes). Models: SmolLM2-135M-Instruct from its GGUF file (transformers dequantizes it
at load), and a Llama-shaped model with random weights built from a config (about 330 M
parameters for cpu, 1.1 B for cuda: TinyLlama's shape), saved once to a temporary folder with
SmolLM2's tokenizer.

Each (model, mode) is loaded in a fresh subprocess through ``TransformersBackend.load_planned``
with the plan the server makes, so memory figures belong to that load alone: on cpu the growth
of resident memory (VmRSS after generating, VmHWM at the peak, over the process before the
load); on cuda ``torch.cuda.max_memory_allocated``. The random model's safetensors are read
with ``disable_mmap`` so its weights count as process memory, as a GGUF file's dequantized
weights do. "weights" counts the bytes of the model's tensors as loaded (int8, packed 4-bit and
their scales included). Speed: greedy decoding through ``backend.decode`` after a short chat
prompt, one stream, then four streams batched. Rounds run the modes in turn and the medians
are reported: a shared machine drifts, side-by-side ratios hold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Write a long story about a dragon who learns to bake bread."
MODES = {"cpu": ("fp32", "int8"), "cuda": ("fp16", "8bit", "4bit")}
QUANTIZATION = {"fp32": "none", "fp16": "none", "int8": "8bit", "8bit": "8bit", "4bit": "4bit"}
# Llama shapes with SmolLM2's 49152-token vocabulary (tied embeddings).
RANDOM_SHAPES = {
    "cpu": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                num_attention_heads=16, num_key_value_heads=8),
    "cuda": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=tuple(MODES))
    parser.add_argument("--tokens", type=int, default=48, help="tokens generated per stream")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="smollm2,random")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: torch's, one per core)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return
    run(args.device, args.tokens, args.rounds, args.models.split(","), args.threads)


def run(device: str, tokens: int, rounds: int, model_names: list[str], threads: int) -> None:
    from tanglebox.model_location import embedded_model_path
    started_load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="tanglebox-qbench-") as scratch:
        models = {}
        if "smollm2" in model_names:
            models["SmolLM2-135M (GGUF)"] = str(embedded_model_path())
        if "random" in model_names:
            folder, count = build_random_model(Path(scratch) / "random", device)
            models[f"random Llama {count / 1e6:.0f} M"] = str(folder)
        results: dict[tuple[str, str], list[dict]] = {}
        for round_index in range(rounds):
            for label, path in models.items():
                for mode in MODES[device]:
                    spec = {"path": path, "mode": mode, "device": device, "tokens": tokens,
                            "threads": threads}
                    result = run_child(spec)
                    print(f"round {round_index + 1}: {label} {mode}: {result}", file=sys.stderr)
                    results.setdefault((label, mode), []).append(result)
    command = (f"python -m bench.quantization --device {device} --tokens {tokens} "
               f"--rounds {rounds} --models {','.join(model_names)}"
               + (f" --threads {threads}" if threads else ""))
    report(results, device, command, rounds, started_load, os.getloadavg()[0], threads)


def run_child(spec: dict) -> dict:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.quantization", "--child", json.dumps(spec)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        return {"error": (completed.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def build_random_model(folder: Path, device: str) -> tuple[Path, int]:
    """A Llama with random weights and SmolLM2's tokenizer, saved as a transformers folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from tanglebox.model_location import embedded_model_path
    gguf = embedded_model_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **RANDOM_SHAPES[device])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    count = sum(p.numel() for p in model.parameters())
    model.to(torch.float16 if device == "cuda" else torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, count


def measure(path: str, mode: str, device: str, tokens: int, threads: int) -> dict:
    import dataclasses
    import torch
    if threads:
        torch.set_num_threads(threads)
    from tanglebox.backends.transformers.backend import TransformersBackend
    from tanglebox.backends.transformers.plan import DeviceInfo, loading_config
    from tanglebox.model_location import ModelLocation
    from tanglebox.settings import load_settings
    location = ModelLocation(Path(path), "transformers", path.endswith(".gguf"))
    with tempfile.TemporaryDirectory(prefix="tanglebox-qbench-") as scratch:
        settings_path = Path(scratch) / "settings.json"
        settings_path.write_text(json.dumps({
            "backend": "transformers", "device": device, "quantization": QUANTIZATION[mode],
            "parallelSlots": 4, "contextLength": 1024}))
        settings = load_settings(settings_path)
        plan = loading_config(settings, DeviceInfo.probe(), gguf=location.gguf)
        if not location.gguf:
            # Weights in process memory, as from a GGUF file: memory-mapped safetensors would
            # count as page cache, and an int8 load would leave its fp32 pages there.
            plan = dataclasses.replace(plan, extra_arguments={"disable_mmap": True})
        resident_before = _status_bytes("VmRSS")
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        backend = TransformersBackend.load_planned(settings, location, plan)
        result = {"load_s": round(time.perf_counter() - started, 1),
                  "weights_mb": round(_weight_bytes(backend.model) / 1e6)}
        result["tokens_per_s"] = round(decode_speed(backend, 1, tokens), 1)
        result["tokens_per_s_4_streams"] = round(decode_speed(backend, 4, tokens), 1)
        result["rss_mb"] = round((_status_bytes("VmRSS") - resident_before) / 1e6)
        result["peak_rss_mb"] = round((_status_bytes("VmHWM") - resident_before) / 1e6)
        if device == "cuda":
            result["vram_mb"] = round(torch.cuda.max_memory_allocated() / 1e6)
        backend.close()
    return result


def decode_speed(backend, streams: int, tokens: int, warmup: int = 0) -> float:
    """Greedy tokens per second over ``streams`` slots decoding together after one prompt,
    timed after ``warmup`` steps (bench/transformers_decode.py: compilation happens there)."""
    import numpy as np
    from tanglebox.backends.base import DecodeItem
    from tanglebox.prompting import USER, Message, render_prompt
    text = render_prompt("auto", [Message(USER, PROMPT)], "", backend.chat_format).text
    prompt = backend.tokenize(text)
    last = []
    for slot in range(streams):
        backend.forget(slot, 0)
        last.append(backend.decode([DecodeItem(slot, prompt, 0)])[0])
    position = len(prompt)
    started = time.perf_counter()
    for step in range(warmup + tokens):
        if step == warmup:
            started = time.perf_counter()
        items = [DecodeItem(slot, [int(np.argmax(last[slot]))], position)
                 for slot in range(streams)]
        last = backend.decode(items)
        position += 1
    return streams * tokens / (time.perf_counter() - started)


def _weight_bytes(model) -> int:
    """Bytes of the model's tensors, each storage once (tied weights share one)."""
    import torch
    seen: dict[int, int] = {}

    def add(value) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_quantized:
                seen[id(value)] = value.numel() * value.element_size()
            else:
                seen[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        elif isinstance(value, (tuple, list)):
            for item in value:
                add(item)

    for value in model.state_dict().values():
        add(value)
    return sum(seen.values())


def _status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (its peak) of this process, from /proc/self/status."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def report(results: dict, device: str, command: str, rounds: int, load_before: float,
           load_after: float, threads: int = 0) -> None:
    columns = ["load_s", "weights_mb", "rss_mb", "peak_rss_mb", "tokens_per_s",
               "tokens_per_s_4_streams"] + (["vram_mb"] if device == "cuda" else [])
    print(f"\n{machine_description(device, threads)}")
    print(f"Load average (1 min) at start / end: {load_before:.1f} / {load_after:.1f}")
    print(f"Command: {command}; medians of {rounds} rounds")
    print("weights_mb: bytes of the loaded tensors; rss_mb / peak_rss_mb: resident memory added "
          "by the load, after generating / at its peak; vram_mb: torch.cuda.max_memory_allocated; "
          "x speed: the mode's tokens/s over the first mode's in the same round, median "
          "(MB = 10^6 bytes)\n")
    print("| model | weights | " + " | ".join(columns) + " | x speed | x speed, 4 streams |")
    print("|---|---|" + "---:|" * (len(columns) + 2))
    first_mode = MODES[device][0]
    for (label, mode), runs in results.items():
        good = [r for r in runs if "error" not in r]
        if not good:
            print(f"| {label} | {mode} | failed: {runs[0]['error']} |")
            continue
        cells = [f"{statistics.median(r[c] for r in good):g}" for c in columns]
        for column in ("tokens_per_s", "tokens_per_s_4_streams"):
            ratios = [run[column] / base[column]
                      for run, base in zip(runs, results.get((label, first_mode), []))
                      if "error" not in run and "error" not in base and base[column]]
            cells.append(f"{statistics.median(ratios):.2f}" if ratios else "")
        print(f"| {label} | {mode} | " + " | ".join(cells) + " |")


def machine_description(device: str, threads: int = 0) -> str:
    import torch
    import transformers
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    text = (f"Machine: {cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, "
            f"{platform.system()} {platform.release()}; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, "
            f"torch threads {threads or torch.get_num_threads()}")
    if device == "cuda" and torch.cuda.is_available():
        text += f"; GPU: {torch.cuda.get_device_name(0)}"
        try:
            import bitsandbytes
            text += f", bitsandbytes {bitsandbytes.__version__}"
        except ImportError:
            pass
    return text


if __name__ == "__main__":
    main()
