"""Rebuild rate and history latency on a private redis-server (never the shared one).

    python scripts/bench_replay.py [EVENTS]      # default 1_000_000

Prints tracker.replay.bench_replay's dict as JSON: rebuild events/s, the same as a
ratio to a plain XRANGE read of the log in the same run, and history latency.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import redis

from tracker.config import Deployment, Settings
from tracker.replay import bench_replay


def main() -> None:
    events = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen([os.environ.get("REDIS_SERVER", "redis-server"), "--port", str(port), "--save", "",
                                   "--appendonly", "no", "--dir", tmp],
                                  stdout=subprocess.DEVNULL)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            for _ in range(100):
                try:
                    redis.Redis.from_url(url).ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            d = Deployment.open(Settings(redis_url=url, prefix="bench", partitions=8),
                                check_version=False)
            version = d.client.info("server")["redis_version"]
            print(json.dumps({"redis": version, **bench_replay(d, events)}, indent=1))
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
