"""Reads without a script (tracker.store.direct): the same answers as get.lua, and get.lua
whenever the transaction cannot answer alone (lag, a split or a rebuild since the
geometry was cached, overflow values, no MULTI rights, a lost connection)."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading

import pytest
from helpers import acl_roles, acl_users, open_deployment, wipe

from tracker import events
from tracker.aio import AsyncTracker
from tracker.projector import Projector
from tracker.query import Tracker
from tracker.replay import rebuild
from tracker.store import keys
from tracker.store.direct import Direct


class Counted(Tracker):
    """A Tracker that counts the reads get.lua answered."""

    scripted = 0

    def _read(self, groups, jids):
        self.scripted += 1
        return super()._read(groups, jids)


def scripted_only(d) -> Counted:
    t = Counted(d)
    t.direct.usable = False
    return t


def fill(d, n: int = 60) -> list[str]:
    """Jobs in every state and shape, folded; their JIDs, plus two never tracked."""
    pub = Tracker(d).publisher
    jids = []
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=20)
    with pub.batch() as b:
        for i in range(n):
            jid = f"dr-{i:04d}"
            jids.append(jid)
            b.enqueued(jid, custom={"track": 1}, queue=f"q{i % 3}")
            if i % 5 >= 1:
                b.working(jid, reserve_for=600 + i)
            if i % 5 == 2:
                b.set(jid, percent=i % 101, desc=f"step {i}", reserve_until=soon + dt.timedelta(seconds=i))
            if i % 5 == 3:
                b.success(jid)
            if i % 5 == 4:
                b.failed(jid) if i % 2 else b.dead(jid)
    Projector(d, consumer="t").drain()
    return jids + ["dr-never", "x" * 8]


def test_direct_answers_equal_the_scripts(backend):
    d = backend(partitions=4, ttl=1800)
    jids = fill(d)
    direct, lua = Counted(d), scripted_only(d)
    assert direct.direct.usable
    assert direct.get_many(jids) == lua.get_many(jids)
    for jid in jids[:12] + jids[-2:]:
        assert direct.get(jid) == lua.get(jid)
        assert direct.reserved_until(jid) == lua.reserved_until(jid)
    # The first read learnt each partition's geometry (a few buckets by now): at most
    # one retry, then every read answered without a script.
    assert direct.scripted == 0 and lua.scripted > 0
    assert direct.get("dr-0002")["percent"] == 2 and direct.get("dr-0002")["desc"] == "step 2"


def test_lag_is_folded_by_the_script_path(backend):
    """The transaction sees the fold behind the log's tip and hands over to get.lua,
    which folds it: a read answers its own last write."""
    d = backend(partitions=2, ttl=1800)
    fill(d, 10)
    t = Counted(d)
    t.get("dr-0001")
    before = t.scripted
    t.set("dr-0001", percent=77, desc="own write")
    got = t.get("dr-0001")
    assert (got["percent"], got["desc"]) == (77, "own write")
    assert t.scripted == before + 1
    t.get("dr-0001")
    assert t.scripted == before + 1  # folded now: back to the transaction


def test_splits_and_a_rebuild_switch_are_learnt(backend):
    d = backend(partitions=1, ttl=1800)
    t, lua = Counted(d), scripted_only(d)
    fill(d, 5)
    assert t.get("dr-0001")["state"] == "working"
    seen = t.direct.parts[0].raw
    fill(d, 400)  # hundreds of jobs in one partition: its buckets split
    jids = [f"dr-{i:04d}" for i in range(0, 400, 7)]
    assert t.get_many(jids) == lua.get_many(jids)
    assert t.direct.parts[0].raw != seen
    rebuild(d)  # a new generation: other bucket keys, the old ones unlinked
    assert t.get_many(jids) == lua.get_many(jids)
    assert t.direct.parts[0].raw.split(b":")[0] != seen.split(b":")[0]


def test_long_values_and_long_jids_are_read_by_the_script(backend):
    d = backend(partitions=2, ttl=1800)
    t, lua = Counted(d), scripted_only(d)
    long_jid = "L" * events.MAX_JID
    t.publisher.enqueued(long_jid, custom={"track": 1})
    t.publisher.enqueued("long-desc", custom={"track": 1})
    t.set("long-desc", percent=5, desc="é" * 400)  # 800 bytes: an overflow string
    Projector(d, consumer="t").drain()
    for jid in (long_jid, "long-desc"):
        before = t.scripted
        assert t.get(jid) == lua.get(jid) and t.get(jid)["state"] == "enqueued"
        assert t.scripted > before
    assert t.get("long-desc")["desc"] == "é" * 400


def test_stale_mode_reads_without_the_tip(backend):
    d = backend(partitions=2, ttl=1800, read="stale")
    fill(d, 5)
    t = Counted(d)
    assert not t.direct.check_tip
    t.set("dr-0001", percent=9)  # not folded: a stale read does not see it
    assert "percent" not in t.get("dr-0001") and t.scripted == 0


def test_threads_share_the_reads(backend):
    d = backend(partitions=4, ttl=1800)
    jids = fill(d, 40)
    t, lua = Tracker(d), scripted_only(d)
    want = {j: lua.get(j) for j in jids}
    wrong: list = []

    def worker(k: int) -> None:
        for i in range(150):
            j = jids[(i * 7 + k) % len(jids)]
            if t.get(j) != want[j]:
                wrong.append(j)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert wrong == []


def test_a_lost_connection_falls_back_and_reconnects(real_redis_url, prefix):
    d = open_deployment("real", real_redis_url, prefix, partitions=2, ttl=1800)
    try:
        fill(d, 10)
        t = Counted(d)
        t.get("dr-0001")
        conn = t.direct._conn
        conn.send_command("CLIENT", "ID")
        d.client.client_kill_filter(_id=int(conn.read_response()))
        before = t.scripted
        assert t.get("dr-0002")["state"] == "working"  # the killed socket: get.lua answers
        assert t.get("dr-0003")["state"] == "success"
        assert t.scripted == before + 1  # one fallback, then a new connection of its own
    finally:
        wipe(d)
        d.close()


def test_a_user_without_multi_reads_through_the_script(real_redis_url, prefix):
    d = open_deployment("real", real_redis_url, prefix, partitions=2, ttl=1800)
    try:
        fill(d, 10)
        want = scripted_only(d).get_many(["dr-0001", "dr-0002"])
        with acl_users(real_redis_url, prefix) as user:
            rules = [r for r in acl_roles(prefix)["reader"] if r not in ("+multi", "+exec")]
            r = open_deployment("real", user("nomulti", rules), prefix, partitions=2, ttl=1800)
            try:
                t = Counted(r)
                assert t.get_many(["dr-0001", "dr-0002"]) == want
                assert not t.direct.usable and t.scripted == 1
            finally:
                r.close()
    finally:
        wipe(d)
        d.close()


@pytest.mark.parametrize("part", [0, 1])
def test_keys_the_transaction_reads_are_the_partitions(part):
    """Every key a direct read names carries the partition's one hash tag."""
    dr = Direct(None, "pfx")
    c = dr._learn(part, b"3:1:2:1")
    tag = keys.tag("pfx", part).encode()
    assert c.head.count(tag) == 2 and c.bucket.startswith(tag.decode() + ":b3:")


