"""The serving benchmark's report: per-round runs summarized into rows, the table, the verdicts.

Each contestant's ``Run`` (one K, one round) is pooled over the rounds into a ``Row``: latency
percentiles over all replies, the median of the per-round tokens/s, and the per-round rates
themselves, so ``against_llama_server`` can judge the ratio within each round (the machine's
drift cancels) rather than the ratio of two medians; ``proxy_overhead`` judges a front
Tanglebox against its upstream hit directly the same way, with each round's TTFT p50 beside.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class Run:
    """One contestant, one K, one round."""

    contestant: str
    clients: int
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    health: list[float] = field(default_factory=list)
    ping: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Row:
    contestant: str
    clients: int
    rounds: int
    ttft_p50: float
    ttft_p95: float
    itl_p50: float
    itl_p95: float
    tokens_per_second: float  # median over rounds
    per_client_tokens: float
    health_p99: float
    ping_p99: float
    errors: int
    round_rates: list[float] = field(default_factory=list)  # tokens/s of each round, in order
    round_ttft_p50: list[float] = field(default_factory=list)  # each round's TTFT p50, in order


def summarize(runs: list[Run]) -> Row:
    pooled = lambda name: [v for r in runs for v in getattr(r, name)]  # noqa: E731
    rates = [r.tokens / r.seconds if r.seconds and r.seconds == r.seconds else float("nan")
             for r in runs]  # one per round, NaN where no token came
    finite = [rate for rate in rates if rate == rate]
    return Row(runs[0].contestant, runs[0].clients, len(runs),
               percentile(pooled("ttft"), 50), percentile(pooled("ttft"), 95),
               percentile(pooled("itl"), 50), percentile(pooled("itl"), 95),
               statistics.median(finite) if finite else float("nan"),
               statistics.median(r.tokens / r.clients for r in runs),
               percentile(pooled("health"), 99), percentile(pooled("ping"), 99),
               sum(len(r.errors) for r in runs), rates,
               [percentile(r.ttft, 50) for r in runs])


def ms(seconds: float) -> str:
    return "–" if seconds != seconds else f"{seconds * 1000:.0f}"


def markdown_table(rows: list[Row]) -> str:
    lines = ["| contestant | K | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms | "
             "tokens/s (all K) | tokens/reply | /health p99 ms | ping p99 ms | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.clients, r.contestant)):
        lines.append(f"| {r.contestant} | {r.clients} | {ms(r.ttft_p50)} | {ms(r.ttft_p95)} | "
                     f"{ms(r.itl_p50)} | {ms(r.itl_p95)} | {r.tokens_per_second:.1f} | "
                     f"{r.per_client_tokens:.0f} | {ms(r.health_p99)} | {ms(r.ping_p99)} | "
                     f"{r.errors} |")
    return "\n".join(lines)


def goals(rows: list[Row], largest: int) -> list[str]:
    """The issue's goals, each with the measured ratio."""
    by = {(r.contestant, r.clients): r for r in rows}
    # llama-server's row, whichever of its endpoints was driven (its name says which)
    servers = {r.clients: r for r in rows if r.contestant.startswith("llama-server")}
    lines = []
    surfaces = sorted({r.contestant for r in rows if r.contestant.startswith("Tanglebox")})
    for surface in surfaces:
        one, direct_one = by.get((surface, 1)), by.get(("llama-cpp-python direct", 1))
        if one and direct_one:
            ratio = one.tokens_per_second / direct_one.tokens_per_second
            lines.append(f"{surface}, 1 client: {ratio:.2f} of direct (goal ≥ 0.90): "
                         f"{'met' if ratio >= 0.90 else 'missed'}")
        many, direct_many = by.get((surface, largest)), by.get(("llama-cpp-python direct",
                                                                   largest))
        if many and direct_many:
            ratio = many.tokens_per_second / direct_many.tokens_per_second
            lines.append(f"{surface}, {largest} clients: {ratio:.2f} of direct batched "
                         f"(goal ≥ 0.85): {'met' if ratio >= 0.85 else 'missed'}")
        for k in sorted(servers):
            ours = by.get((surface, k))
            if ours:
                lines.append(f"{surface}, {k} client{'s' if k > 1 else ''}: "
                             f"{against_llama_server(ours, servers[k])}")
        server = servers.get(largest)
        if many and server:
            lines.append(f"{surface}, {largest} clients: TTFT p50 {ms(many.ttft_p50)} ms vs "
                         f"{server.contestant} {ms(server.ttft_p50)} ms (goal: below): "
                         f"{'met' if many.ttft_p50 < server.ttft_p50 else 'missed'}")
    return lines


