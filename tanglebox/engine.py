"""The one generation engine behind every route.

Flow of a request::

    adapter ── submit(ChatRequest) ──► size check in bytes: a prompt far past the context is
                                       answered prompt_too_long at once, never tokenized
                                  ──► WaitingQueue (bounded: full → QueueFull at once; a
                                            │  share per client; round-robin across clients)
    engine thread (a real OS thread) ◄──────┘
      admit: render the prompt (a raw ``prompt_text`` as it is), tokenize, check its length
             in tokens, make its Sampler (a grammar the backend cannot use: Error(grammar)),
             pick the free slot whose cached tokens share the longest prefix with it (else
             one next to a busy slot, else the least recently used; a backend with states
             saved on disk may load a longer one into it: ``restore_prefix``) and drop the
             rest; while replies run, one prompt per step at most
      step:  one backend.decode over every active slot: one token per generating slot (and
             its lookup draft, ``tanglebox.lookup_decoding``), plus prompt chunks of admitted
             ones (prefill interleaved with generation)
      then:  sample (``tanglebox.sampling``), detokenize UTF-8-safely, hold back partial
             stop strings, emit Delta (and its tokens' log probabilities, if asked); end with
             Done or Error, free the grammar and the slot (its KV cache stays for the next turn)

The size check in ``submit`` and the preparing in ``admit`` are ``tanglebox.admission``'s, which
says why admission is bounded: while any reply runs the engine prepares one prompt, then steps,
so the running replies get a token between any two prompts.

Cancel (client gone, Stop, timeout) is a flag the loop checks before every step, so a
sequence leaves the batch at the next step, also in the middle of a long prompt.
Events (``tanglebox.generation``) reach the adapter's greenlet through a
``handoff.EventChannel``. The queue (``tanglebox.waiting_queue``) is the only state the
adapters' greenlets and the engine thread share, and it holds the only lock; everything else
here belongs to the engine thread.
"""

from __future__ import annotations

import itertools
import logging
import time

from tanglebox import handoff
from tanglebox.admission import Sequence, start_sequence, too_long_in_bytes
from tanglebox.backends.base import Backend, DecodeItem, GrammarError
from tanglebox.chat_request import ChatRequest
from tanglebox.generation import (Delta, Done, Error, ErrorCode, Event, FinishReason,
                                  Generation)
from tanglebox.lookup_decoding import LookupDecoding
from tanglebox.prompting import USER, Message, Prompt, render_prompt
from tanglebox.settings import Settings
from tanglebox.slots import Slot
from tanglebox.waiting_queue import ClientQueueFull, EngineStopped, QueueFull, WaitingQueue

# What a caller of the engine needs, importable from here.
__all__ = ["ClientQueueFull", "Delta", "Done", "Engine", "EngineStopped", "Error", "Event",
           "Generation", "QueueFull"]

log = logging.getLogger(__name__)

MODEL_FAILED = Error(ErrorCode.INTERNAL, "The model failed; please try again.")


