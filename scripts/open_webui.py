"""Open WebUI, a real client, chatting with Tanglebox through its OpenAI API, in real Chromium.

Opt-in (neither CI nor pytest runs it: Open WebUI is a 3 GB install). From the repository root:

    python -m scripts.open_webui --open-webui-venv /path/to/openwebui-venv

It needs this checkout's requirements and requirements-dev (Playwright's Python package),
Debian's ``chromium`` at ``/usr/bin/chromium``, and Open WebUI in a virtual environment of its
own (install the CPU build of torch first, or open-webui pulls a multi-GB CUDA build)::

    python3 -m venv /path/to/openwebui-venv
    /path/to/openwebui-venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    /path/to/openwebui-venv/bin/pip install open-webui

Everything runs offline, on loopback ports, in a temporary work folder. Two runs:

1. **open** (tokens off): Tanglebox on the embedded model, then a recording proxy
   (``scripts/recording_proxy.py``) in front of its ``/v1``, then Open WebUI pointed at the proxy
   (the environment of :func:`open_webui_env`). Chromium opens Open WebUI, picks Tanglebox's
   model, asks :data:`QUESTION`, waits until the reply has finished streaming, checks that it is
   non-empty and shown and that Tanglebox sent it in pieces as it grew, and saves
   ``docs/screenshots/open-webui.png`` (1280x800). Then it asks for a long reply and presses
   Open WebUI's Stop: the stream must end without ``[DONE]`` (Open WebUI closed it, which
   cancels the generation: Tanglebox's own tests hold that part) and every slot be free.
2. **tokens** (``isApiTokensRequired``, a token file in the work folder, Open WebUI given the
   token): a chat works; then the token is revoked (Tanglebox re-reads its token file), so the
   key Open WebUI holds is now wrong, and the next message must show Tanglebox's 401 message in
   the page within a deadline, not hang.

Every request Open WebUI sent to ``/v1`` is printed (one line each) and kept, bodies included,
in ``requests-<run>.jsonl`` in the work folder. The last line is ``PASS`` or ``FAIL: why``
(exit status 0 or 1); after a failure the page is in ``<run>/failure.png``. All servers are
stopped at the end (their process groups), also on failure, Ctrl-C or SIGTERM; the work folder
is removed after a PASS unless ``--keep-work``. ``--builtin-tools`` and ``--open-webui-tasks``
leave two Open WebUI defaults on (see :func:`open_webui_env`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import traceback
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import requests
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from bench.servers import ServerProcess, free_port
from scripts.recording_proxy import Exchange, RecordingProxy
from tanglebox.api_tokens import add_token, revoke_token
from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, DESKTOP
from tests.live_server import LiveServer, wait_until_idle

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "screenshots" / "open-webui.png"
QUESTION = "What is the capital of France? Answer in one sentence."
LONG_QUESTION = "Count from 1 to 1000, one number per line."  # long enough to stop midway
UI_DEADLINE_MS = 60_000  # Open WebUI's first page load on 2 busy cores; a bound, not a goal
REPLY_DEADLINE_MS = 180_000  # the real model on 2 busy cores
TASKS_DEADLINE_S = 600.0  # Open WebUI's title, follow-up and tag requests on 2 busy cores
# temperature 0: a repeatable answer; the access log goes to the run's server.log
TANGLEBOX_SETTINGS = {"temperature": 0, "enableWebLogOutput": True}


class Failed(Exception):
    """A check failed: the message is the FAIL line."""


@dataclass
class Reply:
    text: str
    visible_updates: int  # distinct non-empty texts the page showed while the reply grew


def open_webui_env(folder: Path, base_url: str, key: str, model: str,
                   builtin_tools: bool = False, tasks: bool = False) -> dict[str, str]:
    """Open WebUI's environment: offline, no sign-in, one OpenAI connection (Tanglebox).

    ``builtin_tools`` False sets the one model default this needs: since 0.12 Open WebUI sends
    its built-in tools (``tools``: 36 function specs, about 25 KB) with every chat, and
    Tanglebox refuses ``tools`` with a 400 (it cannot call tools).

    ``tasks`` False turns off the requests Open WebUI makes after each reply (a title with
    ``max_tokens`` 1000, follow-up suggestions, tags): the 135M model does not produce their
    JSON and runs to the limit, 1000 + 512 tokens: 66 + 93 s alone, 6 and 8 minutes beside the
    chat on this project's busy 2-core machine, holding two slots. They are ordinary chat completions that Tanglebox
    answers; ``--open-webui-tasks`` keeps them."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(folder),  # caches (Hugging Face, tiktoken) stay in the work folder
        "LANG": "C.UTF-8",
        "DATA_DIR": str(folder / "data"),
        "WEBUI_SECRET_KEY": secrets.token_hex(32),  # else it writes .webui_secret_key into cwd
        "WEBUI_AUTH": "False",  # one local admin, no sign-in page
        "OFFLINE_MODE": "true",  # HF_HUB_OFFLINE=1, no version check, no pip installs
        "ENABLE_OLLAMA_API": "false",
        "OPENAI_API_BASE_URL": base_url,
        "OPENAI_API_KEY": key,
        # documents are embedded by Tanglebox's /v1/embeddings: no sentence-transformers model
        # to load (or download) at start
        "RAG_EMBEDDING_ENGINE": "openai",
        "RAG_OPENAI_API_BASE_URL": base_url,
        "RAG_OPENAI_API_KEY": key,
        "RAG_EMBEDDING_MODEL": model,
        # what Open WebUI's own Docker image sets: no analytics from its libraries
        "ANONYMIZED_TELEMETRY": "False", "DO_NOT_TRACK": "true", "SCARF_NO_ANALYTICS": "true",
    }
    if not builtin_tools:
        env["DEFAULT_MODEL_METADATA"] = json.dumps({"capabilities": {"builtin_tools": False}})
    if not tasks:
        env.update(ENABLE_TITLE_GENERATION="False", ENABLE_FOLLOW_UP_GENERATION="False",
                   ENABLE_TAGS_GENERATION="False")
    return env


