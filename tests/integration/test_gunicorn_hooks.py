"""What Tanglebox sets in gunicorn, on a live server: TLS files that fail in the worker stop the
server with one line instead of a restart loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT
from tests.live_server import free_port


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
