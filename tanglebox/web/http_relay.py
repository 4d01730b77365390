"""A generation relayed over HTTP, the same for every HTTP surface (REST ``/conversation``, and
any later one): only the rendering of events is the surface's own.

- :func:`first_event`: the first event is awaited *before* a status line is sent, so an
  engine error that is the client's fault (a prompt longer than the context) can still be a
  4xx, also for streamed replies;
- :func:`final_event` for a whole reply, or :func:`streamed` for one sent as it is generated.
  A format that has no way to say "cut" in its body (plain text) raises :class:`StreamCut`
  from its renderer when the reply ends early (the engine failed, the server shut down); the
  chunked stream then ends *without* its terminating zero-length chunk, which every HTTP
  client reports as an incomplete body, so a cut reply is never mistaken for a whole one.

A client that goes away is noticed at the next event (or within the relay's poll while
nothing is generated) by peeking at its socket, and by the failed write that makes gunicorn
close our response iterator; either way the relay cancels the generation, which leaves the
batch at the engine's next step, and the request ends as ``CLIENT_CLOSED_REQUEST``.
"""

from __future__ import annotations

import itertools
import select
import socket
from contextlib import closing
from typing import Callable, Iterator

from flask import Response, request

from tanglebox.generation import Done, Error, Event, Generation

CLIENT_CLOSED_REQUEST = 499  # nginx's code: logged, never seen by the (absent) client
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering


class StreamCut(Exception):
    """Raised by a renderer: the reply was cut short, and the client must be able to tell."""


def first_event(generation: Generation) -> tuple[Event | None, Iterator[Event]]:
    """The first event (None when the client left first) and the relay of the rest."""
    environ = request.environ
    events = generation.relay(lambda: client_disconnected(environ))
    return next(events, None), events


def final_event(first: Event, events: Iterator[Event]) -> Done | Error | None:
    """The final Done or Error, or None when the client left first."""
    for event in itertools.chain([first], events):
        if isinstance(event, (Done, Error)):
            return event
    return None


def streamed(first: Event, events: Iterator[Event], render: Callable[[Event], str],
             mimetype: str) -> Response:
    """A response that sends each rendered event as it comes (empty renderings are skipped)."""
    return Response(_stream(first, events, render, request.environ), mimetype=mimetype,
                    headers=STREAM_HEADERS)


def _stream(first: Event, events: Iterator[Event], render: Callable[[Event], str],
            environ: dict) -> Iterator[str]:
    # gunicorn closes this iterator when a write fails (GeneratorExit at the yield), which
    # closes the relay, which cancels the generation.
    with closing(events):
        try:
            for event in itertools.chain([first], events):
                chunk = render(event)
                if chunk:
                    yield chunk
        except StreamCut:
            if not end_without_final_chunk(environ):
                raise


def end_without_final_chunk(environ: dict) -> bool:
    """End the response so that the client sees it cut: the connection is half-closed after
    what was sent, so gunicorn's terminating chunk fails to go out (EPIPE, which gunicorn
    takes as a client gone: no traceback in the log).

    False without gunicorn (Flask's test client, the development server), and over HTTP/2,
    where one socket carries other streams too: the caller lets the StreamCut go on up, which
    ends the response there (gunicorn resets the HTTP/2 stream).
    """
    sock = environ.get("gunicorn.socket")
    if sock is None or environ.get("HTTP_VERSION") == "2":
        return False
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:  # already gone
        pass
    return True


def client_disconnected(environ: dict) -> bool:
    """True when the client has closed its connection (gunicorn only; False when unknown).

    A request's body has been read by now, so a readable socket that yields no bytes to a
    peek is one the client has closed. TLS sockets cannot be peeked at; there the failed
    write of the next chunk tells instead.
    """
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except ValueError:  # an SSL socket refuses recv flags
        return False
    except OSError:  # reset by the peer
        return True
