"""The serving benchmark's verdicts: how rounds are ordered and how llama-server is compared."""

from __future__ import annotations

from bench.report import Row, against_llama_server, goals
from bench.rounds import in_round_order


def row(contestant: str, rates: list[float]) -> Row:
    ordered = sorted(rates)
    return Row(contestant, 8, len(rates), 0.9, 1.3, 0.08, 0.09, ordered[len(ordered) // 2], 128,
               0.01, 0.01, 0, rates)


def test_every_other_round_runs_the_contestants_in_reverse():
    assert [in_round_order(["direct", "ours", "theirs"], r) for r in range(3)] == [
        ["direct", "ours", "theirs"], ["theirs", "ours", "direct"], ["direct", "ours", "theirs"]]


def test_llama_server_is_judged_round_by_round_not_on_the_medians_of_drifting_rates():
    # The machine was faster in the first round: the medians alone (86 vs 85) would say
    # "above", but llama-server was faster in two of the three rounds.
    ours, theirs = row("Tanglebox", [95.0, 80.0, 86.0]), row("llama-server", [97.0, 85.0, 84.0])
    verdict = against_llama_server(ours, theirs)
    assert verdict.startswith("0.98 of llama-server's tokens/s, median of 3 rounds (0.94–1.02")
    assert verdict.endswith("(goal: above): missed; above it in 1 of 3 rounds")
    ahead = against_llama_server(row("Tanglebox", [80.0, 90.0]), row("llama-server", [79.0, 89.0]))
    assert ahead.endswith("(goal: above): met; above it in 2 of 2 rounds")


def test_a_round_where_either_side_failed_does_not_count():
    ours = row("Tanglebox", [80.0, float("nan"), 85.0])
    theirs = row("llama-server", [81.0, 88.0, 86.0])
    assert against_llama_server(ours, theirs).endswith("missed; above it in 0 of 2 rounds")


def test_llama_server_on_either_endpoint_is_compared_at_every_number_of_clients():
    rows = [row("Tanglebox OpenAI chat stream", [70.0, 71.0]),
            row("llama-server OpenAI chat stream", [69.0, 72.0]),
            row("Tanglebox OpenAI chat stream", [90.0, 91.0]),
            row("llama-server OpenAI chat stream", [88.0, 89.0])]
    rows[0].clients = rows[1].clients = 1
    lines = goals(rows, 8)
    assert ("Tanglebox OpenAI chat stream, 1 client: 1.00 of llama-server's tokens/s, median of "
            "2 rounds (0.99–1.01") in "\n".join(lines)
    assert any(line.startswith("Tanglebox OpenAI chat stream, 8 clients: 1.02 of llama-server's")
               for line in lines)
    assert any("vs llama-server OpenAI chat stream 900 ms (goal: below)" in line
               for line in lines)
