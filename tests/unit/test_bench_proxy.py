"""The proxy-overhead benchmark's verdicts, the machine it names, and the front it starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import servers
from bench.machine import cpu_model
from bench.report import Row, Run, proxy_overhead, summarize
from tanglebox.settings import load_settings

NAN = float("nan")


def row(contestant: str, rates: list[float], ttft_p50s: list[float], clients: int = 8) -> Row:
    ordered = sorted(rates)
    return Row(contestant, clients, len(rates), sorted(ttft_p50s)[len(ttft_p50s) // 2], 0.5,
               0.04, 0.05, ordered[len(ordered) // 2], 128, NAN, NAN, 0, rates, ttft_p50s)


def test_the_proxy_is_judged_round_by_round_against_the_upstream_hit_directly():
    # The machine slowed down from round to round; each round's ratio and TTFT difference
    # count, measured side by side, not the spread of the rates across rounds.
    front = row("Tanglebox OpenAI chat stream → llama-server", [112.0, 100.0, 90.0],
                [0.402, 0.420, 0.450])
    direct = row("llama-server direct", [120.0, 107.0, 96.0], [0.400, 0.412, 0.441])
    rate, ttft = proxy_overhead(front, direct)
    assert rate.startswith("Tanglebox OpenAI chat stream → llama-server, 8 clients: 0.93 of the "
                           "direct tokens/s, median of 3 rounds (0.93–0.94; 100.0 vs 107.0)")
    assert rate.endswith("(goal ≥ 0.95): missed")
    assert ttft.startswith("Tanglebox OpenAI chat stream → llama-server, 8 clients: TTFT p50 "
                           "+8.0 ms against direct, median of 3 rounds (+2.0 to +9.0; pooled 420 "
                           "vs 412 ms)")
    assert ttft.endswith("(goal ≤ +5 ms): missed")


def test_a_proxy_within_the_goals_is_said_to_meet_them():
    front = row("Tanglebox REST stream → tanglebox", [99.0, 97.0], [0.093, 0.090], clients=1)
    direct = row("tanglebox direct", [100.0, 100.0], [0.090, 0.092], clients=1)
    rate, ttft = proxy_overhead(front, direct)
    assert rate.startswith("Tanglebox REST stream → tanglebox, 1 client: 0.98 of the direct")
    assert rate.endswith("(goal ≥ 0.95): met")
    assert "TTFT p50 +0.5 ms against direct" in ttft
    assert ttft.endswith("(goal ≤ +5 ms): met")


def test_a_round_where_either_side_failed_does_not_count():
    front = row("front", [NAN, 96.0, 98.0], [NAN, 0.401, 0.402])
    direct = row("direct", [100.0, 100.0, NAN], [0.400, 0.400, NAN])
    rate, ttft = proxy_overhead(front, direct)
    assert "0.96 of the direct tokens/s, median of 1 rounds" in rate
    assert "median of 1 rounds (+1.0 to +1.0" in ttft
    rate, ttft = proxy_overhead(row("front", [NAN], [NAN]), row("direct", [100.0], [0.4]))
    assert rate.endswith("no round where both streamed: missed")
    assert ttft.endswith("no TTFT in a round where both streamed: missed")


def test_each_rounds_ttft_p50_is_kept_for_the_per_round_comparison():
    runs = [Run("front", 2, ttft=[0.1, 0.3], tokens=256, seconds=2.0),
            Run("front", 2, ttft=[0.2, 0.2], tokens=256, seconds=4.0)]
    summary = summarize(runs)
    assert summary.round_ttft_p50 == pytest.approx([0.2, 0.2])
    assert summary.round_rates == [128.0, 64.0]


def test_the_cpu_is_named_by_its_model_name_line():
    cpuinfo = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 1\n"
               "model name\t: AMD EPYC 7B13 64-Core Processor\nflags\t\t: avx avx2\n")
    assert cpu_model(cpuinfo) == "AMD EPYC 7B13 64-Core Processor"
    assert cpu_model("processor\t: 0\n") == ""


def test_the_front_serves_only_the_upstream_as_a_remote_endpoint(monkeypatch, tmp_path):
    started = {}

    class _Recorded:
        def __init__(self, name, command, port, log_path, env=None, cwd=None) -> None:
            started.update(name=name, command=command, env=env)

    monkeypatch.setattr(servers, "ServerProcess", _Recorded)
    monkeypatch.setenv("TANGLEBOX_MODEL_NAME", "/models/other.gguf")
    servers.start_front_tanglebox("http://127.0.0.1:8081/v1", "smollm2.gguf", 8, 300,
                                  tmp_path, 128)
    settings_path = Path(started["command"][started["command"].index("--settings") + 1])
    settings = json.loads(settings_path.read_text(encoding="utf-8"))
    assert settings["modelName"] == ""
    assert settings["remoteEndpoints"] == [
        {"name": "upstream", "baseUrl": "http://127.0.0.1:8081/v1", "model": "smollm2.gguf",
         "maxConcurrent": 8, "timeoutSeconds": 300}]
    assert "TANGLEBOX_MODEL_NAME" not in started["env"]  # nothing from the environment
    loaded = load_settings(settings_path, environ={}, write_missing=False)  # the server takes it
    assert loaded.values["remoteEndpoints"][0]["baseUrl"] == "http://127.0.0.1:8081/v1"
