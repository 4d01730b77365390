"""The original ("pure") websocket protocol at ``/``, kept exactly (ORIGINAL.md).

One socket per client at the server root; ``/`` also serves the HTML page, and the route here
answers only websocket handshakes. Every message is text. A message that starts with one of
the control tokens below is a control message (``<token><value>``, or a bare ``<token>``);
any other text is a prompt.

Handshake, before the upgrade (so a refused client never gets a socket):

- ``enableApi: false`` → 404 (the original socket was part of the API);
- a token sent with the handshake (``?token=`` or ``Authorization: Bearer``) that is not
  valid → 401. (Origin and Host were already checked by :mod:`tanglebox.web.security`.)

Conversation, one message at a time, answered in the order received::

    client                         server
    #-token-#<token>          →    #-set-#           first message, only when tokens are
                                                      required and none came with the handshake;
                                                      anything else first (or a wrong token):
                                                      one "Error: ..." message, then close 1008
    #-set-temp-#0.3           →    #-set-#           a bad value: one "Error: ..." message
    #-set-max-tokens-#200     →    #-set-#           saying what to send; the setting is
    #-set-streaming-#false    →    #-set-#           unchanged and the socket stays open
    #-set-model-#<id>         →    #-set-#           ours: this socket's model (an id of
                                                      /v1/models; bare: the default again)
    #-get-config-#            →    #-model-name-#…  #-device-name-#…
                                   #-max-new-tokens-#…  #-temperature-#…  (this socket's)
    #-delete-#                →    #-delete-#        after the conversation is forgotten
    #-ping-#                  →    #-pong-#
    <prompt>                  →    #a-c-k#, the reply, #f-i-n#

The reply is one message per delta while streaming (the original's default, and ours), or
one message with the whole reply when ``#-set-streaming-#false``. ``#f-i-n#`` always ends it:
after an error ("Error: ..." then ``#f-i-n#``), in maintenance mode (the maintenance sentence),
while the model loads (a loading sentence) and when the queue is full ("Error: ..."); these
sentences are the ones every surface uses (``Runtime.submit``). Messages that arrive
while a reply streams wait and are answered after its ``#f-i-n#``.

The socket keeps its conversation: each prompt is sent with the turns before it, and a turn
is added to the history once its reply is done (a failed turn is not). ``#-delete-#`` empties
it. A client that goes away mid-reply (a send fails, or the socket closes) cancels its
generation, so the engine's slot is free at its next step. A socket that sends nothing for
``socketIdleTimeoutSeconds`` (while no reply is running) is closed; a message over
``maxRequestBytes`` closes it with 1009 (simple-websocket enforces that), and more than a few
messages sent ahead of their answers close it with 1008 (``socket_inbox``).

Every wait here (receive, the next engine event, send) is cooperative under gevent, so a slow
or silent client only ever holds its own greenlet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flask import Blueprint, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed, Server
from wsproto.frame_protocol import CloseReason

from tanglebox.chat_request import (
    ChatRequest,
    Limits,
    TEMPERATURE_RANGE,
    RequestError,
    parse_bool,
    parse_max_new_tokens,
    parse_temperature,
    parse_user_prompt,
)
from tanglebox.api_tokens import TokenFileUnreadable
from tanglebox.generation import (
    ENDED_EARLY,
    Delta,
    Done,
    Error,
    ErrorCode,
    FinishReason,
    Generation,
)
from tanglebox.prompting import ASSISTANT, USER, Message
from tanglebox.runtime import Refusal, Refused, Runtime, current_runtime
from tanglebox.web.auth import (require_api_enabled, request_token, require_token,
                                token_is_valid)
from tanglebox.web.socket_inbox import bounded_inbox, close

# Client → server.
SET_TEMPERATURE = "#-set-temp-#"
SET_MAX_TOKENS = "#-set-max-tokens-#"
SET_STREAMING = "#-set-streaming-#"
GET_CONFIG = "#-get-config-#"
DELETE = "#-delete-#"
PING = "#-ping-#"
TOKEN = "#-token-#"  # ours: the original's socket had no tokens
SET_MODEL = "#-set-model-#"  # ours: the original served one model
CONTROL_TOKENS = (SET_TEMPERATURE, SET_MAX_TOKENS, SET_STREAMING, GET_CONFIG, DELETE, PING,
                  TOKEN, SET_MODEL)

# Server → client.
SET_ACK = "#-set-#"
DELETED = "#-delete-#"
MODEL_NAME = "#-model-name-#"
DEVICE_NAME = "#-device-name-#"
MAX_NEW_TOKENS = "#-max-new-tokens-#"
TEMPERATURE = "#-temperature-#"
PROMPT_ACK = "#a-c-k#"
FINISHED = "#f-i-n#"
PONG = "#-pong-#"


TOKEN_REQUIRED_MESSAGE = ("Error: a valid API token is required. Connect with ?token=<token> "
                          f"or send {TOKEN}<token> as the first message.")


@dataclass(frozen=True)
class ControlMessage:
    token: str  # one of CONTROL_TOKENS
    value: str  # the text after the token; empty for a bare token


@dataclass
class SocketState:
    """What one socket remembers: its sampling settings and its conversation."""

    temperature: float
    max_new_tokens: int
    max_new_tokens_limit: int
    streaming: bool = True  # the original streamed unless told otherwise
    history: list[Message] = field(default_factory=list)
    model: str | None = None  # #-set-model-#; None: the server's default model

    @classmethod
    def from_limits(cls, limits: Limits) -> "SocketState":
        return cls(temperature=limits.temperature, max_new_tokens=limits.max_new_tokens,
                   max_new_tokens_limit=limits.max_new_tokens_limit)


def parse_control(message: str) -> ControlMessage | None:
    """The control message in ``message``, or None when it is a prompt."""
    for token in CONTROL_TOKENS:
        if message.startswith(token):
            return ControlMessage(token, message[len(token):])
    return None


def apply_setting(state: SocketState, control: ControlMessage) -> None:
    """Change one ``#-set-...-#`` setting; raises RequestError (state unchanged) on a bad value."""
    if control.token == SET_TEMPERATURE:
        state.temperature = parse_temperature(control.value, param="temperature")
    elif control.token == SET_MAX_TOKENS:
        state.max_new_tokens = parse_max_new_tokens(control.value, state.max_new_tokens_limit,
                                                    param="max new tokens")
    elif control.token == SET_STREAMING:
        state.streaming = parse_bool(control.value, param="streaming")
    else:
        raise ValueError(f"{control.token} is not a setting")


