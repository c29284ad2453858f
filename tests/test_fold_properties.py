"""Properties of the track fold, and the invariant of issue 2 section 5.

First the pure fold (projections/track.py): deterministic, incremental,
expiry monotone in the TTL, last non-null percent/desc, no track for a JID
never enqueued with track, states among the six. Then the live projector:
random logs with duplicated events, interleaved steps of several Projector
instances (different consumer names) over the partitions in random order, and
a foreign reader leaving pending entries behind, must give exactly the
snapshots of the sequential Python fold of the log.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
import uuid

import pytest
from helpers import expected_snapshots, fake_client, read_snapshots, wipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import projections
from projections.track import STATES
from tracker import events, replay
from tracker.projector import Projector
from tracker.publisher import Publisher
from tracker.store import keys
from tracker.store.deployment import Deployment
from tracker.store.settings import Settings

JIDS = ["a", "b", "c", "d", "e"]
DAY = 86_400_000

# -------------------------------------------------------------- event strategies

jid = st.sampled_from(JIDS)
text = st.one_of(st.none(), st.sampled_from(["", "x", "Calculating...", "é€"]))
percent = st.one_of(st.none(), st.integers(0, 100))
reserve = st.one_of(st.none(), st.sampled_from([0, 30, 60, 1800, 86400, 10**6]))


def event_strategy(until_base: int = 0):
    return st.one_of(
        st.builds(events.Enqueued, jid=jid, track=st.sampled_from([True, True, False]),
                  reserve_for=reserve),
        st.builds(events.Working, jid=jid, reserve_for=reserve),
        st.builds(events.TrackSet, jid=jid, percent=percent, desc=text,
                  reserve_until=st.one_of(st.none(), st.integers(0, 3 * DAY).map(
                      lambda n: until_base + n))),
        st.builds(events.Success, jid=jid),
        st.builds(events.Failed, jid=jid, errtype=text, message=text),
        st.builds(events.Dead, jid=jid, errtype=text, message=text),
    )


@st.composite
def timed_logs(draw, max_size=40):
    """(time ms, event) pairs in log order: times never go back."""
    evs = draw(st.lists(event_strategy(), max_size=max_size))
    at, out = 0, []
    for ev in evs:
        at += draw(st.sampled_from([0, 1, 500, 60_000, 1_800_000, 2_000_000, DAY]))
        out.append((at, ev))
    return out


ttls = st.sampled_from([1, 1000, 1_800_000, 10 * DAY])


# ------------------------------------------------------------------ pure folds

@given(timed_logs(), ttls)
def test_fold_is_deterministic_and_pure(log, ttl):
    before = [(at, events.encode_entry(ev)) for at, ev in log]
    assert projections.fold(log, ttl) == projections.fold(list(log), ttl)
    assert [(at, events.encode_entry(ev)) for at, ev in log] == before


@given(timed_logs(), ttls, st.integers(0, 40))
def test_fold_is_incremental(log, ttl, cut):
    """Folding a prefix then the rest equals folding the whole log (what batches do)."""
    tracks = projections.fold(log[:cut], ttl)
    assert projections.fold(log[cut:], ttl, tracks) == projections.fold(log, ttl)


@given(timed_logs(), ttls)
def test_state_is_one_of_the_six_and_unknown_jids_never_appear(log, ttl):
    tracked = {ev.jid for _, ev in log if isinstance(ev, events.Enqueued) and ev.track}
    tracks = projections.fold(log, ttl)
    assert set(tracks) <= tracked
    for t in tracks.values():
        assert t.state in STATES and t.state != "unknown"


@given(timed_logs(), ttls)
def test_times_follow_the_contract(log, ttl):
    """updated_at is the last event's time; expiry is ttl after the later of it and the
    reservation; a reservation is never more than one day after the event that set it."""
    tracks = {}
    for at, ev in log:
        old = tracks.get(ev.jid)
        new = projections.apply(old, ev, at, ttl)
        if new is None:
            tracks.pop(ev.jid, None)
            continue
        assert new.updated_at == at
        assert new.expires_at == max(at, new.reserved_until) + ttl
        assert new.reserved_until <= at + DAY or new.reserved_until == (old and old.reserved_until)
        if new.state != "working":
            assert new.reserved_until == 0
        if isinstance(ev, events.TrackSet) and old is not None and old.expires_at > at:
            assert new.state == old.state  # TRACK SET never changes the state
            assert new.reserved_until >= old.reserved_until  # never sooner
        tracks[ev.jid] = new


@given(timed_logs())
def test_percent_and_desc_keep_their_last_non_null_values(log):
    """With no expiry in play, percent/desc are the last non-null values any TRACK SET
    gave since the job was first enqueued with track, whatever happened after."""
    ttl = 100 * DAY * 40
    want: dict[str, dict] = {}
    for _, ev in log:
        if isinstance(ev, events.Enqueued) and ev.track and ev.jid not in want:
            want[ev.jid] = {"percent": None, "desc": None}
        elif isinstance(ev, events.TrackSet) and ev.jid in want:
            for f in ("percent", "desc"):
                if getattr(ev, f) is not None:
                    want[ev.jid][f] = getattr(ev, f)
    tracks = projections.fold(log, ttl)
    assert set(tracks) == set(want)
    for j, t in tracks.items():
        assert (t.percent, t.desc) == (want[j]["percent"], want[j]["desc"])


@given(timed_logs(), ttls, ttls)
def test_expiry_is_monotone_in_the_ttl(log, ttl1, ttl2):
    """A longer TTL never loses a track nor makes it expire sooner."""
    lo, hi = sorted((ttl1, ttl2))
    short, long_ = projections.fold(log, lo), projections.fold(log, hi)
    assert set(short) <= set(long_)
    for j in short:
        assert long_[j].expires_at >= short[j].expires_at
        assert long_[j].state == short[j].state


@given(timed_logs(), ttls, st.integers(0, 10 * DAY))
def test_visible_hides_exactly_the_expired(log, ttl, now):
    for t in projections.fold(log, ttl).values():
        assert (projections.visible(t, now) is None) == (t.expires_at <= now)


@given(timed_logs(), ttls)
def test_entry_encoding_round_trips(log, ttl):
    for _, ev in log:
        raw = {k: str(v).encode() for k, v in events.encode_entry(ev).items()}
        assert events.decode_entry(raw) == ev


# ------------------------------------------------ the invariant, live projector

def _open(kind: str, url: str, partitions: int, **extra) -> Deployment:
    prefix = "tprop" + uuid.uuid4().hex[:10]
    s = Settings(redis_url=url if kind == "real" else "redis://fakeredis", prefix=prefix,
                 partitions=partitions, **extra)
    if kind == "fake":
        return Deployment.open(s, client=fake_client(), check_version=False)
    return Deployment.open(s)


@pytest.fixture(params=["fake", "real"])
def kind(request):
    return request.param


def foreign_read(d: Deployment, part: int, name: str, count: int) -> int:
    """A reader outside tracker: XREADGROUP in the projectors' group, never XACK."""
    stream = keys.stream(d.prefix, part)
    try:
        reply = d.client.execute_command("XREADGROUP", "GROUP", keys.GROUP, name, "COUNT", count,
                                         "STREAMS", stream, ">")
    except Exception as e:  # the group is created by the first projector step
        if "NOGROUP" not in str(e) and "requires the key to exist" not in str(e):
            raise
        return 0
    return sum(len(entries) for _, entries in reply or [])


