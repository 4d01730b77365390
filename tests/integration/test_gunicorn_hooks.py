"""What Tanglebox sets in gunicorn, on a live server: the error log never shows a token, and TLS
files that fail in the worker stop the server with one line instead of a restart loop."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.live_server import free_port, wait_until

SECRET = "tbx_secret-in-the-query"


def send_raw(port: int, request: bytes) -> bytes:
    """Send ``request`` as it is (requests would refuse to) and read the answer to the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(request)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("request_bytes", [
    f"GET /conversation?userPrompt=hi&token={SECRET}\x01 HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    f"GET /conversation token={SECRET} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    f"GET / HTTP/1.1\r\nHost: x\r\nAuthorization Bearer {SECRET}\r\n\r\n".encode(),
], ids=["control-byte", "space-in-target", "header-without-colon"])
@pytest.mark.parametrize("web_log", [False, True], ids=["quiet", "enableWebLogOutput"])
def test_a_request_gunicorn_cannot_parse_is_logged_without_its_token(fake_server, request_bytes,
                                                                     web_log):
    server = fake_server.start(fake={}, enableWebLogOutput=web_log)
    answer = send_raw(server.port, request_bytes)
    assert answer.startswith(b"HTTP/1.1 400 ")
    log = wait_until(lambda: "Invalid request from ip=" in (text := server.log()) and text,
                     what="gunicorn logs the request it refused")
    assert SECRET not in log
    assert "[hidden]" in log, log


def test_tls_files_that_fail_in_the_worker_stop_the_server_with_one_line(tmp_path):
    """The worker loads the TLS files itself. Without the hook it crashes at each start and the
    master restarts it for ever (with a traceback each time)."""
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"useSsl": True, "sslCertFile": "cert.pem",
                                    "sslKeyFile": "key.pem", "port": free_port()}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANGLEBOX_")}
    # The fake server skips app.py's checks, as a worker started after the files changed would.
    process = subprocess.run([sys.executable, "-m", "tests.fake_server", str(settings), "{}"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert process.returncode == 3, process.stderr[-3000:]  # gunicorn's "worker failed to boot"
    ours = [line for line in process.stderr.splitlines() if line.startswith("tanglebox: ")]
    assert len(ours) == 1 and "cannot be loaded" in ours[0], process.stderr[-3000:]
    assert str(tmp_path / "cert.pem") in ours[0]
    assert "Traceback" not in process.stderr