def setting_hint(token: str, state: SocketState) -> str:
    """What to send instead of a bad value."""
    if token == SET_TEMPERATURE:
        low, high = TEMPERATURE_RANGE
        return f"send {SET_TEMPERATURE}<number from {low:g} to {high:g}>, e.g. {SET_TEMPERATURE}0.7"
    if token == SET_MAX_TOKENS:
        return (f"send {SET_MAX_TOKENS}<whole number from 1 to {state.max_new_tokens_limit}>, "
                f"e.g. {SET_MAX_TOKENS}{min(512, state.max_new_tokens_limit)}")
    return f"send {SET_STREAMING}true or {SET_STREAMING}false"


def config_messages(state: SocketState, runtime: Runtime) -> list[str]:
    """The four answers to ``#-get-config-#``, in the original's order."""
    remote = state.model in runtime.remotes
    return [MODEL_NAME + (state.model if remote else runtime.model_name),
            DEVICE_NAME + ("remote" if remote else runtime.device),
            MAX_NEW_TOKENS + str(state.max_new_tokens),
            TEMPERATURE + str(float(state.temperature))]


def register(sock: Sock) -> None:
    """Attach the socket route at ``/``, with its handshake checks."""
    blueprint = Blueprint("original_socket", __name__)
    # A blueprint's before_request runs only for its own routes, and before Flask-Sock
    # accepts the upgrade: a refused handshake is a plain HTTP answer.
    blueprint.before_request(check_handshake)
    sock.route("/", bp=blueprint)(original_socket)
    sock.app.register_blueprint(blueprint)


def check_handshake() -> None:
    require_api_enabled()
    if request_token() is not None:
        require_token()  # a token was sent: it must be valid, or 401 before the upgrade


def original_socket(ws: Server) -> None:
    """One client's socket, from the first message to the close."""
    with bounded_inbox(ws, current_runtime().settings["maxRequestBytes"]):
        serve(ws, current_runtime(), client_id=request.remote_addr or "",
              authenticated=token_is_valid(request_token()))


def serve(ws: Server, runtime: Runtime, client_id: str, authenticated: bool) -> None:
    """Answer messages until the client leaves, goes idle or fails to authenticate."""
    state = SocketState.from_limits(runtime.limits())
    idle_seconds = runtime.settings["socketIdleTimeoutSeconds"]
    while ws.connected:
        message = ws.receive(timeout=idle_seconds)
        if message is None:
            close(ws, CloseReason.NORMAL_CLOSURE, f"no message for {idle_seconds:g} seconds")
        elif not authenticated:  # before anything else
            authenticated = authenticate(ws, message)
        elif isinstance(message, bytes):
            send(ws, "Error: send text messages; binary messages are not part of this "
                     "protocol.")
        else:
            answer(ws, runtime, state, message, client_id)


