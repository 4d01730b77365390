"""A remote OpenAI-compatible engine behind the local engine's contract: ``submit() -> Generation``.

Flow of a request::

    adapter ── submit(ChatRequest) ──► refused at once while the endpoint is unavailable
                                       (EndpointUnavailable) or the queue is full (QueueFull)
                                  ──► WaitingQueue (the engine's: bounded, a share per client,
                                            │ round-robin), ``maxConcurrent`` running at most
    a greenlet per running reply ◄──────────┘
      POST {baseUrl}/chat/completions (a raw prompt: /completions), stream=true with usage;
      each ``data:`` chunk's text is a Delta at once; the last chunk's usage gives the counts;
      the end is Done(finish reason, text, counts, timings), or Error(upstream) when the
      upstream failed (before any text: the adapters answer 502; Error(unavailable), 503,
      when it could not be reached), or Done(cancelled/timeout) with the text so far

The upstream renders its own chat template: the request's messages go as they are (system
prompt first), and no conversation template applies. Network I/O runs in greenlets under
gevent (cheap, cooperative; the hub keeps serving /health and pings), in threads without it;
events reach adapters through the same ``Generation`` channel as the local engine's.

Cancel (Stop, a client gone: ``Generation.cancel``) shuts the upstream socket at once, so the
upstream stops generating; a reply is never retried once the request was sent. A background
watcher answers queued requests that timed out or whose client left, and checks the endpoint
(``GET {baseUrl}/models``, with the key) at start, every ``RETRY_PROBE_SECONDS`` while it is
unavailable and every ``READY_PROBE_SECONDS`` while ready, so one that comes back recovers by
itself.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from tanglebox.chat_request import ChatRequest, SamplingOptions
from tanglebox.generation import (Delta, Done, Error, ErrorCode, FinishReason, Generation)
from tanglebox.served_models import REMOTE, ModelState, ModelStatus
from tanglebox.upstream_client import ChatStream, Upstream, UpstreamClient, UpstreamError
from tanglebox.waiting_queue import WaitingQueue

log = logging.getLogger(__name__)

RETRY_PROBE_SECONDS = 2.0  # while unavailable: an upstream that comes back is used soon
READY_PROBE_SECONDS = 30.0
PROBE_TIMEOUT_SECONDS = 5.0
WATCH_SECONDS = 0.25  # how often queued requests are checked for a timeout or a client gone
DEFAULT_TOP_K = SamplingOptions.top_k  # not OpenAI's: sent only when a client changed it
FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH}


class EndpointUnavailable(Exception):
    """The endpoint does not answer now (its ``detail`` is in the log and /health)."""


class RemoteEngine:
    """One ``remoteEndpoints`` entry: its queue, its running replies, its health."""

    kind = REMOTE

    def __init__(self, upstream: Upstream, queue_size: int = 32, request_timeout: float = 600.0,
                 queue_per_client: int | None = None, default_system_prompt: str = "",
                 log_prompts: bool = False) -> None:
        self.upstream = upstream
        self.name = upstream.name
        self.request_timeout = request_timeout
        self.default_system_prompt = default_system_prompt
        self.log_prompts = log_prompts
        self.client = UpstreamClient(upstream)
        self.state = ModelState.LOADING
        self.detail = "checking the endpoint"
        self.upstream_errors = 0
        self._queue = WaitingQueue(upstream.max_concurrent, queue_size, request_timeout,
                                   queue_per_client)
        self._lock = threading.Lock()
        self._running = 0
        self._streams: dict[Generation, ChatStream | None] = {}
        self._next_probe = 0.0
        self._stopping = False
        self._started = False

    # -- the adapters' side -------------------------------------------------------------

    def start(self) -> None:
        if not self._started:
            self._started = True
            threading.Thread(target=self._watch, name=f"remote {self.name}", daemon=True).start()

    def submit(self, request: ChatRequest) -> Generation:
        """Queue a request; raises EndpointUnavailable, QueueFull or EngineStopped at once."""
        if self.state == ModelState.UNAVAILABLE:
            raise EndpointUnavailable(self.detail)
        generation = self._queue.submit(request)
        generation._on_cancel = lambda: self._close_stream(generation)
        self._admit()
        return generation

    def load(self) -> dict[str, int]:
        in_system, waiting = self._queue.counts()
        return {"slots": self.upstream.max_concurrent, "busy": in_system - waiting,
                "waiting": waiting}

    def status(self) -> ModelStatus:
        load = self.load()
        return ModelStatus(id=self.name, kind=REMOTE, state=self.state,
                           detail="" if self.state == ModelState.READY else self.detail,
                           busy=load["busy"], waiting=load["waiting"], capacity=load["slots"],
                           cached_prompt_tokens=0, upstream_errors=self.upstream_errors)

    def stop(self, drain_seconds: float = 30.0, wait: bool = True) -> None:
        """As ``Engine.stop``: no new work; running replies get ``drain_seconds``, then end
        with finish reason ``shutdown``."""
        deadline = self._queue.close(time.monotonic() + drain_seconds)
        self._stopping = True
        if not self._started:
            self._end_at_deadline()
        while wait and self._streams and time.monotonic() < deadline + 5:
            time.sleep(WATCH_SECONDS)

    # -- running replies (a greenlet or thread each) ---------------------------------------

    def _admit(self) -> None:
        while True:
            with self._lock:
                if self._running >= self.upstream.max_concurrent:
                    return
                generation = self._queue.next()
                if generation is None:
                    return
                self._running += 1
                self._streams[generation] = None
            threading.Thread(target=self._serve, args=(generation,), daemon=True).start()

    def _serve(self, generation: Generation) -> None:
        try:
            self._generate(generation)
        except Exception:  # noqa: BLE001 - a bug must not leave a reply hanging
            log.exception("remote %s: the reply failed", self.name)
            generation._emit(Error(ErrorCode.INTERNAL, "The model failed; please try again."))
        finally:
            with self._lock:
                self._running -= 1
                self._streams.pop(generation, None)
            self._queue.release()
            self._admit()

    def _generate(self, generation: Generation) -> None:
        request = generation.request
        admitted_at = time.monotonic()
        deadline = generation.submitted_at + self.request_timeout
        reply = _Reply(generation, admitted_at)
        if generation.cancelled or admitted_at >= deadline:
            reply.end(FinishReason.CANCELLED if generation.cancelled else FinishReason.TIMEOUT)
            return
        path, body = upstream_request(request, self.upstream.model, self.default_system_prompt)
        generation.prompt_by_upstream = True  # the upstream applies its template
        generation.prompt_text = json.dumps(body.get("messages", body.get("prompt")), indent=1,
                                            ensure_ascii=False)
        if self.log_prompts:
            log.info("generation %s: to %s: %s", generation.id, self.name, body)
        stream = self.client.stream()
        with self._lock:
            self._streams[generation] = stream
        if generation.cancelled:  # cancelled before its stream was there to close
            stream.close()
        try:
            stream.open(path, body, deadline)
            for chunk in stream.chunks(deadline):
                reply.take(chunk)
        except UpstreamError as err:
            stream.discard()
            self._failed(err, reply)
            return
        if stream.closed:  # closed by cancel, or by the end of the drain
            stream.discard()
            reply.end(FinishReason.SHUTDOWN if self._stopping and not generation.cancelled
                      else FinishReason.CANCELLED)
            return
        stream.finish()
        self._mark(ModelState.READY, "")
        reply.end(reply.finish_reason)

    def _failed(self, err: UpstreamError, reply: _Reply) -> None:
        generation = reply.generation
        if generation.cancelled or self._stopping:
            reply.end(FinishReason.CANCELLED if generation.cancelled else FinishReason.SHUTDOWN)
            return
        if err.timed_out and time.monotonic() >= generation.submitted_at + self.request_timeout:
            reply.end(FinishReason.TIMEOUT)
            return
        self.upstream_errors += 1
        log.warning("remote %s: %s", self.name, err.detail)
        if err.connect or err.bad_key:
            self._mark(ModelState.UNAVAILABLE, err.detail)
        unreachable = err.connect and not err.timed_out and not reply.text
        generation._emit(Error(ErrorCode.UNAVAILABLE if unreachable else ErrorCode.UPSTREAM,
                               user_message(self.name, err, reply.text)))

    def _close_stream(self, generation: Generation) -> None:
        with self._lock:
            stream = self._streams.get(generation)
        if stream is not None:
            stream.close()

    # -- the watcher ---------------------------------------------------------------------

    def _watch(self) -> None:
        while True:
            self._queue.drop_gone()
            if self._stopping and self._end_at_deadline():
                return
            if time.monotonic() >= self._next_probe and not self._stopping:
                self._probe()
            time.sleep(WATCH_SECONDS)

    def _end_at_deadline(self) -> bool:
        """Past the drain deadline: cut the running replies short; True once all ended."""
        if not self._queue.drain_expired():
            return False
        with self._lock:
            streams = [s for s in self._streams.values() if s is not None]
        for stream in streams:
            stream.close()
        self._queue.shut_down()
        self.client.close()
        return not self._streams

    def _probe(self) -> None:
        try:
            listed = self.client.get_json("/models",
                                          min(PROBE_TIMEOUT_SECONDS, self.upstream.timeout))
        except UpstreamError as err:
            self._mark(ModelState.UNAVAILABLE, err.detail)
            return
        if self.state != ModelState.READY:
            self._check_listed(listed)
        self._mark(ModelState.READY, "")

    def _check_listed(self, listed: Any) -> None:
        """Warn when the upstream does not list the endpoint's ``model``: some engines serve
        any name (llama_cpp.server), others answer 404 (vLLM, Tanglebox)."""
        data = listed.get("data") if isinstance(listed, dict) else None
        ids = [m.get("id") for m in data if isinstance(m, dict)] if isinstance(data, list) else []
        if ids and self.upstream.model not in ids:
            log.warning("remote %s: the upstream lists %s, not %r (the endpoint's \"model\"); "
                        "it may refuse requests for it", self.name,
                        ", ".join(map(str, ids[:5])), self.upstream.model)

    def _mark(self, state: ModelState, detail: str) -> None:
        if state != self.state:
            if state == ModelState.READY:
                log.info("remote %s: ready (%s)", self.name, self.upstream.base_url)
            else:
                log.warning("remote %s: unavailable: %s", self.name, detail)
        self.state, self.detail = state, detail
        self._next_probe = time.monotonic() + (
            READY_PROBE_SECONDS if state == ModelState.READY else RETRY_PROBE_SECONDS)


class _Reply:
    """What came back so far: text, finish reason, usage; ends with the one final event."""

    def __init__(self, generation: Generation, admitted_at: float) -> None:
        self.generation = generation
        self.admitted_at = admitted_at
        self.parts: list[str] = []
        self.finish_reason = FinishReason.STOP
        self.pieces = 0
        self.usage: dict[str, Any] = {}
        self.first_at: float | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def take(self, chunk: dict[str, Any]) -> None:
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return  # the usage chunk has no choices
        choice = choices[0]
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if isinstance(text, str) and text:
            if self.first_at is None:
                self.first_at = time.monotonic()
            self.parts.append(text)
            self.pieces += 1
            self.generation._emit(Delta(text))
        reason = choice.get("finish_reason")
        if isinstance(reason, str):
            self.finish_reason = FINISH_REASONS.get(reason, FinishReason.STOP)

    def end(self, reason: FinishReason) -> None:
        now = time.monotonic()
        first = self.first_at or now
        completion = _count(self.usage, "completion_tokens", self.pieces)
        generating_s = now - first
        timings = {
            "queueMs": round((self.admitted_at - self.generation.submitted_at) * 1000, 1),
            "promptMs": round((first - self.admitted_at) * 1000, 1),
            "generationMs": round(generating_s * 1000, 1),
            "tokensPerSecond": round((completion - 1) / generating_s, 1)
            if completion > 1 and generating_s > 0 else 0.0,
        }
        details = self.usage.get("prompt_tokens_details")
        cached = _count(details if isinstance(details, dict) else {}, "cached_tokens", 0)
        self.generation._emit(Done(reason, self.text, _count(self.usage, "prompt_tokens", 0),
                                   completion, cached, timings))


def upstream_request(request: ChatRequest, model: str,
                     default_system_prompt: str = "") -> tuple[str, dict[str, Any]]:
    """The path and JSON body that ask the upstream for ``request``, streamed with usage."""
    sampling = request.sampling
    body: dict[str, Any] = {"model": model, "stream": True,
                            "stream_options": {"include_usage": True},
                            "max_tokens": request.max_new_tokens,
                            "temperature": request.temperature, "top_p": sampling.top_p}
    if request.prompt_text is not None:
        path, body["prompt"] = "/completions", request.prompt_text
    else:
        system = request.system_prompt or default_system_prompt
        path = "/chat/completions"
        body["messages"] = ([{"role": "system", "content": system}] if system else []) + [
            {"role": m.role, "content": m.content} for m in request.messages]
    if request.stop:
        body["stop"] = list(request.stop)
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if sampling.top_k != DEFAULT_TOP_K:
        body["top_k"] = sampling.top_k
    if sampling.presence_penalty:
        body["presence_penalty"] = sampling.presence_penalty
    if sampling.frequency_penalty:
        body["frequency_penalty"] = sampling.frequency_penalty
    if sampling.logit_bias:
        body["logit_bias"] = {str(token): bias for token, bias in sampling.logit_bias}
    return path, body


def user_message(name: str, err: UpstreamError, text_so_far: str) -> str:
    """What a person is told of a failed upstream call: never its key or its own words."""
    if text_so_far:
        return f"The model {name} stopped in the middle of the reply; the reply is incomplete."
    if err.connect or err.bad_key:
        return unavailable_message(name)
    if err.timed_out:
        return f"The model {name} did not answer in time; try again later."
    if err.status is not None:
        return f"The model {name} could not answer (its server said HTTP {err.status})."
    return f"The model {name} sent a reply that could not be read; try again later."


def unavailable_message(name: str) -> str:
    return f"The model {name} is unavailable; try again later."


def _count(values: dict[str, Any], key: str, default: int) -> int:
    value = values.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else default