def test_asyncio_reads_equal_the_scripts(real_redis_url, prefix):
    """AsyncTracker (serve, web): the same transaction first, get.lua behind it."""
    d = open_deployment("real", real_redis_url, prefix, partitions=4, ttl=1800)
    try:
        jids = fill(d, 60)
        want = scripted_only(d).get_many(jids)

        async def main():
            t = await AsyncTracker.open(d.settings)
            scripted = []
            rows = t._rows

            async def counted(batch):
                scripted.append(len(batch))
                return await rows(batch)

            t._rows = counted
            try:
                first = await t.get_many(jids)
                again = await t.get_many(jids)
                n = len(scripted)
                Tracker(d).set("dr-0001", percent=64)  # not folded: the script folds it
                lagged = await t.get("dr-0001")
                after_lag = len(scripted)
                t.direct._conn._writer.transport.abort()  # the kept connection dies
                lost = await t.get("dr-0002")
                return first, again, n, lagged, after_lag, lost, t.direct.usable
            finally:
                await t.close()

        first, again, n, lagged, after_lag, lost, usable = asyncio.run(main())
        assert first == want and again == want and usable
        assert n == 0  # every batch answered by the transaction
        assert lagged["percent"] == 64 and after_lag == 1
        assert lost == want[2]
    finally:
        wipe(d)
        d.close()