def assert_invariant(d: Deployment) -> None:
    assert read_snapshots(d) == expected_snapshots(d)
    for p in range(d.partitions):
        assert d.client.xpending(keys.stream(d.prefix, p), keys.GROUP)["pending"] == 0


POISON = [{b"t": b"working", b"j": b"a", b"r": b"-5"}, {b"t": b"nope", b"j": b"b"},
          {b"\xff": b"x"}, {b"t": b"trackset", b"j": b"c", b"p": b"101"}]

ops = st.lists(st.one_of(
    st.tuples(st.just("append"), st.lists(event_strategy(int(time.time() * 1000)), min_size=1,
                                          max_size=6), st.integers(0, 3)),
    st.tuples(st.just("poison"), st.sampled_from(range(len(POISON))), st.integers(0, 2)),
    st.tuples(st.just("step"), st.integers(0, 2), st.integers(0, 2)),
    st.tuples(st.just("foreign"), st.integers(0, 2), st.integers(1, 4)),
), min_size=1, max_size=30)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=ops, partitions=st.sampled_from([1, 2, 3]), batch=st.sampled_from([1, 2, 5, 500]),
       n_proj=st.sampled_from([2, 3]))
def test_interleaved_projectors_equal_the_sequential_fold(kind, real_redis_url, ops, partitions,
                                                          batch, n_proj):
    d = _open(kind, real_redis_url, partitions)
    try:
        pub = Publisher(d)
        projs = [Projector(d, consumer=f"proj-{i}", batch=batch, claim_idle_ms=0)
                 for i in range(n_proj)]
        for op in ops:
            if op[0] == "append":
                evs = list(op[1])
                if op[2]:  # the job server re-sends some events (duplicates in the log)
                    evs += evs[: op[2]]
                pub.publish_many(evs)
            elif op[0] == "poison":
                d.client.xadd(keys.stream(d.prefix, op[2] % partitions), POISON[op[1]])
            elif op[0] == "step":
                projs[op[1] % n_proj].step(op[2] % partitions)
            else:
                foreign_read(d, op[1] % partitions, "foreign", op[2])
        # projectors finish the job; the foreign reader's pending entries are claimed
        random.Random(len(ops)).choice(projs).drain()
        assert_invariant(d)
    finally:
        wipe(d)
        d.close()


