"""Shut the embedded Redis down once its data directory or its socket is gone.

``tracker.store.embedded`` starts this script beside each server it starts
(``python -I -S watchdog.py DATA_DIR SOCKET INTERVAL``); it forks and detaches. A server whose
directory was deleted would otherwise run forever: nothing can reach it, and a
new server started in a recreated directory would share nothing with it.

It holds one connection to the server: a unix socket stays connected after its
file is unlinked, so SHUTDOWN can still be sent once the file, or the whole
directory, is gone. "Gone" includes replaced: the directory and the socket are
identified by device and inode, so a directory deleted and made again, or a
socket another server now listens on, counts as gone. The watchdog exits as soon
as the server closes the connection (``tracker embedded stop``, a crash).

Standard library only, and run without ``site``: it costs a bare interpreter,
not an import of tracker and redis-py.
"""

from __future__ import annotations

import os
import select
import socket
import sys
from typing import Optional


def identity(path: str) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def shut_down(conn: socket.socket, directory_gone: bool) -> None:
    """SHUTDOWN (the append-only file is flushed); NOSAVE when there is nowhere left to
    save to or the first attempt was refused."""
    commands = [b"SHUTDOWN NOSAVE\r\n"] if directory_gone else [b"SHUTDOWN\r\n",
                                                                  b"SHUTDOWN NOSAVE\r\n"]
    for command in commands:
        try:
            conn.sendall(command)
            conn.settimeout(30)
            if not conn.recv(4096):  # closed: the server is gone
                return
        except OSError:
            return


def watch(data_dir: str, sock_path: str, interval: float) -> int:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(sock_path)
        conn.sendall(b"CLIENT SETNAME tracker-watchdog\r\n")
        conn.settimeout(10)
        conn.recv(4096)
    except OSError:
        return 1
    home, sock = identity(data_dir), identity(sock_path)
    while True:
        readable, _, _ = select.select([conn], [], [], interval)
        if readable:
            try:
                if not conn.recv(4096):
                    return 0  # the server closed the connection: it stopped
            except OSError:
                return 0
        directory_gone = identity(data_dir) != home
        if directory_gone or identity(sock_path) != sock:
            shut_down(conn, directory_gone)
            return 0


def main(argv: list[str]) -> int:
    data_dir, sock_path, interval = argv[1], argv[2], float(argv[3])
    if os.fork():  # the starter waits for this parent, so no zombie is left behind it
        return 0
    os.setsid()  # the watchdog itself: in its own session, like the daemonized server
    return watch(data_dir, sock_path, max(interval, 0.05))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