def authenticate(ws: Server, message: str | bytes) -> bool:
    """Check a ``#-token-#`` message; anything else (or a wrong token) closes the socket."""
    control = parse_control(message) if isinstance(message, str) else None
    try:
        valid = control is not None and control.token == TOKEN and token_is_valid(control.value)
    except TokenFileUnreadable as unreadable:
        # Inside an open socket an HTTP answer cannot go out: say it here, close "try later".
        send(ws, f"Error: {unreadable.description}")
        close(ws, CloseReason.TRY_AGAIN_LATER, "the token file cannot be read")
        return False
    if valid:
        send(ws, SET_ACK)
        return True
    # The same words for a missing and a wrong token, and never the token itself.
    send(ws, TOKEN_REQUIRED_MESSAGE)
    close(ws, CloseReason.POLICY_VIOLATION, "API token required")
    return False


def answer(ws: Server, runtime: Runtime, state: SocketState, message: str,
           client_id: str) -> None:
    control = parse_control(message)
    if control is None:
        answer_prompt(ws, runtime, state, message, client_id)
    elif control.token in (SET_TEMPERATURE, SET_MAX_TOKENS, SET_STREAMING):
        try:
            apply_setting(state, control)
        except RequestError as err:
            send(ws, f"Error: {err}; {setting_hint(control.token, state)}")
        else:
            send(ws, SET_ACK)
    elif control.token == SET_MODEL:
        try:
            state.model = runtime.chosen_model(control.value.strip())
        except RequestError as err:
            send(ws, f"Error: {err}; send {SET_MODEL}<id>")
        else:
            send(ws, SET_ACK)
    elif control.token == GET_CONFIG:
        for reply in config_messages(state, runtime):
            send(ws, reply)
    elif control.token == DELETE:
        state.history.clear()
        send(ws, DELETED)
    elif control.token == PING:
        send(ws, PONG)
    elif control.token == TOKEN:
        # Already authenticated (or tokens are off), yet checked the same way: a wrong
        # token is never quietly accepted.
        authenticate(ws, message)


# Said as they are, as the original said its maintenance sentence; other refusals are errors.
STATE_REFUSALS = (Refusal.MAINTENANCE, Refusal.LOADING, Refusal.LOAD_FAILED)


def answer_prompt(ws: Server, runtime: Runtime, state: SocketState, prompt: str,
                  client_id: str) -> None:
    """``#a-c-k#``, the reply (or one sentence saying why not), ``#f-i-n#``."""
    send(ws, PROMPT_ACK)
    try:
        generation = submit_prompt(runtime, state, prompt, client_id)
    except Refused as refusal:
        send(ws, refusal.message if refusal.reason in STATE_REFUSALS
             else f"Error: {refusal.message}")
    except RequestError as err:
        send(ws, f"Error: {err}")
    else:
        final = relay_reply(ws, generation, state.streaming)
        if isinstance(final, Done):
            if not state.streaming:
                send(ws, final.text)
            if final.finish_reason in (FinishReason.TIMEOUT, FinishReason.SHUTDOWN):
                send(ws, f"Error: {ENDED_EARLY[final.finish_reason]}")
            state.history += [Message(USER, prompt), Message(ASSISTANT, final.text)]
        else:
            hint = (f" Send {DELETE} to start a new conversation."
                    if final.code == ErrorCode.PROMPT_TOO_LONG and state.history else "")
            send(ws, f"Error: {final.message}{hint}")
    send(ws, FINISHED)


def submit_prompt(runtime: Runtime, state: SocketState, prompt: str,
                  client_id: str) -> Generation:
    """Raises Refused, or RequestError for an empty prompt (the server's state first)."""
    runtime.check_open(state.model)
    text = parse_user_prompt(prompt, param="prompt")
    return runtime.submit(ChatRequest(
        messages=(*state.history, Message(USER, text)), system_prompt="",
        temperature=state.temperature, max_new_tokens=state.max_new_tokens,
        client_id=client_id, model=state.model))


def relay_reply(ws: Server, generation: Generation, streaming: bool) -> Done | Error:
    """Send the deltas (when streaming) and return the final event.

    If the client goes away first, the relay cancels the generation and ConnectionClosed is
    raised.
    """
    for event in generation.relay(lambda: not ws.connected):
        if isinstance(event, Delta):
            if streaming:
                send(ws, event.text)
        else:
            return event
    raise ConnectionClosed(ws.close_reason, ws.close_message)


def send(ws: Server, text: str) -> None:
    """Send one text message; a vanished client is always ConnectionClosed, never OSError."""
    try:
        ws.send(text)
    except OSError as err:  # a broken pipe before the reader noticed the close
        raise ConnectionClosed(CloseReason.ABNORMAL_CLOSURE, str(err)) from None
