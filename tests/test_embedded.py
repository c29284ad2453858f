"""The embedded default: no Redis URL, a real redis-server under the data dir,
shared by every tracker process and persisting across restarts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tracker.store import embedded

TRACKER = [sys.executable, "-c", "import sys; sys.argv[0] = 'tracker'; "
           "from tracker.cli import main; main()"]


@pytest.fixture
def data_dir():
    path = Path(tempfile.mkdtemp(prefix="tremb", dir="/tmp"))  # short: a unix socket lives here
    yield path
    embedded.stop(path)
    deadline = time.monotonic() + 10
    while servers(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not servers(path), "the embedded server outlived the test"
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def env(data_dir):
    e = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    e.pop("REDIS_URL", None)
    e["TRACKER_DATA_DIR"] = str(data_dir)
    return e


def servers(data_dir: Path) -> list[int]:
    """PIDs of server processes (valkey-server or redis-server) working in this data dir (a
    read-only look at /proc: the server rewrites its title, but it runs with --dir as its
    working directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if ((b"redis-server" in cmdline or b"valkey-server" in cmdline)
                    and os.readlink(entry / "cwd") == str(data_dir.resolve())):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def ok(env, *args) -> str:
    r = subprocess.run(TRACKER + list(args), env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    return r.stdout


def test_commands_share_one_server_across_processes(env, data_dir):
    ok(env, "emit", "enqueued", "emb1", "--track")
    pid = (data_dir / "redis.pid").read_text().strip()
    ok(env, "emit", "working", "emb1")
    assert ok(env, "set", "emb1", "--percent", "33", "--desc", "embedded") == "OK\n"
    assert ok(env, "project", "--once").startswith("folded 3 events")
    answer = json.loads(ok(env, "get", "emb1"))
    assert (answer["state"], answer["percent"], answer["desc"]) == ("working", 33, "embedded")
    assert (data_dir / "redis.pid").read_text().strip() == pid  # the same server throughout
    assert servers(data_dir) == [int(pid)]
    assert ok(env, "embedded", "path").strip() == str(embedded.socket_path(data_dir))


def test_data_persists_across_stop_and_restart(env, data_dir):
    ok(env, "emit", "enqueued", "keep", "--track")
    ok(env, "set", "keep", "--percent", "70", "--desc", "saved")
    ok(env, "project", "--once")
    first = (data_dir / "redis.pid").read_text().strip()
    assert ok(env, "embedded", "stop").strip() == "stopped"
    deadline = time.monotonic() + 10
    while servers(data_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not servers(data_dir)
    assert ok(env, "embedded", "stop").strip() == "not running"
    answer = json.loads(ok(env, "get", "keep"))  # starts the server again
    assert (answer["state"], answer["percent"], answer["desc"]) == ("enqueued", 70, "saved")
    assert (data_dir / "redis.pid").read_text().strip() != first
    # the log persisted too: a new event folds onto the restored snapshot
    ok(env, "emit", "success", "keep")
    assert ok(env, "project", "--once").startswith("folded 1 events")
    assert json.loads(ok(env, "get", "keep"))["state"] == "success"


def test_two_processes_starting_it_at_once_start_one_server(env, data_dir):
    procs = [subprocess.Popen(TRACKER + ["emit", "enqueued", f"race{i}", "--track"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    assert len(servers(data_dir)) == 1
    ok(env, "project", "--once")
    lines = ok(env, "get", "race0", "race1", "race2").splitlines()
    assert [json.loads(x)["state"] for x in lines] == ["enqueued"] * 3


# ------------------------------------------- path starts nothing; the watchdog (issue 10)

def watchdogs(data_dir: Path) -> list[int]:
    """PIDs of watchdog processes (tracker/store/watchdog.py) for this data dir."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"watchdog.py") for a in argv) and str(data_dir).encode() in argv:
            found.append(int(entry.name))
    return found


def gone(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"  # exited, not yet reaped by its parent


def wait_until(check, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def test_embedded_path_starts_nothing(env, data_dir):
    r = subprocess.run(TRACKER + ["embedded", "path"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(embedded.socket_path(data_dir))
    assert "not running" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not servers(data_dir) and not embedded.socket_path(data_dir).exists()
    ok(env, "status")  # this one needs the server: it starts it
    r = subprocess.run(TRACKER + ["embedded", "path"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.strip() == str(embedded.socket_path(data_dir))


def _start(env, data_dir) -> tuple[int, list[int]]:
    ok(env, "emit", "enqueued", "wd1", "--track")
    ok(env, "project", "--once")
    pid = int((data_dir / "redis.pid").read_text())
    assert servers(data_dir) == [pid]
    assert wait_until(lambda: len(watchdogs(data_dir)) == 1, 10), "no watchdog started"
    return pid, watchdogs(data_dir)


def test_a_server_whose_data_dir_was_deleted_exits(env, data_dir):
    env = {**env, "TRACKER_EMBEDDED_WATCH": "0.2"}
    pid, dogs = _start(env, data_dir)
    shutil.rmtree(data_dir)
    assert wait_until(lambda: gone(pid), 10), "the server outlived its data directory"
    assert wait_until(lambda: all(gone(w) for w in dogs), 10), "the watchdog outlived it"


def test_a_server_whose_socket_was_deleted_exits_and_its_data_persists(env, data_dir):
    env = {**env, "TRACKER_EMBEDDED_WATCH": "0.2"}
    pid, dogs = _start(env, data_dir)
    embedded.socket_path(data_dir).unlink()
    assert wait_until(lambda: gone(pid), 10), "the server outlived its socket"
    assert wait_until(lambda: all(gone(w) for w in dogs), 10)
    # shut down cleanly (the append-only file flushed): a new server has the track
    assert json.loads(ok(env, "get", "wd1"))["state"] == "enqueued"
    assert int((data_dir / "redis.pid").read_text()) != pid


def test_stopping_the_server_ends_its_watchdog(env, data_dir):
    _, dogs = _start(env, data_dir)  # the default interval: the stop is seen at once
    assert ok(env, "embedded", "stop").strip() == "stopped"
    assert wait_until(lambda: all(gone(w) for w in dogs), 3), "the watchdog outlived the server"