def against_llama_server(ours: Row, server: Row) -> str:
    """The goal "above llama-server's aggregate", judged on the ratio of the two rates in each
    round (measured minutes apart at most, so the machine's drift cancels), median over rounds."""
    ratios = per_round_ratios(ours, server)
    if not ratios:
        return "no round where both streamed (goal: above llama-server): missed"
    ratio = statistics.median(ratios)
    return (f"{ratio:.2f} of llama-server's tokens/s, median of {len(ratios)} rounds "
            f"({min(ratios):.2f}–{max(ratios):.2f}; {ours.tokens_per_second:.1f} vs "
            f"{server.tokens_per_second:.1f}) (goal: above): "
            f"{'met' if ratio > 1 else 'missed'}; above it in "
            f"{sum(r > 1 for r in ratios)} of {len(ratios)} rounds")


def per_round_ratios(ours: Row, theirs: Row) -> list[float]:
    """Our tokens/s over theirs in each round where both streamed (NaN marks a round without)."""
    return [a / b for a, b in zip(ours.round_rates, theirs.round_rates)
            if a == a and b == b and b > 0]


PROXY_RATE_GOAL = 0.95  # of the upstream's tokens/s hit directly (issue 16, item 6)
PROXY_TTFT_GOAL = 0.005  # seconds the proxy may add to the TTFT p50


def proxy_overhead(front: Row, direct: Row) -> list[str]:
    """The proxy-overhead goals for one front contestant against the upstream hit directly at
    the same K: the per-round tokens/s ratio and the per-round difference of the TTFT p50s,
    each the median over the rounds where both streamed (so the machine's drift cancels)."""
    k = f"{front.clients} client{'s' if front.clients > 1 else ''}"
    ratios = per_round_ratios(front, direct)
    if ratios:
        ratio = statistics.median(ratios)
        verdict = "met" if ratio >= PROXY_RATE_GOAL else "missed"
        rate = (f"{front.contestant}, {k}: {ratio:.2f} of the direct tokens/s, median of "
                f"{len(ratios)} rounds ({min(ratios):.2f}–{max(ratios):.2f}; "
                f"{front.tokens_per_second:.1f} vs {direct.tokens_per_second:.1f}) "
                f"(goal ≥ {PROXY_RATE_GOAL:.2f}): {verdict}")
    else:
        rate = f"{front.contestant}, {k}: no round where both streamed: missed"
    added = [a - b for a, b in zip(front.round_ttft_p50, direct.round_ttft_p50)
             if a == a and b == b]
    if not added:
        return [rate, f"{front.contestant}, {k}: no TTFT in a round where both streamed: missed"]
    median = statistics.median(added)
    ttft = (f"{front.contestant}, {k}: TTFT p50 {_signed_ms(median)} ms against direct, median "
            f"of {len(added)} rounds ({_signed_ms(min(added))} to {_signed_ms(max(added))}; "
            f"pooled {ms(front.ttft_p50)} vs {ms(direct.ttft_p50)} ms) "
            f"(goal ≤ +{PROXY_TTFT_GOAL * 1000:.0f} ms): "
            f"{'met' if median <= PROXY_TTFT_GOAL else 'missed'}")
    return [rate, ttft]


def _signed_ms(seconds: float) -> str:
    return f"{seconds * 1000:+.1f}"
