"""``tracker serve --workers N``: N server processes on one port.

One ``serve`` process answers on one core: its Python is what limits it (about 20 us
of CPU per TRACK GET), while Redis and the network have room left. So ``--workers``
forks N copies of the same server, each with its own event loop, Redis connections
and socket, all listening on the one address with ``SO_REUSEPORT``, which makes the
kernel spread new connections over them. Nothing is shared between the copies that
a connection needs: a TRACK reads Redis, and the proxy keeps what a FAIL or ACK on
another connection needs in Redis (``{p}:f:<jid>``), so any worker can serve any
client. Connection limits (``--max-connections``) apply per worker.

The parent serves nothing itself. It checks the address once (a bind error is one
line, as with one process, and ``--port 0`` is resolved to one port for all), forks
the workers, waits until every one listens, forwards SIGINT/SIGTERM for a graceful
stop, and starts a worker again if one dies (at most once a second). A worker that
fails before it listens (Redis away at start) stops the whole command with its
error and exit code, as one process would.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable

from tracker.errors import TrackerError

log = logging.getLogger("tracker.server")

PR_SET_PDEATHSIG = 1  # linux/prctl.h
RESTART_EVERY = 1.0  # seconds, at least, between two starts of a worker that died


def reuse_port_supported() -> bool:
    return hasattr(socket, "SO_REUSEPORT") and sys.platform.startswith("linux")


def claim_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) that holds the port while the workers start: without
    SO_REUSEPORT when a port is named, so a port in use is refused here, once; with it
    for port 0, so the workers can bind the port the kernel chose."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if port == 0:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise listen_error(host, port, e) from None
    return s


def listen_error(host: str, port: int, e: OSError) -> TrackerError:
    """The one-line error of a port that cannot be listened on (one process or many)."""
    return TrackerError(f"cannot listen on {host}:{port}: {e.strerror or e}")


class Ready:
    """What a worker's server calls (``.set()``) once it listens: one byte to the parent."""

    def __init__(self, fd: int):
        self.fd = fd

    def set(self) -> None:
        try:
            os.write(self.fd, b"1")
        except OSError:
            pass


def run(n: int, host: str, port: int, serve: Callable[[int, Ready], None]) -> None:
    """Run ``serve(port, ready)`` in ``n`` forked workers until SIGINT/SIGTERM.

    ``serve`` must listen with SO_REUSEPORT on (host, port) and call ``ready.set()``
    once it does; it runs in the child only (the parent opens no Redis connection and
    no event loop, so nothing is shared across the fork).
    """
    if not reuse_port_supported():
        raise TrackerError("workers: more than one needs SO_REUSEPORT (Linux); "
                           "run one process per port instead")
    held = claim_port(host, port)
    if port:
        held.close()  # a named port: checked to be free, now free for the workers
    port = port or held.getsockname()[1]
    stopping = False
    pids: set[int] = set()
    read_fd, write_fd = os.pipe()

    def start() -> None:
        pid = os.fork()
        if pid == 0:  # the worker: serve, then leave without the parent's exit handlers
            code = 0
            os.close(read_fd)
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            _die_with_parent()
            try:
                serve(port, Ready(write_fd))
            except TrackerError as e:
                print(f"tracker: error: {e}", file=sys.stderr)
                code = e.exit_code
            except KeyboardInterrupt:
                code = 130
            except BaseException:
                log.exception("worker %d failed", os.getpid())
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.add(pid)

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for _ in range(n):
            start()
        ready = 0
        while ready < n:  # every worker listens, or the first failure is the command's
            if select.select([read_fd], [], [], 0.2)[0]:
                ready += len(os.read(read_fd, 64))
            code = _reap(pids)
            if code is not None and not stopping:
                stop()
                _wait_all(pids)
                raise SystemExit(code if code > 0 else 1)
            if stopping:
                break
        held.close()
        if not stopping:
            log.info("%d workers serving on %s:%d", n, host, port)
        while pids:
            code = _reap(pids, block=True)
            if code is None or stopping:
                continue
            log.warning("a worker exited (code %d); starting another", code)
            time.sleep(RESTART_EVERY)
            if not stopping:
                start()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        held.close()
        os.close(read_fd)
        os.close(write_fd)


def _die_with_parent() -> None:
    """Have the kernel send this worker SIGTERM (a graceful stop) if the parent dies,
    even by SIGKILL, so no worker is left serving without it (Linux prctl)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _reap(pids: set[int], block: bool = False) -> int | None:
    """Collect one exited worker: its exit code, or None when none has exited."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            pids.clear()
            return None
        if pid == 0:
            return None
        if pid in pids:
            pids.discard(pid)
            return os.waitstatus_to_exitcode(status)


def _wait_all(pids: set[int]) -> None:
    while pids:
        _reap(pids, block=True)