class Engine:
    """Owns the backend on its own OS thread; many generations run at once in its slots."""

    def __init__(self, backend: Backend, template_name: str, default_system_prompt: str = "",
                 queue_size: int = 32, request_timeout: float = 600.0, seed: int = -1,
                 log_prompts: bool = False, queue_per_client: int | None = None,
                 lookup_decoding: bool = True) -> None:
        self.backend = backend
        # Prompt tokens per step while other sequences wait on the step (see _step); a
        # backend on hardware where prompt tokens are nearly free in a batch sets it high.
        self.prefill_chunk = getattr(backend, "prefill_chunk", backend.batch_tokens)
        self._restore_prefix = getattr(backend, "restore_prefix", None)
        self.template_name = template_name
        self.default_system_prompt = default_system_prompt
        self.request_timeout = request_timeout
        self.log_prompts = log_prompts
        self._seeds = itertools.count(seed) if seed >= 0 else iter(())  # else: random
        self._slots = [Slot(i) for i in range(backend.max_sequences)]
        self._queue = WaitingQueue(len(self._slots), queue_size, request_timeout,
                                   queue_per_client)
        self._active: list[Sequence] = []
        self._wakeup = handoff.Wakeup()
        self._stopped = handoff.Latch()
        self._started = False
        # While a step hands out tokens: the generations to wake when it is done, in order
        # (a dict, so each is woken once however many events it got).
        self._unwoken: dict[Generation, None] | None = None
        self.cached_prompt_tokens = 0  # prompt tokens reused from a slot's cache, ever (/metrics)
        self.lookup = LookupDecoding(backend, lookup_decoding)

    # -- the adapters' side -------------------------------------------------------------

    def start(self) -> None:
        if not self._started:
            self._started = True
            handoff.start_native_thread(self._run)

    def submit(self, request: ChatRequest) -> Generation:
        """Queue a request; raises QueueFull or EngineStopped at once instead of waiting.

        A prompt too long by its bytes alone is answered ``prompt_too_long`` here, unqueued.
        """
        too_long = too_long_in_bytes(request, self.default_system_prompt,
                                     self.backend.context_length)
        if too_long is not None:
            generation = Generation(request)
            generation._emit(too_long)
            return generation
        generation = self._queue.submit(request)
        self._wakeup.set()
        return generation

    def render(self, request: ChatRequest) -> Prompt:
        if request.prompt_text is not None:  # a raw prompt: no template, no template stops
            return Prompt(request.prompt_text, ())
        system_prompt = request.system_prompt or self.default_system_prompt
        return render_prompt(self.template_name, list(request.messages), system_prompt,
                             self.backend.chat_format)

    def render_check(self) -> None:
        """Raise TemplateError at startup, not at the first request, if prompts cannot render."""
        self.render(ChatRequest((Message(USER, "Hello"),), "", 0.0, 1))

    def load(self) -> dict[str, int]:
        """Slots busy and requests waiting, for /health."""
        in_system, waiting = self._queue.counts()
        return {"slots": len(self._slots), "busy": in_system - waiting, "waiting": waiting}

    def stop(self, drain_seconds: float = 30.0, wait: bool = True) -> None:
        """Take no new work, let running replies finish (up to a limit), then end the thread.

        Replies still running after ``drain_seconds`` end with finish reason ``shutdown``.
        ``wait=False`` only starts the drain (safe to call from a signal-spawned greenlet).
        Any number of calls are safe: a later one can shorten the drain, never lengthen it,
        and returns at once when the engine has already stopped.
        """
        deadline = self._queue.close(time.monotonic() + drain_seconds)
        self._wakeup.set()
        if self._started and wait:
            self._stopped.wait(max(0.0, deadline - time.monotonic()) + 5)

    # -- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                try:
                    if not self._iterate():
                        return
                except Exception:  # noqa: BLE001 - a bug must not leave replies hanging
                    log.exception("the engine loop failed; ending the replies in progress")
                    for seq in list(self._active):
                        self._fail_sequence(seq, MODEL_FAILED)
        finally:
            try:
                self.backend.close()
            finally:
                self._stopped.set()

    def _iterate(self) -> bool:
        """Admit, then step once; False when the engine has stopped for good."""
        self._queue.drop_gone()
        self._admit()
        if self._queue.drain_expired():
            self._shut_down()
            return False
        if not self._active:
            if self._queue.closed and self._queue.empty:
                return False
            self._wakeup.wait(0.5)
            return True
        self._step()
        return True

    def _admit(self) -> None:
        """Take waiting requests into free slots: all of them while nothing runs, else one
        (``tanglebox.admission``: preparing prompts must not hold up running replies)."""
        while True:
            free = [slot for slot in self._slots if not slot.busy]
            running = bool(self._active)
            generation = self._queue.next() if free else None
            if generation is None:
                return
            self._start_sequence(generation, free)
            if running:
                return

    def _start_sequence(self, generation: Generation, free: list[Slot]) -> None:
        started = start_sequence(generation, free, slots=self._slots, backend=self.backend,
                                 render=self.render, seeds=self._seeds,
                                 request_timeout=self.request_timeout,
                                 log_prompts=self.log_prompts,
                                 restore_prefix=self._restore_prefix)
        if not isinstance(started, Sequence):
            self._fail(generation, started)
            return
        started.slot.busy = True
        self.cached_prompt_tokens += started.cached_tokens
        self._active.append(started)

    def _step(self) -> None:
        now = time.monotonic()
        for seq in list(self._active):
            if seq.generation.cancelled:
                self._finish(seq, FinishReason.CANCELLED)
            elif now - seq.generation.submitted_at > self.request_timeout:
                self._finish(seq, FinishReason.TIMEOUT)
        if not self._active:
            return
        items = []
        generating = [s for s in self._active if s.next_token is not None]
        reading = [s for s in self._active if s.next_token is None]  # oldest first
        budget = self.backend.batch_tokens - len(generating)
        room = min(budget, self.lookup.room(len(self._active)))
        for seq in generating:  # streams first: a long prompt never stalls them
            left = seq.generation.request.max_new_tokens - seq.completion_tokens - 1
            draft = self.lookup.draft(seq.lookup, seq.sampler, seq.slot.tokens, seq.next_token,
                                      min(room, left))
            room -= len(draft)
            budget -= len(draft)
            items.append((seq, DecodeItem(seq.slot.index, [seq.next_token, *draft],
                                          len(seq.slot.tokens), logits_count=1 + len(draft))))
        if generating or len(reading) > 1:
            # Others wait on this step: read at most a chunk of prompt, so streams keep
            # flowing during a long prompt, and whole prompts oldest first, so the first to
            # come gets its first token first (prompt tokens cost the same in any step here).
            budget = min(budget, self.prefill_chunk)
        for seq in reading:
            if budget <= 0 or (len(items) > len(generating) and len(seq.to_prefill) > budget):
                break
            chunk = seq.to_prefill[:budget]
            del seq.to_prefill[:len(chunk)]
            budget -= len(chunk)
            items.append((seq, DecodeItem(seq.slot.index, chunk, len(seq.slot.tokens),
                                          want_logits=not seq.to_prefill)))
        try:
            all_logits = self.backend.decode([item for _, item in items])
        except Exception:
            log.exception("the model failed during a decode step")
            for seq in list(self._active):
                self._fail_sequence(seq, MODEL_FAILED)
            return
        # The readers are woken once every token of the step is handed out: a reader's
        # greenlet runs on the web's thread, which would otherwise take the GIL at this
        # loop's first GIL release (numpy, ctypes) and hold up the next decode meanwhile.
        self._unwoken = {}
        try:
            for (seq, item), logits in zip(items, all_logits):
                if item.logits_count > 1:
                    self._accept_run(seq, item, logits)
                    continue
                seq.slot.tokens.extend(item.tokens)
                if item.want_logits:
                    try:
                        self._accept_token(seq, seq.sampler.choose(logits))
                    except GrammarError as err:
                        self._fail_sequence(seq, Error(ErrorCode.GRAMMAR, str(err)))
                    except Exception:  # noqa: BLE001 - e.g. NaN logits: this reply only
                        log.exception("sampling a token failed")
                        self._fail_sequence(seq, MODEL_FAILED)
        finally:
            unwoken, self._unwoken = self._unwoken, None
            for generation in unwoken:
                generation._wake()

    def _accept_run(self, seq: Sequence, item: DecodeItem, rows) -> None:
        """A drafted step: the cache keeps the drafts the model agreed with; the tokens go one
        by one through ``_accept_token`` until one ends the reply (or a cancel comes)."""
        try:
            tokens = self.lookup.verify(seq.lookup, seq.sampler, item.tokens[1:], rows)
        except Exception:  # noqa: BLE001 - e.g. NaN logits: this reply only
            log.exception("sampling a token failed")
            self.backend.forget(seq.slot.index, len(seq.slot.tokens))  # the cache as recorded
            self._fail_sequence(seq, MODEL_FAILED)
            return
        seq.slot.tokens.extend(item.tokens[:len(tokens)])  # the last token and matched drafts
        if len(tokens) < len(item.tokens):
            self.backend.forget(seq.slot.index, len(seq.slot.tokens))
        for i, token in enumerate(tokens):
            if i and seq.generation.cancelled:
                self._finish(seq, FinishReason.CANCELLED)
                return
            seq.next_token = None  # set again by _accept_token while the reply goes on
            self._accept_token(seq, token)
            if seq.next_token is None:
                return

    def _send(self, generation: Generation, event: Event) -> None:
        """Give ``event`` to the generation's reader (woken at the end of a step's token loop
        when sent from it)."""
        if self._unwoken is None:
            generation._emit(event)
        else:
            generation._emit(event, wake=False)
            self._unwoken[generation] = None

    def _accept_token(self, seq: Sequence, token: int) -> None:
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        if self.backend.is_end_of_turn(token):
            self._finish(seq, FinishReason.STOP)
            return
        seq.completion_tokens += 1
        delta = seq.reply.feed(self.backend.token_bytes(token))
        if delta:  # with the log probabilities of its tokens, those held back until now too
            self._send(seq.generation, Delta(delta, seq.sampler.unsent_logprobs()))
        if seq.reply.stopped:
            self._finish(seq, FinishReason.STOP)
        elif (seq.completion_tokens >= seq.generation.request.max_new_tokens
              or len(seq.slot.tokens) + 1 >= self.backend.context_length):
            self._finish(seq, FinishReason.LENGTH)
        else:
            seq.next_token = token

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        rest, logprobs = seq.reply.finish(), seq.sampler.unsent_logprobs()
        if rest or logprobs:
            self._send(seq.generation, Delta(rest, logprobs))
        now = time.monotonic()
        first = seq.first_token_at or now
        generating_s = now - first
        timings = {
            "queueMs": round((seq.admitted_at - seq.generation.submitted_at) * 1000, 1),
            "promptMs": round((first - seq.admitted_at) * 1000, 1),
            "generationMs": round(generating_s * 1000, 1),
            "tokensPerSecond": round((seq.completion_tokens - 1) / generating_s, 1)
            if seq.completion_tokens > 1 and generating_s > 0 else 0.0,
        }
        done = Done(reason, seq.reply.text, seq.prompt_tokens, seq.completion_tokens,
                    seq.cached_tokens, timings, tuple(seq.sampler.logprobs))
        self._release(seq)
        self._send(seq.generation, done)
        if self.log_prompts:
            log.info("generation %s: %s, %d tokens, %s", seq.generation.id, reason,
                     seq.completion_tokens, timings)

    def _fail_sequence(self, seq: Sequence, error: Error) -> None:
        if seq in self._active:
            self._release(seq)
        self._send(seq.generation, error)

    def _release(self, seq: Sequence) -> None:
        seq.sampler.close()
        self._active.remove(seq)
        seq.slot.busy = False
        seq.slot.last_used = time.monotonic()
        self._queue.release()

    def _fail(self, generation: Generation, event: Error | Done) -> None:
        """End a request that was taken from the queue but never got a slot."""
        self._queue.release()
        generation._emit(event)

    def _shut_down(self) -> None:
        for seq in list(self._active):
            self._finish(seq, FinishReason.SHUTDOWN)
        self._queue.shut_down()


def engine_from_settings(settings: Settings, backend: Backend) -> Engine:
    """The engine as the server runs it: wired from settings, its template checked, started.

    Serving builds its engine here, and so do the tests' fixtures, so tests run the
    production wiring (system prompt, seed, request timeout, prompt logging).
    """
    engine = Engine(backend, settings["conversationTemplate"],
                    default_system_prompt=settings["systemPrompt"],
                    queue_size=settings["queueSize"],
                    request_timeout=settings["requestTimeoutSeconds"], seed=settings["seed"],
                    log_prompts=settings["enableModelDebugOutput"],
                    queue_per_client=settings["queuePerClient"],
                    lookup_decoding=settings["lookupDecoding"])
    engine.render_check()
    engine.start()
    return engine

