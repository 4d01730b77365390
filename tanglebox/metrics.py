"""What ``/metrics`` counts, taken where every reply passes, whatever its surface.

Where each number comes from::

    Runtime.check_open / submit, refused ──► ReplyMetrics.refused: replies{outcome=<reason>}
    Runtime.submit, a Generation ──► ReplyMetrics.watch: generation.watcher = a _Watch
    Generation._emit (engine thread) ──► _Watch.emitted: a gap between Deltas (inter-token
                                         latency); the final Done/Error: outcome, tokens,
                                         time to first token
    the app's after_request ──► http_requests{surface, model, status} (web/metrics_route.py)
    a scrape ──► ModelCollector reads runtime.model_statuses(): busy, waiting, slots, state...

The surface is read from the Flask request a reply was submitted in (its path), so no adapter
names itself. The engine's thread never calls ``prometheus_client``: once gevent has patched
``threading``, its locks are gevent's, not for a native thread. Reply numbers accumulate in
plain dicts under one native lock (held for a few additions, never across a wait), and
:class:`ReplyCollector` turns them into metric families at scrape time.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from flask import has_request_context, request
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)

from tanglebox import handoff
from tanglebox.generation import Delta, Done, Error, Event, Generation
from tanglebox.served_models import ModelState

if TYPE_CHECKING:
    from tanglebox.runtime import Runtime

# Seconds; vLLM's and TGI's choices, trimmed: CPU replies start in tens of milliseconds to
# tens of seconds, and tokens come every few to a few hundred milliseconds.
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
INTER_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
NO_SURFACE = "internal"  # a reply submitted outside any request (a test, a benchmark)
# Where a request's surface and model are kept for its HTTP counter and access log line.
SURFACE_KEY, MODEL_KEY = "tanglebox.surface", "tanglebox.model"  # in the WSGI environ


def surface_of_request() -> str:
    """The surface of the request being served: ``ui``, ``widget``, ``rest``, ``original``,
    ``openai``, or ``health``, ``metrics``, ``other`` for the rest."""
    if not has_request_context():
        return NO_SURFACE
    path = request.path
    if path == "/v1" or path.startswith("/v1/"):
        return "openai"
    if path == "/conversation":
        return "rest"
    if path in ("/ws/chat", "/widget"):
        return "widget" if path == "/widget" or request.args.get("surface") == "widget" else "ui"
    if path == "/" and request.headers.get("Upgrade", "").lower() == "websocket":
        return "original"
    if path in ("/", "/signin") or path.startswith("/static/"):
        return "ui"
    if path in ("/health", "/metrics"):
        return path[1:]
    return "other"


@dataclass
class Histogram:
    """Observations counted per bucket (``le`` bounds), and their sum."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, the last one +Inf
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        running, buckets = 0, []
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts):
            running += count
            buckets.append((bound, running))
        return buckets


@dataclass
class ReplyTotals:
    """Everything counted so far; a copy is what a scrape reads."""

    # by (surface, model, outcome), and the tokens by (surface, model)
    replies: dict[tuple[str, str, str], int] = field(default_factory=dict)
    prompt_tokens: dict[tuple[str, str], int] = field(default_factory=dict)
    completion_tokens: dict[tuple[str, str], int] = field(default_factory=dict)
    first_token: dict[str, Histogram] = field(default_factory=dict)  # by model
    inter_token: dict[str, Histogram] = field(default_factory=dict)


@dataclass
class _Watch:
    """One reply's watcher (``Generation.watcher``)."""

    metrics: ReplyMetrics
    surface: str
    model: str
    last_delta_at: float | None = None
    ended: bool = False

    def emitted(self, generation: Generation, event: Event) -> None:
        if isinstance(event, Delta):
            self.metrics._delta(self, generation)
        else:
            self.metrics._ended(self, generation, event)