def start_open_webui(venv: Path, folder: Path, env: dict[str, str]) -> ServerProcess:
    """``open-webui serve`` on a free loopback port, ready when its ``/health`` answers."""
    port = free_port()
    command = [str(venv / "bin" / "open-webui"), "serve", "--host", "127.0.0.1",
               "--port", str(port)]
    return ServerProcess("open-webui", command, port, folder / "open-webui.log", env)


def served_model(tanglebox: LiveServer, key: str | None) -> str:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    answer = requests.get(tanglebox.url + "/v1/models", headers=headers, timeout=15)
    answer.raise_for_status()
    return answer.json()["data"][0]["id"]


def open_chat(page: Page, url: str, model: str) -> None:
    """Open Open WebUI, dismiss the first-visit release notes, and pick ``model``."""
    page.goto(url)
    selector = page.locator("#model-selector-model-button")
    selector.wait_for(timeout=UI_DEADLINE_MS)
    release_notes = page.get_by_role("button", name="Okay, Let's Go!")
    if release_notes.is_visible():
        release_notes.click()
        release_notes.wait_for(state="hidden")
    selector.click()
    page.get_by_role("option", name=f"Select {model} model").click()
    expect(selector).to_have_attribute("aria-label", f"Selected model: {model}")


def send(page: Page, text: str) -> Locator:
    """Type ``text`` into the chat box, press Enter; the locator of the reply's message."""
    answers = page.locator('[id^="message-"]').filter(has=page.locator(".chat-assistant"))
    before = answers.count()
    page.evaluate(WATCH_REPLY_SCRIPT)
    page.locator("#chat-input").click()
    page.keyboard.type(text)
    page.keyboard.press("Enter")
    answer = answers.nth(before)
    answer.wait_for(timeout=UI_DEADLINE_MS)
    return answer


