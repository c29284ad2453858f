"""A scripted Faktory 1.10 server for the proxy's tests (CI has no Faktory).

It keeps queues, reservations, retries and the dead set in memory and answers
with the exact bytes a real Faktory 1.10.0 server sends (observed on one and
noted in the proxy's PR): ``+HI {"v":2}`` or ``+HI {"v":2,"i":N,"s":"salt"}``,
``-ERR Invalid password`` then a close, a bad HELLO closed without a reply, PUSH's
checks in Faktory's order and messages, PUSHB's map of rejected JIDs (sorted, no
"ERR " prefix), FETCH's re-marshalled job in Faktory's field order or ``$-1``
after a wait, ACK ``+OK`` for any JID, FAIL of an unknown JID ``-ERR Job not
found <jid>``, the retry rule of manager/retry.go, BEAT's ``+OK`` or state map,
Enterprise-only errors, END closing without a reply.

Faults on demand: ``cut(verb)`` sends half of the next reply to ``verb`` and
closes; ``drop(verb)`` closes instead of answering; ``down()`` / ``up()`` stop
and restart listening on the same port; ``hold(verb, seconds)`` delays replies.
Every received line is kept in ``lines`` (raw, terminator included), so tests can
check what the proxy forwarded byte for byte.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import random
import re
import ssl
import threading
from collections import deque
from typing import Any, Optional

FIELDS = ("retry", "failure", "custom", "jid", "queue", "jobtype", "created_at", "enqueued_at",
          "at", "args", "reserve_for", "backtrace")
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")
ENTERPRISE = {b"TRACK": b"tracking", b"BATCH": b"batch"}


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def pwdhash(password: str, salt: str, i: int) -> str:
    h = hashlib.sha256((password + salt).encode()).digest()
    for _ in range(i - 1):
        h = hashlib.sha256(h).digest()
    return h.hex()


def marshal(job: dict) -> bytes:
    """The job as Faktory re-marshals its struct: known fields only, in its order."""
    out = {k: job[k] for k in FIELDS if job.get(k) not in (None, "") and
           not (k in ("reserve_for", "backtrace") and not job[k])}
    return json.dumps(out, separators=(",", ":")).encode()


def bulk(body: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(body), body)


def err(text: str | bytes) -> bytes:
    return b"-ERR " + (text.encode() if isinstance(text, str) else text) + b"\r\n"


class FakeFaktory:
    def __init__(self, password: Optional[str] = None, fetch_wait: float = 2.0,
                 retry_delay: Optional[float] = None, handshake: float = 2.0,
                 tls: Optional[ssl.SSLContext] = None):
        self.password = password
        self.tls = tls
        self.fetch_wait = fetch_wait  # Faktory's BRPOP blocks 2 s
        self.retry_delay = retry_delay  # None: retries stay in the retry set (as for ~20 s)
        self.handshake = handshake
        self.queues: dict[str, deque] = {}
        self.working: dict[str, dict] = {}
        self.retries: dict[str, dict] = {}
        self.dead: dict[str, dict] = {}
        self.scheduled: dict[str, dict] = {}
        self.workers: dict[str, str] = {}  # wid -> running | quiet | terminate
        self.lines: list[bytes] = []
        self.greetings: list[bytes] = []
        self.faults: dict[bytes, tuple[str, float]] = {}
        self.connections = 0
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._server: Optional[asyncio.base_events.Server] = None
        self._conns: set[asyncio.StreamWriter] = set()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.up()

    # ------------------------------------------------------------ control
    def _call(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def up(self) -> int:
        async def start():
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                      reuse_address=True, ssl=self.tls,
                                                      limit=1 << 30)  # Faktory: no line limit
            return self._server.sockets[0].getsockname()[1]
        self.port = self._call(start())
        return self.port

    def down(self) -> None:
        """Stop listening and drop every connection (a Faktory that died)."""
        async def stop():
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
                self._server = None
            for w in list(self._conns):
                w.transport.abort()
        self._call(stop())

    def close(self) -> None:
        self.down()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def cut(self, verb: bytes) -> None:
        self.faults[verb] = ("cut", 0.0)

    def drop(self, verb: bytes) -> None:
        self.faults[verb] = ("drop", 0.0)

    def hold(self, verb: bytes, seconds: float) -> None:
        self.faults[verb] = ("hold", seconds)

    def sent(self, verb: bytes) -> list[bytes]:
        return [ln for ln in self.lines if ln.split(b" ", 1)[0].rstrip(b"\r\n") == verb]

    # ----------------------------------------------------------- a client
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        self.connections += 1
        wid = None
        try:
            salt, i = f"{random.getrandbits(60):x}", random.randint(4000, 8095)
            if self.password is None:
                hi = b'+HI {"v":2}\r\n'
            else:
                hi = b'+HI {"v":2,"i":%d,"s":"%s"}\r\n' % (i, salt.encode())
            self.greetings.append(hi)
            writer.write(hi)
            try:
                raw = await asyncio.wait_for(reader.readline(), self.handshake)
            except TimeoutError:
                return
            self.lines.append(raw)
            line = raw.rstrip(b"\n").rstrip(b"\r")
            if not line.startswith(b"HELLO {"):
                return  # Faktory closes without a word
            try:
                hello = json.loads(line[6:])
            except ValueError:
                return
            if self.password is not None and hello.get("pwdhash") != pwdhash(self.password, salt, i):
                writer.write(b"-ERR Invalid password\r\n")
                return
            wid = hello.get("wid")
            if wid:
                self.workers.setdefault(wid, "running")
            writer.write(b"+OK\r\n")
            while True:
                raw = await reader.readline()
                if not raw:
                    return
                self.lines.append(raw)
                line = raw[:-1] if raw.endswith(b"\n") else raw
                line = line[:-1] if line.endswith(b"\r") else line
                verb, _, rest = line.partition(b" ")
                if verb == b"END":
                    return
                fault = self.faults.pop(verb, None)
                if fault and fault[0] == "drop":
                    return
                reply = await self.command(verb, rest)
                if fault and fault[0] == "hold":
                    await asyncio.sleep(fault[1])
                if fault and fault[0] == "cut":
                    writer.write(reply[:max(1, len(reply) // 2)])
                    await writer.drain()
                    return
                writer.write(reply)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if wid:
                self.workers.pop(wid, None)
            self._conns.discard(writer)
            writer.close()

    async def command(self, verb: bytes, rest: bytes) -> bytes:
        handler = getattr(self, "do_" + verb.decode("latin-1"), None) if verb.isupper() else None
        if verb in ENTERPRISE:
            return err(b"%s subsystem is only available in Faktory Enterprise" % ENTERPRISE[verb])
        if handler is None:
            return err(b"unknown command " + verb)
        if not rest and verb in (b"ACK", b"BEAT", b"PUSHB", b"QUEUE"):
            return err("internal error")
        return await handler(rest)

    # ----------------------------------------------------------- commands
    def check(self, job: Any) -> Optional[str]:
        """PUSH's checks, in Faktory's order; fills in what the server adds."""
        if not isinstance(job, dict):
            return "invalid JSON"
        if len(str(job.get("jid") or "")) < 8:
            return "jobs must have a reasonable jid parameter"
        if not job.get("jobtype"):
            return "jobs must have a jobtype parameter"
        if job.get("args") is None:
            return "jobs must have an args parameter"
        if (job.get("reserve_for") or 0) > 86400:
            return "jobs cannot be reserved for more than one day"
        at = job.get("at") or ""
        if at and not TS.fullmatch(at):
            return (f"invalid timestamp for 'at': \"{at}\": parsing time \"{at}\" as "
                    f"\"2006-01-02T15:04:05.999999999Z07:00\": cannot parse \"{at}\" as \"2006\"")
        if job.get("retry") is None:
            job["retry"] = 25
        job.setdefault("queue", "default")
        job.setdefault("created_at", now())
        return None

    def enqueue(self, job: dict) -> None:
        job["enqueued_at"] = now()
        self.queues.setdefault(job["queue"] or "default", deque()).appendleft(job)

    def push(self, job: dict) -> None:
        at = job.get("at") or ""
        if at and at > now():
            self.scheduled[job["jid"]] = job
        else:
            self.enqueue(job)

    async def do_PUSH(self, rest: bytes) -> bytes:
        try:
            job = json.loads(rest)
        except ValueError:
            return err("invalid JSON: invalid character looking for beginning of value")
        problem = self.check(job)
        if problem:
            return err(problem)
        self.push(job)
        return b"+OK\r\n"

    async def do_PUSHB(self, rest: bytes) -> bytes:
        try:
            jobs = json.loads(rest)
        except ValueError:
            return err("invalid JSON: unexpected end of JSON input")
        if not isinstance(jobs, list):
            return err("invalid JSON: json: cannot unmarshal object into Go value of type "
                       "[]client.Job")
        rejected = {}
        for job in jobs:
            problem = self.check(job)
            if problem:
                rejected[str(job.get("jid") or "") if isinstance(job, dict) else ""] = problem
            else:
                self.push(job)
        return bulk(json.dumps(dict(sorted(rejected.items())), separators=(",", ":")).encode())

    async def do_FETCH(self, rest: bytes) -> bytes:
        names = rest.decode().split()
        if not names:
            return err("must call fetch with at least one queue")
        deadline = self.loop.time() + self.fetch_wait
        while True:
            for jid, job in list(self.scheduled.items()):
                if job["at"] <= now():
                    del self.scheduled[jid]
                    self.enqueue(job)
            for name in names:
                q = self.queues.get(name)
                if q:
                    job = q.pop()
                    self.working[job["jid"]] = job
                    return bulk(marshal(job))
            if self.loop.time() >= deadline:
                return b"$-1\r\n"
            await asyncio.sleep(0.01)

    @staticmethod
    def payload(rest: bytes) -> Optional[dict]:
        try:
            p = json.loads(rest)
        except ValueError:
            return None
        return p if isinstance(p, dict) else None

    async def do_ACK(self, rest: bytes) -> bytes:
        p = self.payload(rest)
        if not p or not all(isinstance(v, str) for v in p.values()) or not p.get("jid"):
            return err(b"invalid ACK " + rest)
        self.working.pop(p["jid"], None)
        return b"+OK\r\n"  # even for a JID nobody knows

    async def do_FAIL(self, rest: bytes) -> bytes:
        p = self.payload(rest)
        if p is None or not isinstance(p.get("backtrace", []), list):
            return err(b"invalid FAIL " + rest)
        jid = p.get("jid")
        if not jid:
            return err("missing JID")
        job = self.working.pop(jid, None)
        if job is None:
            return err(f"Job not found {jid}")
        message = (p.get("message") or "").strip()[:1000] or "unknown"
        errtype = (p.get("errtype") or "").strip()[:100] or "unknown"
        f = job.get("failure")
        if f:
            f["retry_count"] += 1
            f["remaining"] = max(0, f["remaining"] - 1)
            f.update(message=message, errtype=errtype)
        else:
            f = job["failure"] = {"failed_at": now(), "message": message, "errtype": errtype,
                                  "retry_count": 0, "remaining": job["retry"]}
        if not job["retry"]:
            return b"+OK\r\n"  # retry 0: discarded, in no set
        if f["retry_count"] < job["retry"]:
            f["next_at"] = now()
            self.retries[jid] = job
            if self.retry_delay is not None:
                self.loop.call_later(self.retry_delay, self._retry, jid)
        else:
            self.dead[jid] = job
        return b"+OK\r\n"

    def _retry(self, jid: str) -> None:
        job = self.retries.pop(jid, None)
        if job is not None:
            self.enqueue(job)

    async def do_BEAT(self, rest: bytes) -> bytes:
        p = self.payload(rest)
        if p is None:
            return err(b"invalid BEAT " + rest)
        wid = p.get("wid")
        if wid not in self.workers:
            return err(f"unknown worker {wid}")
        if p.get("current_state") in ("quiet", "terminate") and self.workers[wid] != "terminate":
            self.workers[wid] = p["current_state"]
        state = self.workers[wid]
        return b"+OK\r\n" if state == "running" else bulk(b'{"state":"%s"}' % state.encode())

    async def do_INFO(self, rest: bytes) -> bytes:
        info = {"now": now(), "faktory": {"queues": {k: len(v) for k, v in self.queues.items()},
                                          "sets": {"dead": len(self.dead),
                                                   "retries": len(self.retries),
                                                   "scheduled": len(self.scheduled),
                                                   "working": len(self.working)}},
                "server": {"description": "Faktory", "faktory_version": "1.10.0"}}
        return bulk(json.dumps(info, separators=(",", ":")).encode())

    async def do_FLUSH(self, rest: bytes) -> bytes:
        for s in (self.queues, self.retries, self.dead, self.scheduled):
            s.clear()
        return b"+OK\r\n"

    async def do_MUTATE(self, rest: bytes) -> bytes:
        try:
            op = json.loads(rest)
        except ValueError:
            return err("unexpected end of JSON input")
        sets = {"retries": self.retries, "dead": self.dead, "scheduled": self.scheduled}
        target = sets.get(op.get("target"))
        if target is None:
            return err("invalid target for mutation command")
        if op.get("cmd") not in ("clear", "kill", "discard", "requeue"):
            return err("unknown mutate operation")
        jids = ((op.get("filter") or {}).get("jids")) or list(target)
        for jid in jids:
            job = target.pop(jid, None)
            if job is None:
                continue
            if op["cmd"] == "requeue":
                self.queues.setdefault(job["queue"], deque()).appendleft(job)
            elif op["cmd"] == "kill":
                self.dead[jid] = job
        return b"+OK\r\n"