class ReplyMetrics:
    """The replies' counters and histograms, one per ``Runtime``; safe from any thread."""

    def __init__(self) -> None:
        self._lock = handoff.native_lock()  # no wait inside: safe in a greenlet too
        self._totals = ReplyTotals()

    def refused(self, model: str, reason: str) -> None:
        """A request refused before it was queued (maintenance, queue full, ...)."""
        surface = _note_model(model)
        with self._lock:
            _add(self._totals.replies, (surface, model, reason), 1)

    def watch(self, generation: Generation, model: str) -> None:
        """Count ``generation`` from now on, on the surface of the request being served."""
        watch = _Watch(self, _note_model(model), model)
        generation.watcher = watch
        # The engine may have ended it before the watcher was set (a prompt refused by its
        # size in submit itself): it sets final_emitted before it reads the watcher, so one
        # of the two sees the other, and _ended counts once.
        if generation.final_emitted is not None:
            self._ended(watch, generation, generation.final_emitted)

    def totals(self) -> ReplyTotals:
        """A consistent copy of everything counted so far."""
        with self._lock:
            t = self._totals
            return ReplyTotals(
                dict(t.replies), dict(t.prompt_tokens), dict(t.completion_tokens),
                {m: Histogram(h.bounds, list(h.counts), h.total) for m, h in t.first_token.items()},
                {m: Histogram(h.bounds, list(h.counts), h.total) for m, h in t.inter_token.items()})

    # -- the emitting thread's side ------------------------------------------------------

    def _delta(self, watch: _Watch, generation: Generation) -> None:
        now = generation.first_delta_at if watch.last_delta_at is None else time.monotonic()
        with self._lock:
            if watch.last_delta_at is not None:
                _histogram(self._totals.inter_token, watch.model, INTER_TOKEN_BUCKETS).observe(
                    now - watch.last_delta_at)
            watch.last_delta_at = now

    def _ended(self, watch: _Watch, generation: Generation, event: Done | Error) -> None:
        with self._lock:
            if watch.ended:
                return
            watch.ended = True
            t, labels = self._totals, (watch.surface, watch.model)
            outcome = event.finish_reason if isinstance(event, Done) else event.code
            _add(t.replies, (*labels, str(outcome)), 1)
            if isinstance(event, Done):
                _add(t.prompt_tokens, labels, event.prompt_tokens)
                _add(t.completion_tokens, labels, event.completion_tokens)
            if generation.first_delta_at is not None:
                _histogram(t.first_token, watch.model, FIRST_TOKEN_BUCKETS).observe(
                    generation.first_delta_at - generation.submitted_at)


def _note_model(model: str) -> str:
    """The surface of the request being served, whose environ now names ``model``."""
    if has_request_context():
        request.environ[MODEL_KEY] = model
    return surface_of_request()


def _add(counter: dict, key: tuple, amount: int) -> None:
    counter[key] = counter.get(key, 0) + amount


def _histogram(by_model: dict[str, Histogram], model: str,
               bounds: tuple[float, ...]) -> Histogram:
    histogram = by_model.get(model)
    if histogram is None:
        histogram = by_model[model] = Histogram(bounds)
    return histogram


class ReplyCollector:
    """The replies' metric families, from a copy of :class:`ReplyMetrics`' totals."""

    def __init__(self, metrics: ReplyMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        t = self.metrics.totals()
        replies = CounterMetricFamily(
            "tanglebox_replies", "Replies by surface, model and outcome: a finish reason, an "
            "error code, or the reason it was refused.", labels=["surface", "model", "outcome"])
        for labels, value in sorted(t.replies.items()):
            replies.add_metric(list(labels), value)
        yield replies
        for name, counts, what in (("tanglebox_prompt_tokens", t.prompt_tokens, "Prompt tokens"),
                                   ("tanglebox_completion_tokens", t.completion_tokens,
                                    "Generated tokens")):
            family = CounterMetricFamily(name, f"{what} of finished replies, by surface and "
                                               "model.", labels=["surface", "model"])
            for labels, value in sorted(counts.items()):
                family.add_metric(list(labels), value)
            yield family
        for name, histograms, what in (
                ("tanglebox_time_to_first_token_seconds", t.first_token,
                 "From submitting a reply to its first text, by model."),
                ("tanglebox_inter_token_latency_seconds", t.inter_token,
                 "Between a reply's successive pieces of text (one token each, unless text is "
                 "held back at a possible stop string), by model.")):
            family = HistogramMetricFamily(name, what, labels=["model"])
            for model, histogram in sorted(histograms.items()):
                family.add_metric([model], histogram.cumulative(), histogram.total)
            yield family


class ModelCollector:
    """Per served model, read from ``runtime.model_statuses()`` at each scrape (no network)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        statuses = self.runtime.model_statuses()
        gauges: list[tuple[Any, str]] = [
            (GaugeMetricFamily("tanglebox_model_busy_slots", "Replies being generated now.",
                               labels=["model"]), "busy"),
            (GaugeMetricFamily("tanglebox_model_waiting_requests",
                               "Replies queued for a slot (the queue depth).", labels=["model"]),
             "waiting"),
            (GaugeMetricFamily("tanglebox_model_slots", "Replies the model generates at once "
                               "(parallelSlots, or a remote endpoint's maxConcurrent).",
                               labels=["model"]), "capacity"),
            (CounterMetricFamily("tanglebox_model_cached_prompt_tokens", "Prompt tokens served "
                                 "from the prefix cache (local models).", labels=["model"]),
             "cached_prompt_tokens"),
            (CounterMetricFamily("tanglebox_model_upstream_errors", "Failed calls to a remote "
                                 "endpoint.", labels=["model"]), "upstream_errors"),
        ]
        state = GaugeMetricFamily("tanglebox_model_state", "1 for the model's state (loading, "
                                  "ready, failed, unavailable), 0 for the others.",
                                  labels=["model", "kind", "state"])
        for status in statuses:
            for family, attribute in gauges:
                family.add_metric([status.id], getattr(status, attribute))
            for each in ModelState:
                state.add_metric([status.id, status.kind, str(each)], float(status.state == each))
        yield from (family for family, _ in gauges)
        yield state