# Records each distinct text of the newest assistant message as the page changes, so the run
# can say whether the reply grew on screen (streamed) or appeared at once.
WATCH_REPLY_SCRIPT = """() => {
  window.__replyTexts = [];
  if (window.__replyWatch) window.__replyWatch.disconnect();
  window.__replyWatch = new MutationObserver(() => {
    const all = document.querySelectorAll('.chat-assistant #response-content-container');
    const text = all.length ? all[all.length - 1].innerText.trim() : '';
    const seen = window.__replyTexts;
    if (text && seen[seen.length - 1] !== text) seen.push(text);
  });
  window.__replyWatch.observe(document.body,
                              {childList: true, subtree: true, characterData: true});
}"""


def chat(page: Page, text: str) -> Reply:
    """Send ``text`` and wait until the reply is complete (its Regenerate button shows)."""
    answer = send(page, text)
    answer.locator(".regenerate-response-button").wait_for(state="attached",
                                                           timeout=REPLY_DEADLINE_MS)
    content = answer.locator("#response-content-container")
    expect(content).to_be_visible()
    # the reply is rendered as Markdown; an error (Tanglebox's 4xx message) in a plain box
    reply = "\n".join(content.locator(".markdown-prose").all_inner_texts()).strip()
    if not reply:
        raise Failed(f"Open WebUI shows no reply but: {content.inner_text().strip()[:300]!r}")
    updates = page.evaluate("() => window.__replyTexts.length")
    return Reply(reply, updates)


def settle(page: Page, proxy: RecordingProxy, seconds: float) -> None:
    """Wait until every request Open WebUI sent is answered (with ``--open-webui-tasks``: the
    title, follow-ups and tags too) and its Stop button is gone: the page as a user sees it
    when everything is done."""
    unanswered = proxy.wait_until_answered(seconds)
    if unanswered:
        raise Failed(f"Tanglebox left {len(unanswered)} request(s) unanswered for "
                     f"{seconds:g} s: {unanswered[0].summary()}")
    expect(page.get_by_role("button", name="Stop")).to_be_hidden(timeout=UI_DEADLINE_MS)


def close_notices(page: Page) -> None:
    """Close the pop-up notices ("You're now logged in.") that would cover the screenshot."""
    close = page.get_by_role("button", name="Close toast")
    for button in close.all():
        button.dispatch_event("click")  # the button may be fading in: no wait for "visible"
    expect(close).to_have_count(0)


@contextmanager
def screenshot_on_failure(page: Page, path: Path) -> Iterator[None]:
    try:
        yield
    except Exception:
        page.screenshot(path=str(path))
        print(f"the page at the failure: {path}")
        raise


def last_stream(proxy: RecordingProxy) -> Exchange:
    """The last streamed /v1/chat/completions request Open WebUI sent."""
    streamed = [e for e in proxy.exchanges if e.path.endswith("/chat/completions")
                and isinstance(e.request_body, dict) and e.request_body.get("stream")]
    if not streamed:
        raise Failed("Open WebUI sent no streamed /v1/chat/completions request")
    return streamed[-1]


def check_streamed(proxy: RecordingProxy) -> str:
    """The chat reply was streamed: SSE events, sent in several pieces as they were made
    (not buffered into one), ending with [DONE]; one line about it."""
    last = last_stream(proxy)
    if last.status != 200 or last.sse_events < 2 or last.pieces < 2 or not last.sse_done:
        raise Failed(f"the streamed chat did not stream: {last.summary()}; "
                     f"body: {last.response_excerpt[:300]!r}")
    return f"{last.sse_events} SSE events + [DONE] in {last.pieces} pieces"


def print_requests(run: str, proxy: RecordingProxy, folder: Path) -> None:
    path = folder / f"requests-{run}.jsonl"
    proxy.to_jsonl(path)
    print(f"[{run}] Open WebUI sent {len(proxy.exchanges)} requests to /v1 (bodies: {path}):")
    for exchange in proxy.exchanges:
        print(f"[{run}]   {exchange.summary()}")


