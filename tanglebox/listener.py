"""What ``python app.py`` listens with: its address and its TLS files, checked before serving.

Under the gunicorn command, ``-b``, ``--certfile`` and ``--keyfile`` decide instead, so these
checks are ``app.py``'s (after :func:`tanglebox.serving.preflight`). Left to gunicorn, a taken
port costs five retries and a dozen lines, and a certificate that is not PEM crashes the worker
at each start while the master restarts it forever. :func:`tls_context_or_stop` keeps the
second from happening later too (TLS files changed under a running server).
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import sys

from gunicorn.arbiter import Arbiter

from tanglebox.settings import Settings, SettingsError


def check_listener(settings: Settings) -> None:
    """What ``python app.py`` listens with: the TLS files and the address (under the gunicorn
    command, ``-b``, ``--certfile`` and ``--keyfile`` decide). Raises a SettingsError."""
    if settings["useSsl"]:
        check_tls_files(settings)
    check_address(settings)


def check_tls_files(settings: Settings) -> None:
    """Load ``sslCertFile`` and ``sslKeyFile`` as gunicorn's worker will; name the one at fault."""
    where = settings.path.name
    files = {key: settings.relative_path(settings[key]) for key in ("sslCertFile", "sslKeyFile")}
    for key, path in files.items():
        try:
            path.open("rb").close()
        except OSError as err:
            raise SettingsError(f"{where}: \"{key}\" names {settings[key]}, which cannot be read "
                                f"({err.strerror}); give a PEM file (relative to settings.json)") \
                from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=files["sslCertFile"])  # reads certificates only
    except ssl.SSLError:
        raise SettingsError(f"{where}: \"sslCertFile\" ({settings['sslCertFile']}) holds no PEM "
                            "certificate; give the file that begins with "
                            "-----BEGIN CERTIFICATE-----") from None
    asked_for_password = False

    def no_password() -> bytes:
        # gunicorn passes no password, so OpenSSL would ask for one on the terminal.
        nonlocal asked_for_password
        asked_for_password = True
        return b""

    try:
        context.load_cert_chain(files["sslCertFile"], files["sslKeyFile"], password=no_password)
    except ssl.SSLError as err:
        if asked_for_password:
            problem = "is encrypted; give the key without its password"
        elif err.reason == "KEY_VALUES_MISMATCH":
            problem = (f"is not the key of \"sslCertFile\" ({settings['sslCertFile']}); give the "
                       "key the certificate was made for")
        else:
            problem = ("is not a PEM private key; give the file that begins with "
                       "-----BEGIN PRIVATE KEY-----")
        raise SettingsError(f"{where}: \"sslKeyFile\" ({settings['sslKeyFile']}) {problem}") \
            from None


def check_address(settings: Settings) -> None:
    """Bind ``host``:``port`` once, as gunicorn will: a taken port is one line, not gunicorn's
    five retries and a dozen."""
    host, port = settings["host"], settings["port"]
    other_port = "choose another with --port or \"port\""
    not_here = (f"host {host} is not an address of this machine; set --host or \"host\" to "
                "127.0.0.1, 0.0.0.0 or one of its addresses")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn does
            probe.bind((host, port))
    except socket.gaierror:  # a name that does not resolve
        raise SettingsError(not_here) from None
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            problem = f"port {port} is in use (another server listens on it); {other_port}"
        elif err.errno == errno.EACCES:
            problem = f"port {port} needs administrator rights here; {other_port} (above 1023)"
        elif err.errno == errno.EADDRNOTAVAIL:
            problem = not_here
        else:
            problem = f"cannot listen on {host} port {port} ({err.strerror}); {other_port}"
        raise SettingsError(problem) from None
    except (ValueError, TypeError):  # a NUL byte; a name IDNA cannot encode (UnicodeError)
        raise SettingsError(not_here) from None


def tls_context_or_stop(config, default_ssl_context_factory) -> ssl.SSLContext:
    """gunicorn's ``ssl_context`` hook: TLS files that fail in the worker stop the server with
    one line (gunicorn halts on a worker's boot-error status) instead of a crash loop."""
    try:
        return default_ssl_context_factory()
    except (ssl.SSLError, OSError) as err:
        print(f"tanglebox: error: the TLS certificate {config.certfile} or its key "
              f"{config.keyfile} cannot be loaded ({err}); fix them and start again",
              file=sys.stderr, flush=True)
        os._exit(Arbiter.WORKER_BOOT_ERROR)  # the master halts instead of restarting it