def random_event(rng: random.Random) -> events.AnyEvent:
    j = rng.choice(JIDS)
    return rng.choice([
        lambda: events.Enqueued(jid=j, track=rng.random() < 0.8),
        lambda: events.Working(jid=j, reserve_for=rng.choice([None, 60, 600])),
        lambda: events.TrackSet(jid=j, percent=rng.choice([None, rng.randint(0, 100)]),
                                desc=rng.choice([None, "x", f"step {rng.randint(0, 9)}"]),
                                reserve_until=rng.choice([None, int(time.time() * 1000) + 7_000_000])),
        lambda: events.Success(jid=j), lambda: events.Failed(jid=j, errtype="E"),
        lambda: events.Dead(jid=j)])()


def test_concurrent_daemons_with_a_foreign_reader(real_redis_url):
    """Three Projector.run() daemons (threads, own connections) race over the same
    partitions while events flow and a foreign reader leaves pending entries."""
    d = _open("real", real_redis_url, 3)
    rng = random.Random(7)
    projs = [Projector(d, consumer=f"daemon-{i}", batch=rng.choice([1, 3, 50]), block_ms=100,
                       claim_idle_ms=0) for i in range(3)]
    threads = [threading.Thread(target=p.run, kwargs={"report_every": 0.2}) for p in projs]
    try:
        for t in threads:
            t.start()
        pub = Publisher(d)
        for _i in range(60):
            evs = [random_event(rng) for _ in range(rng.randint(1, 8))]
            pub.publish_many(evs + evs[: rng.randint(0, 2)])
            foreign_read(d, rng.randrange(3), "foreign", rng.randint(1, 3))
            time.sleep(0.005)
    finally:
        for p in projs:
            p.stop()
        for t in threads:
            t.join(10)
    try:
        assert not any(t.is_alive() for t in threads)
        Projector(d, consumer="final", claim_idle_ms=0).drain()
        assert_invariant(d)
        assert sum(p.totals.folded for p in projs) > 0
    finally:
        wipe(d)
        d.close()


def test_pending_entries_are_folded_in_stream_order(kind, real_redis_url):
    """A foreign reader holds three entries; one of them was re-claimed recently (its
    idle time is short). The projector must not fold the idle ones around it."""
    d = _open(kind, real_redis_url, 1)
    try:
        pub, stream = Publisher(d), keys.stream(d.prefix, 0)
        proj = Projector(d, consumer="p", claim_idle_ms=200)
        proj.ensure_group(0)
        pub.enqueued("j", custom={"track": 1})
        proj.step(0)
        ids = [pub.publish(events.make_trackset("j", desc=x))[0] for x in ("one", "two", "three")]
        assert foreign_read(d, 0, "foreign", 3) == 3
        time.sleep(0.3)
        d.client.xclaim(stream, keys.GROUP, "other-tool", 0, [ids[1]])  # resets its idle time
        proj.step(0)
        time.sleep(0.3)
        proj.drain()
        assert d.client.xpending(stream, keys.GROUP)["pending"] == 0
        assert read_snapshots(d)["j"][b"d"] == b"three"
        assert_invariant(d)
    finally:
        wipe(d)
        d.close()


def test_projections_never_import_redis():
    r = subprocess.run([sys.executable, "-c", "import projections, sys; "
                        "projections.fold([], 1); assert 'redis' not in sys.modules, "
                        "sorted(m for m in sys.modules if 'redis' in m)"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def _lagging_projector(kind, url, grace: int, caplog=None) -> None:
    """A working event is appended before the track's expiry but folded after it
    (the projector lags ~1.3 s behind a 1 s TTL)."""
    d = _open(kind, url, 1, ttl=1, grace=grace)
    try:
        pub, proj = Publisher(d), Projector(d, consumer="lag")
        pub.enqueued("lag", custom={"track": 1})
        proj.drain()
        pub.working("lag", reserve_for=60)  # at < expires_at: it meets the live track
        time.sleep(1.3)
        proj.drain()
        if grace == 0:
            # Beyond the grace the key expired physically before the late event was
            # folded: the projector says so, and a rebuild from the log repairs it.
            assert any("expiry grace" in r.getMessage() for r in caplog.records)
            assert "lag" not in read_snapshots(d)
            replay.rebuild(d)
        assert_invariant(d)
        assert read_snapshots(d)["lag"][b"s"] == b"working"
    finally:
        wipe(d)
        d.close()


def test_invariant_holds_when_the_lag_is_within_the_grace(kind, real_redis_url):
    _lagging_projector(kind, real_redis_url, grace=30)


def test_lag_beyond_the_grace_is_reported_and_replay_repairs_it(kind, real_redis_url, caplog):
    caplog.set_level("WARNING", logger="tracker.projector")
    _lagging_projector(kind, real_redis_url, grace=0, caplog=caplog)