@dataclass
class Options:
    work: Path  # the temporary work folder
    venv: Path  # Open WebUI's virtual environment
    builtin_tools: bool  # leave Open WebUI's built-in tools on (it sends `tools`)
    tasks: bool  # leave Open WebUI's title, follow-up and tag requests on

    @property
    def settle_seconds(self) -> float:
        # the follow-up requests generate 1,500 tokens on a busy CPU: minutes, not seconds
        return TASKS_DEADLINE_S if self.tasks else REPLY_DEADLINE_MS / 1000


@dataclass
class Servers:
    tanglebox: LiveServer
    proxy: RecordingProxy
    open_webui: ServerProcess
    model: str


def start_servers(stack: ExitStack, options: Options, run: str, key: str | None,
                  **settings) -> Servers:
    """Tanglebox, the recording proxy in front of it, and Open WebUI on the proxy; all stopped
    when ``stack`` closes (and the proxy's record printed)."""
    folder = options.work / run
    (folder / "open-webui").mkdir(parents=True)
    tanglebox = LiveServer(folder)
    stack.callback(tanglebox.stop)
    tanglebox.start(**TANGLEBOX_SETTINGS, **settings)
    model = served_model(tanglebox, key)
    proxy = RecordingProxy(tanglebox.url).start()
    stack.callback(print_requests, run, proxy, folder)
    stack.callback(proxy.stop)
    env = open_webui_env(folder / "open-webui", proxy.url + "/v1", key or "none", model,
                         options.builtin_tools, options.tasks)
    open_webui = start_open_webui(options.venv, folder, env)
    stack.callback(open_webui.stop)
    print(f"[{run}] Tanglebox {tanglebox.url} (model {model}), Open WebUI {open_webui.url}")
    return Servers(tanglebox, proxy, open_webui, model)


def run_open(browser: Browser, options: Options, screenshot: Path) -> str:
    """Chat through Open WebUI with tokens off; save the screenshot; the reply."""
    with ExitStack() as stack:
        servers = start_servers(stack, options, "open", None)
        page = browser.new_page(viewport=DESKTOP)
        stack.callback(page.close)
        with screenshot_on_failure(page, options.work / "open" / "failure.png"):
            open_chat(page, servers.open_webui.url, servers.model)
            reply = chat(page, QUESTION)
            streamed = check_streamed(servers.proxy)
            settle(page, servers.proxy, options.settle_seconds)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        close_notices(page)
        page.screenshot(path=str(screenshot))
        print(f"[open] reply: {reply.text!r}")
        print(f"[open] streamed: {streamed}; the page showed {reply.visible_updates} "
              f"successive texts; screenshot {screenshot}")
        with screenshot_on_failure(page, options.work / "open" / "failure.png"):
            stop_mid_reply(page, servers, options.settle_seconds)
        return reply.text


def stop_mid_reply(page: Page, servers: Servers, seconds: float) -> None:
    """Open WebUI's Stop button, pressed while a reply streams, cuts Tanglebox's stream (no
    ``[DONE]``), and Tanglebox's slots are free afterwards."""
    answer = send(page, LONG_QUESTION)
    expect(answer.locator("#response-content-container")).to_contain_text(
        re.compile(r"\S"), timeout=REPLY_DEADLINE_MS)
    page.get_by_role("button", name="Stop").click()
    servers.proxy.wait_until_answered(seconds)
    stream = last_stream(servers.proxy)
    if stream.sse_done:
        raise Failed(f"Stop did not cut the stream: Tanglebox finished it ({stream.summary()})")
    wait_until_idle(servers.tanglebox, seconds)
    print(f"[open] Stop after {stream.sse_events} SSE events: the stream was cut (no [DONE]) "
          "and Tanglebox's slots are free")


