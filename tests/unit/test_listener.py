"""``python app.py`` with an address or TLS files it cannot serve with: one line, exit 2."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess

import pytest

from tanglebox.listener import check_tls_files
from tanglebox.settings import load_settings
from tests.commands import one_error_line, run_app
from tests.live_server import free_port


def start(folder, **settings) -> subprocess.CompletedProcess:
    path = folder / "settings.json"
    path.write_text(json.dumps(settings))
    return run_app(folder, path)


def test_a_port_in_use_is_one_line_naming_how_to_choose_another(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_error_line(start(tmp_path, port=port))
    assert f"port {port} is in use" in line
    assert 'choose another with --port or "port"' in line


def test_a_host_that_is_not_this_machine_is_one_line(tmp_path):
    line = one_error_line(start(tmp_path, host="192.0.2.1", port=free_port()))  # TEST-NET-1
    assert 'host 192.0.2.1 is not an address of this machine; set --host or "host"' in line


# -- TLS -------------------------------------------------------------------------------------

def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A certificate with its key, another key, and the first key encrypted."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    folder = tmp_path_factory.mktemp("tls")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "key.pem", "-out", "cert.pem", "-days", "2", "-subj", "/CN=localhost",
            cwd=folder)
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-out", "other-key.pem", cwd=folder)
    openssl("pkey", "-in", "key.pem", "-aes256", "-passout", "pass:secret",
            "-out", "encrypted-key.pem", cwd=folder)
    (folder / "not-pem.pem").write_text("this is not a PEM file\n")
    return folder


def tls_settings(folder, cert: str, key: str) -> dict:
    return {"useSsl": True, "sslCertFile": str(folder / cert), "sslKeyFile": str(folder / key),
            "port": free_port()}


@pytest.mark.parametrize("cert, key, setting, problem", [
    ("not-pem.pem", "key.pem", '"sslCertFile" (', "not-pem.pem) holds no PEM certificate"),
    ("key.pem", "key.pem", '"sslCertFile" (', "key.pem) holds no PEM certificate"),
    ("cert.pem", "not-pem.pem", '"sslKeyFile" (', "not-pem.pem) is not a PEM private key"),
    ("cert.pem", "other-key.pem", '"sslKeyFile" (', 'is not the key of "sslCertFile"'),
    ("cert.pem", "encrypted-key.pem", '"sslKeyFile" (', "is encrypted"),
    ("missing.pem", "key.pem", '"sslCertFile" names ', "which cannot be read (No such file"),
    ("cert.pem", ".", '"sslKeyFile" names ', "which cannot be read (Is a directory)"),
])
def test_tls_files_gunicorn_cannot_load_are_one_line_naming_the_setting(tmp_path, tls_files,
                                                                        cert, key, setting,
                                                                        problem):
    line = one_error_line(start(tmp_path, **tls_settings(tls_files, cert, key)))
    assert "settings.json: " + setting in line and problem in line


def test_a_certificate_with_its_key_passes(tmp_path, tls_files):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(tls_settings(tls_files, "cert.pem", "key.pem")))
    check_tls_files(load_settings(path, environ={}))  # raises a SettingsError if refused