def run_tokens(browser: Browser, options: Options) -> None:
    """With tokens required: a chat with the token works; once it is revoked, the next
    message shows Tanglebox's 401 message."""
    tokens_file = options.work / "apiTokens.txt"
    token = add_token(tokens_file, "open-webui")
    with ExitStack() as stack:
        servers = start_servers(stack, options, "tokens", token, isApiTokensRequired=True,
                                apiTokensFile=str(tokens_file))
        page = browser.new_page(viewport=DESKTOP)
        stack.callback(page.close)
        with screenshot_on_failure(page, options.work / "tokens" / "failure.png"):
            open_chat(page, servers.open_webui.url, servers.model)
            reply = chat(page, QUESTION)
            settle(page, servers.proxy, options.settle_seconds)
            print(f"[tokens] with the token: reply {reply.text!r}")
            revoke_token(tokens_file, "open-webui")
            message = refusal_message(servers.tanglebox, token)
            answer = send(page, "And of Germany?")
            try:
                expect(answer).to_contain_text(message, timeout=REPLY_DEADLINE_MS)
            except AssertionError:
                raise Failed(f"with a wrong key, Open WebUI did not show Tanglebox's 401 "
                             f"message within {REPLY_DEADLINE_MS / 1000:g} s; it shows: "
                             f"{answer.inner_text()[:300]!r}") from None
        shown = options.work / "tokens" / "wrong-key.png"
        page.screenshot(path=str(shown))
        print(f"[tokens] with a wrong key Open WebUI shows: {message!r} (screenshot {shown})")


def refusal_message(tanglebox: LiveServer, token: str) -> str:
    """Tanglebox's 401 message for ``token`` (revoked): what Open WebUI should show."""
    refusal = requests.get(tanglebox.url + "/v1/models", timeout=15,
                           headers={"Authorization": f"Bearer {token}"})
    if refusal.status_code != 401:
        raise Failed(f"Tanglebox still accepts the revoked token ({refusal.status_code})")
    return refusal.json()["error"]["message"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--open-webui-venv", type=Path, required=True,
                        help="the virtual environment Open WebUI is installed in")
    parser.add_argument("--screenshot", type=Path, default=SCREENSHOT)
    parser.add_argument("--builtin-tools", action="store_true",
                        help="leave Open WebUI's built-in tools on (it then sends `tools`, "
                        "which Tanglebox refuses): shows what an unconfigured Open WebUI does")
    parser.add_argument("--open-webui-tasks", action="store_true",
                        help="leave Open WebUI's title, follow-up and tag requests on (slow "
                        "on a CPU: it then waits up to 10 minutes for them)")
    parser.add_argument("--keep-work", action="store_true",
                        help="keep the work folder (logs, requests-*.jsonl) after a PASS")
    args = parser.parse_args(argv)
    if not (args.open_webui_venv / "bin" / "open-webui").exists():
        print(f"FAIL: no open-webui in {args.open_webui_venv}/bin (see this script's docstring)")
        return 1
    # SIGTERM unwinds like Ctrl-C, so the servers' process groups are stopped on the way out
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    work = Path(tempfile.mkdtemp(prefix="tanglebox-open-webui-"))
    options = Options(work, args.open_webui_venv, args.builtin_tools, args.open_webui_tasks)
    print(f"work folder: {work}")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                answer = run_open(browser, options, args.screenshot)
                run_tokens(browser, options)
            finally:
                browser.close()
    except Failed as failure:
        print(f"FAIL: {failure} (logs in {work})")
        return 1
    except Exception as error:  # noqa: BLE001 - a FAIL line with the cause, not a bare trace
        traceback.print_exc()
        print(f"FAIL: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
              f" (logs in {work})")
        return 1
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"PASS: Open WebUI chatted with Tanglebox (reply {answer!r}), streamed, and showed "
          "Tanglebox's 401 for a wrong key")
    return 0


if __name__ == "__main__":
    sys.exit(main())
