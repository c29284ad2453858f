"""Every sentence of /work/shared/tracking-contract.md, as a test, on fakeredis and real Redis.

The job server's side is the Publisher, the worker's side ``Tracker.set``; the
projector is drained (``Projector.drain``) before each read, as
``tracker project --once`` does.
"""

from __future__ import annotations

import datetime as dt
import re
import time

import pytest
from helpers import cleanup, read_snapshots, round_trips
from redis.connection import AbstractConnection

from tracker import events
from tracker.errors import ConfigError, TrackerError, ValidationError
from tracker.projector import Projector
from tracker.publisher import Publisher
from tracker.query import Tracker
from tracker.store import direct, keys
from tracker.store.deployment import Deployment
from tracker.store.settings import Settings

TRACK = {"track": 1}
RFC3339_UTC = re.compile(r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\Z")
DAY_MS = 86_400_000


@pytest.fixture
def pub(deployment):
    return Publisher(deployment)


@pytest.fixture
def get(tracker, projector):
    """Drain the log, then TRACK GET."""
    def _get(jid):
        projector.drain()
        return tracker.get(jid)
    return _get


def ms_of(entry_id: str) -> int:
    return int(entry_id.split("-")[0])


def utc(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def rfc3339(ms: int) -> str:
    return utc(ms).strftime("%Y-%m-%dT%H:%M:%SZ")


def total_xlen(d) -> int:
    return sum(d.client.xlen(keys.stream(d.prefix, p)) for p in range(d.partitions))


# ------------------------------------------------------------------------ states

def test_the_six_states_are_lowercase_exact_strings(pub, get):
    assert get("j1")["state"] == "unknown"
    pub.enqueued("j1", custom=TRACK)
    assert get("j1")["state"] == "enqueued"
    pub.working("j1")
    assert get("j1")["state"] == "working"
    pub.success("j1")
    assert get("j1")["state"] == "success"
    for end, call in (("failed", pub.failed), ("dead", pub.dead)):
        pub.enqueued(end, custom=TRACK)
        pub.working(end)
        call(end, errtype="RuntimeError", message="boom")
        assert get(end)["state"] == end


# ------------------------------------------------------------------- the track gate

@pytest.mark.parametrize("custom,tracked", [
    ({"track": 1}, True), ({"track": True}, True),
    ({"track": 0}, False), ({"track": "1"}, False), ({"track": False}, False),
    ({"track": 2}, False), ({}, False), (None, False), ({"other": 1}, False),
])
def test_only_track_1_or_true_is_tracked(pub, tracker, get, custom, tracked):
    pub.enqueued("g", custom=custom)
    pub.working("g")
    tracker.set("g", percent=10, desc="d")
    answer = get("g")
    if tracked:
        assert answer == {"jid": "g", "percent": 10, "desc": "d", "state": "working",
                          "updated_at": answer["updated_at"]}
    else:
        assert answer == {"jid": "g", "state": "unknown", "updated_at": ""}


def test_untracked_job_stays_unknown_through_its_whole_life(pub, tracker, get):
    for step in (lambda: pub.enqueued("u"), lambda: pub.working("u"),
                 lambda: tracker.set("u", percent=5), lambda: pub.failed("u"),
                 lambda: pub.enqueued("u", custom={"track": 0}), lambda: pub.dead("u")):
        step()
        assert get("u") == {"jid": "u", "state": "unknown", "updated_at": ""}


# ---------------------------------------------------------------------- TRACK SET

def test_nulls_and_omitted_percent_leave_stored_values_unchanged(pub, tracker, get):
    pub.enqueued("n", custom=TRACK)
    pub.working("n")
    tracker.set("n", percent=40, desc="first")
    tracker.set_json('{"jid":"n","percent":null,"desc":null,"reserve_until":null}')  # Ruby
    a = get("n")
    assert (a["percent"], a["desc"]) == (40, "first")
    tracker.set_json('{"jid":"n","desc":"second"}')  # Go omits percent 0 (omitempty)
    a = get("n")
    assert (a["percent"], a["desc"]) == (40, "second")
    tracker.set("n", percent=None, desc=None)  # Python keywords: None is absent
    assert (get("n")["percent"], get("n")["desc"]) == (40, "second")
    tracker.set_json('{"jid":"n","percent":0}')  # an explicit 0 is a value
    assert get("n")["percent"] == 0
    tracker.set("n", desc="")
    assert get("n")["desc"] == ""
    assert get("n")["state"] == "working"


def test_track_set_on_an_enqueued_job_shows_enqueued_with_percent_and_desc(pub, tracker, get):
    pub.enqueued("e", custom=TRACK)
    assert tracker.set("e", percent=12, desc="Waiting...")
    a = get("e")
    assert a == {"jid": "e", "percent": 12, "desc": "Waiting...", "state": "enqueued",
                 "updated_at": a["updated_at"]}


def test_track_set_during_work_leaves_working(pub, tracker, get):
    pub.enqueued("w", custom=TRACK)
    pub.working("w")
    tracker.set("w", percent=50, desc="half", reserve_until=utc(time.time() * 1000 + 3_600_000))
    assert get("w")["state"] == "working"


def test_track_set_after_success_answers_ok_and_state_stays_success(pub, tracker, get):
    pub.enqueued("s", custom=TRACK)
    pub.working("s")
    pub.success("s")
    entry_id = tracker.set("s", percent=100, desc="done")
    assert re.fullmatch(r"\d+-\d+", entry_id)  # accepted: TRACK SET answers OK
    a = get("s")
    assert a["state"] == "success" and a["percent"] == 100 and a["desc"] == "done"


def test_track_set_on_a_never_enqueued_job_is_accepted_but_stays_unknown(tracker, get):
    tracker.set("ghost", percent=5, desc="x")
    assert get("ghost") == {"jid": "ghost", "state": "unknown", "updated_at": ""}


# ---------------------------------------------------------------- reservations

def _working(pub, tracker, projector, jid, reserve_for=600):
    pub.enqueued(jid, custom=TRACK)
    entry_id = pub.working(jid, reserve_for=reserve_for)
    projector.drain()
    return ms_of(entry_id)


def test_reserved_until_is_the_working_reservation(pub, tracker, projector):
    at = _working(pub, tracker, projector, "r", reserve_for=600)
    assert tracker.reserved_until("r") == utc(at + 600_000)


@pytest.mark.parametrize("reserve_for,seconds", [(None, 1800), (0, 1800), (1, 60), (59, 60),
                                                 (60, 60), (90_000, 86_400)])
def test_reserve_for_defaults_to_1800_and_is_clamped(pub, tracker, projector, reserve_for,
                                                     seconds):
    at = _working(pub, tracker, projector, "c", reserve_for=reserve_for)
    assert tracker.reserved_until("c") == utc(at + seconds * 1000)


def test_reserve_until_extends_but_never_makes_it_sooner(pub, tracker, projector):
    at = _working(pub, tracker, projector, "x", reserve_for=600)
    before = tracker.reserved_until("x")
    tracker.set("x", reserve_until=utc(at + 60_000))  # sooner: no effect
    projector.drain()
    assert tracker.reserved_until("x") == before
    later = (at // 1000 + 7200) * 1000
    tracker.set("x", reserve_until=rfc3339(later))  # RFC 3339 string, two hours on
    projector.drain()
    assert tracker.reserved_until("x") == utc(later)
    tracker.set("x", reserve_until=rfc3339(later - 3_600_000), percent=3)  # sooner again
    projector.drain()
    assert tracker.reserved_until("x") == utc(later)
    assert tracker.get("x")["percent"] == 3  # the rest of the TRACK SET still applies


def test_reserve_until_is_capped_at_one_day(pub, tracker, projector):
    _working(pub, tracker, projector, "cap", reserve_for=600)
    now = time.time() * 1000
    entry_id = tracker.set("cap", reserve_until=utc(now + DAY_MS + 30_000))
    projector.drain()
    assert tracker.reserved_until("cap") == utc(ms_of(entry_id) + DAY_MS)
    with pytest.raises(ValidationError) as e:
        tracker.set("cap", reserve_until=utc(now + 2 * DAY_MS))
    assert e.value.field == "reserve_until"


def test_a_long_reservation_keeps_the_snapshot_alive(pub, tracker, projector, deployment):
    at = _working(pub, tracker, projector, "long", reserve_for=600)
    entry_id = tracker.set("long", reserve_until=utc(at + 7_200_000))
    projector.drain()
    snap = read_snapshots(deployment)["long"]
    assert int(snap[b"x"]) == at + 7_200_000 + deployment.ttl_ms
    assert int(snap[b"u"]) == ms_of(entry_id)


def test_no_reservation_outside_working(pub, tracker, projector):
    assert tracker.reserved_until("none") is None
    pub.enqueued("q", custom=TRACK)
    tracker.set("q", reserve_until=utc(time.time() * 1000 + 3_600_000))  # not running: no effect
    projector.drain()
    assert tracker.reserved_until("q") is None
    pub.working("q")
    pub.success("q")
    projector.drain()
    assert tracker.reserved_until("q") is None
    pub.enqueued("f", custom=TRACK)
    pub.working("f")
    pub.failed("f")
    projector.drain()
    assert tracker.reserved_until("f") is None


# --------------------------------------------------------------- TRACK GET form

def test_unknown_form_is_exact(tracker, get, pub):
    assert tracker.get("1234567abcdef") == {"jid": "1234567abcdef", "state": "unknown",
                                            "updated_at": ""}
    pub.enqueued("plain")
    a = get("plain")
    assert a == {"jid": "plain", "state": "unknown", "updated_at": ""}
    assert list(a) == ["jid", "state", "updated_at"]


def test_key_order_of_the_track_get_object(pub, tracker, get):
    pub.enqueued("k", custom=TRACK)
    assert list(get("k")) == ["jid", "state", "updated_at"]
    tracker.set("k", desc="only desc")
    assert list(get("k")) == ["jid", "desc", "state", "updated_at"]
    tracker.set("k", percent=12)
    a = get("k")
    assert list(a) == ["jid", "percent", "desc", "state", "updated_at"]
    assert type(a["percent"]) is int and type(a["desc"]) is str


def test_updated_at_is_rfc3339_utc_of_the_last_change(pub, tracker, get):
    pub.enqueued("t", custom=TRACK)
    ids = [pub.working("t"), tracker.set("t", percent=1)]
    a = get("t")
    assert RFC3339_UTC.fullmatch(a["updated_at"])
    assert a["updated_at"] == rfc3339(ms_of(ids[-1]))
    last = pub.success("t")
    assert get("t")["updated_at"] == rfc3339(ms_of(last))


def test_percent_and_desc_appear_only_once_given(pub, tracker, get):
    pub.enqueued("p", custom=TRACK)
    pub.working("p")
    assert "percent" not in get("p") and "desc" not in get("p")
    tracker.set("p", percent=7)
    a = get("p")
    assert a["percent"] == 7 and "desc" not in a


@pytest.mark.parametrize("end", ["success", "failed", "dead"])
def test_percent_and_desc_keep_their_last_value_after_the_job_finishes(pub, tracker, get, end):
    pub.enqueued("f", custom=TRACK)
    pub.working("f")
    tracker.set("f", percent=10, desc="a")
    tracker.set("f", percent=90, desc="almost")
    getattr(pub, end)("f")
    a = get("f")
    assert (a["state"], a["percent"], a["desc"]) == (end, 90, "almost")


def test_get_many_keeps_order_across_partitions(pub, tracker, projector, deployment):
    jids = [f"job-{i}" for i in range(12)]
    assert len({deployment.partition(j) for j in jids}) > 1
    for i, j in enumerate(jids):
        pub.enqueued(j, custom=TRACK if i % 3 else None)
        if i % 2:
            pub.working(j)
    projector.drain()
    ask = list(reversed(jids)) + ["nope", jids[1], jids[1]]
    answers = tracker.get_many(ask)
    assert [a["jid"] for a in answers] == ask
    assert answers == [tracker.get(j) for j in ask]
    assert tracker.get_many([]) == []
    for i, j in enumerate(jids):
        want = "unknown" if i % 3 == 0 else ("working" if i % 2 else "enqueued")
        assert tracker.get(j)["state"] == want


class _Trips:
    """Counts writes to a Redis socket (each is one round trip): redis-py's, and the
    script-free reads' (tracker.store.direct writes to the socket itself)."""

    def __init__(self, monkeypatch):
        self.n = 0
        self.inside = False
        orig = AbstractConnection.send_packed_command  # TCP, unix socket and fakeredis alike
        orig_direct = direct._send

        def spy(conn, command, check_health=True):
            self.n += 0 if self.inside else 1
            return orig(conn, command, check_health)

        def spy_direct(*args):
            self.n += 1
            self.inside = True  # without hiredis or on fakeredis it sends through redis-py
            try:
                return orig_direct(*args)
            finally:
                self.inside = False

        monkeypatch.setattr(AbstractConnection, "send_packed_command", spy)
        monkeypatch.setattr(direct, "_send", spy_direct)


def test_get_of_one_jid_is_one_round_trip(pub, tracker, projector, monkeypatch):
    pub.enqueued("one", custom=TRACK)
    projector.drain()
    tracker.get("one")  # scripts loaded
    trips = _Trips(monkeypatch)
    assert tracker.get("one")["state"] == "enqueued"
    assert trips.n == 1


def test_get_many_is_one_round_trip(pub, tracker, projector, deployment, monkeypatch):
    """One write (on a cluster: one per master) for JIDs of every partition."""
    jids = [f"m{i}" for i in range(20)]
    assert len({deployment.partition(j) for j in jids}) == deployment.partitions
    for j in jids:
        pub.enqueued(j, custom=TRACK)
    projector.drain()
    tracker.get_many(jids)  # scripts loaded
    trips = _Trips(monkeypatch)
    assert [a["state"] for a in tracker.get_many(jids)] == ["enqueued"] * 20
    assert trips.n == round_trips(deployment, range(deployment.partitions))


def test_bulk_push_is_one_round_trip(pub, tracker, deployment, monkeypatch):
    """One write for a bulk PUSH (on a cluster: one per master its partitions live on)."""
    jids = [f"bulk{i}" for i in range(30)]
    pub.publish(*[events.make_working(j) for j in jids])  # connections made: count writes only
    trips = _Trips(monkeypatch)
    with pub.batch() as b:
        for jid in jids:
            b.enqueued(jid, custom=TRACK)
    assert trips.n == round_trips(deployment, {deployment.partition(j) for j in jids})
    assert len(b.ids) == 30
    assert total_xlen(deployment) == 60


# -------------------------------------------------------------------- retry flows

def test_retry_then_success(pub, tracker, get):
    seen = []
    pub.enqueued("retry", custom=TRACK, queue="default", jobtype="Report")
    seen.append(get("retry")["state"])
    pub.working("retry")
    tracker.set("retry", percent=30, desc="try 1")
    seen.append(get("retry")["state"])
    pub.failed("retry", errtype="IOError", message="disk")
    seen.append(get("retry")["state"])
    pub.enqueued("retry", custom=TRACK, queue="default", jobtype="Report")  # the retry
    a = get("retry")
    seen.append(a["state"])
    assert (a["percent"], a["desc"]) == (30, "try 1")  # kept across the re-enqueue
    assert tracker.reserved_until("retry") is None
    pub.working("retry")
    seen.append(get("retry")["state"])
    tracker.set("retry", percent=100, desc="try 2")
    pub.success("retry")
    a = get("retry")
    seen.append(a["state"])
    assert seen == ["enqueued", "working", "failed", "enqueued", "working", "success"]
    assert (a["percent"], a["desc"]) == (100, "try 2")


def test_retries_exhausted_go_dead(pub, tracker, get):
    pub.enqueued("d", custom=TRACK)
    for attempt in range(3):
        pub.working("d")
        tracker.set("d", percent=attempt * 10, desc=f"attempt {attempt}")
        assert get("d")["state"] == "working"
        pub.failed("d", errtype="E", message="m")
        assert get("d")["state"] == "failed"
        pub.enqueued("d", custom=TRACK)
        assert get("d")["state"] == "enqueued"
    pub.working("d")
    pub.dead("d", errtype="E", message="m" * 5000)  # message longer than Faktory keeps
    a = get("d")
    assert (a["state"], a["percent"], a["desc"]) == ("dead", 20, "attempt 2")


# ------------------------------------------------------------------------ expiry

@pytest.fixture
def short(backend):
    """A deployment with a one second TTL, and helpers on it."""
    d = backend(partitions=2, ttl=1)
    t, p, proj = Tracker(d), Publisher(d), Projector(d, consumer="short")
    return d, t, p, proj


def _sleep_until(ms: int) -> None:
    time.sleep(max(0.0, ms / 1000 - time.time()) + 0.05)


def test_job_enqueued_that_never_starts_expires_ttl_after_its_last_update(short):
    d, t, p, proj = short
    p.enqueued("backlog", custom=TRACK)
    last = t.set("backlog", desc="queued")
    proj.drain()
    assert t.get("backlog")["state"] == "enqueued"
    _sleep_until(ms_of(last) + d.ttl_ms - 400)
    assert t.get("backlog")["state"] == "enqueued"  # not before the TTL
    _sleep_until(ms_of(last) + d.ttl_ms)
    assert t.get("backlog") == {"jid": "backlog", "state": "unknown", "updated_at": ""}
    assert t.get_many(["backlog"]) == [{"jid": "backlog", "state": "unknown", "updated_at": ""}]
    # a late event meets nothing; a new tracked enqueued starts a fresh track
    p.working("backlog")
    t.set("backlog", percent=5)
    proj.drain()
    assert t.get("backlog")["state"] == "unknown"
    p.enqueued("backlog", custom=TRACK)
    proj.drain()
    a = t.get("backlog")
    assert a["state"] == "enqueued" and "percent" not in a and "desc" not in a


def test_a_long_reservation_keeps_a_track_alive_past_the_ttl(short):
    d, t, p, proj = short
    p.enqueued("slow", custom=TRACK)
    started = ms_of(p.working("slow", reserve_for=60))
    proj.drain()
    _sleep_until(started + d.ttl_ms + 200)
    assert t.get("slow")["state"] == "working"
    assert t.reserved_until("slow") == utc(started + 60_000)
    done = ms_of(p.success("slow"))  # the reservation ends: ttl after success
    proj.drain()
    assert t.get("slow")["state"] == "success"  # callers can still poll it
    _sleep_until(done + d.ttl_ms)
    assert t.get("slow")["state"] == "unknown"


def test_expiry_counts_from_the_last_update(short):
    d, t, p, proj = short
    p.enqueued("poll", custom=TRACK)
    p.working("poll", reserve_for=0)  # 1800 s reservation
    p.failed("poll")
    first = time.time()
    proj.drain()
    while time.time() - first < 1.2:  # each TRACK SET pushes expiry on
        last = t.set("poll", percent=int((time.time() - first) * 50))
        proj.drain()
        time.sleep(0.3)
        assert t.get("poll")["state"] == "failed"
    _sleep_until(ms_of(last) + d.ttl_ms)
    assert t.get("poll")["state"] == "unknown"
    assert t.reserved_until("poll") is None


# --------------------------------------------------------------------- bad input

BAD = [
    # (call, field)
    (lambda t, p: t.set("", percent=1), "jid"),
    (lambda t, p: t.set("has space", percent=1), "jid"),
    (lambda t, p: t.set("x" * 129, percent=1), "jid"),
    (lambda t, p: t.set(123, percent=1), "jid"),
    (lambda t, p: t.set(None, percent=1), "jid"),
    (lambda t, p: t.set("j", percent=150), "percent"),
    (lambda t, p: t.set("j", percent=-1), "percent"),
    (lambda t, p: t.set("j", percent="12"), "percent"),
    (lambda t, p: t.set("j", percent=12.5), "percent"),
    (lambda t, p: t.set("j", percent=True), "percent"),
    (lambda t, p: t.set("j", desc="x" * 1001), "desc"),
    (lambda t, p: t.set("j", desc="€" * 334), "desc"),
    (lambda t, p: t.set("j", desc=5), "desc"),
    (lambda t, p: t.set("j", desc="\ud800"), "desc"),
    (lambda t, p: t.set("j", reserve_until="tomorrow"), "reserve_until"),
    (lambda t, p: t.set("j", reserve_until="2030-13-45T00:00:00Z"), "reserve_until"),
    (lambda t, p: t.set("j", reserve_until="2030-01-01T00:00:00"), "reserve_until"),
    (lambda t, p: t.set("j", reserve_until=dt.datetime(2030, 1, 1)), "reserve_until"),
    (lambda t, p: t.set("j", reserve_until=1700000000), "reserve_until"),
    (lambda t, p: t.set("j", reserve_until=utc(time.time() * 1000 + 3 * DAY_MS)),
     "reserve_until"),
    (lambda t, p: t.set("j", reserve_until=utc(time.time() * 1000 - 3 * DAY_MS)),
     "reserve_until"),
    (lambda t, p: t.set_json('{"percent":5}'), "jid"),
    (lambda t, p: t.set_json('{"jid":"j","percent":150}'), "percent"),
    (lambda t, p: t.set_json('{"jid":"j","percent":"12"}'), "percent"),
    (lambda t, p: t.set_json('{"jid":"j","percent":12.5}'), "percent"),
    (lambda t, p: t.set_json('{"jid":"j","desc":"' + "x" * 1001 + '"}'), "desc"),
    (lambda t, p: t.set_json('{"jid":"j","reserve_until":"soon"}'), "reserve_until"),
    (lambda t, p: t.set_json('{"jid":"j","state":"success"}'), "state"),
    (lambda t, p: t.set_json('{"jid":"a b"}'), "jid"),
    (lambda t, p: t.set_json('{"jid":5}'), "jid"),
    (lambda t, p: t.set_json("not json"), "payload"),
    (lambda t, p: t.set_json(b'{"jid":"j","desc":"\xff"}'), "payload"),
    (lambda t, p: t.set_json('{"jid":"j","desc":"' + "x" * 20000 + '"}'), "payload"),
    (lambda t, p: p.enqueued("a b", custom=TRACK), "jid"),
    (lambda t, p: p.enqueued("j", custom="track"), "custom"),
    (lambda t, p: p.enqueued("j", custom=[1]), "custom"),
    (lambda t, p: p.enqueued("j", custom=TRACK, reserve_for=-5), "reserve_for"),
    (lambda t, p: p.enqueued("j", custom=TRACK, reserve_for="60"), "reserve_for"),
    (lambda t, p: p.enqueued("j", custom=TRACK, queue="q" * 201), "queue"),
    (lambda t, p: p.enqueued("j", custom=TRACK, queue="bad\nqueue"), "queue"),
    (lambda t, p: p.enqueued("j", custom=TRACK, jobtype=5), "jobtype"),
    (lambda t, p: p.working("j", reserve_for=1.5), "reserve_for"),
    (lambda t, p: p.working(""), "jid"),
    (lambda t, p: p.success("x" * 200), "jid"),
    (lambda t, p: p.failed("j", errtype=5), "errtype"),
    (lambda t, p: p.failed("j\n"), "jid"),
    (lambda t, p: p.dead("j", message=[1]), "message"),
    (lambda t, p: t.get("a b"), "jid"),
    (lambda t, p: t.get_many(["ok", ""]), "jid"),
    (lambda t, p: t.reserved_until(""), "jid"),
]


@pytest.mark.parametrize("call,field", BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_bad_input_names_the_field_and_appends_nothing(tracker, pub, deployment, call, field):
    with pytest.raises(ValidationError) as e:
        call(tracker, pub)
    err = e.value
    assert isinstance(err, TrackerError) and err.exit_code == 2
    assert err.field == field
    assert str(err).startswith(f"{field}: ") and "\n" not in str(err)
    assert len(str(err)) < 300
    assert total_xlen(deployment) == 0


def test_a_bad_event_in_a_batch_appends_nothing_of_the_batch(pub, deployment):
    with pytest.raises(ValidationError) as e:
        with pub.batch() as b:
            b.enqueued("fine", custom=TRACK)
            b.set("fine", percent=10)
            b.working("bad jid")
    assert e.value.field == "jid"
    assert total_xlen(deployment) == 0


def test_errtype_and_message_are_capped_like_faktory(pub, deployment):
    """FAIL is never refused for a long errtype/message: Faktory keeps 100 / 1000."""
    entry_id = pub.failed("cap", errtype="E" * 500, message="é" * 900)
    stream = keys.stream(deployment.prefix, deployment.partition("cap"))
    fields = deployment.client.xrange(stream, entry_id, entry_id)[0][1]
    assert fields[b"e"] == b"E" * 100
    assert len(fields[b"m"]) <= 1000 and fields[b"m"].decode() == "é" * 500
    assert isinstance(events.decode_entry(fields), events.Failed)


def test_stream_entries_are_compact_and_readable(pub, tracker, deployment):
    """One-letter fields, plain text values, the time in the entry ID only."""
    ids = [pub.enqueued("c", custom=TRACK, queue="q", jobtype="T", reserve_for=600),
           tracker.set("c", percent=5, desc="d", reserve_until=utc(time.time() * 1000 + 9e5))]
    stream = keys.stream(deployment.prefix, deployment.partition("c"))
    (_, f1), (_, f2) = deployment.client.xrange(stream)
    assert f1 == {b"t": b"enqueued", b"j": b"c", b"k": b"1", b"q": b"q", b"y": b"T",
                  b"r": b"600"}
    assert set(f2) == {b"t", b"j", b"p", b"d", b"u"} and f2[b"t"] == b"trackset"
    assert all(ms_of(i) > 0 for i in ids)


def test_partitions_and_ttl_are_fixed_by_the_first_process(real_redis_url, prefix):
    """Every process of a deployment folds alike: the count and the TTL are stored at
    first use, later processes inherit them, and contradicting them is an error."""


    def open_(**kw):
        return Deployment.open(Settings(redis_url=real_redis_url, prefix=prefix, **kw))

    first = open_(partitions=2, ttl=90)
    try:
        later = open_()  # no explicit values: the stored ones
        assert (later.partitions, later.ttl_ms) == (2, 90_000)
        later.close()
        for wrong in ({"partitions": 3}, {"ttl": 91}):
            with pytest.raises(ConfigError, match=next(iter(wrong))):
                open_(**wrong)
    finally:
        cleanup(first.client, prefix)
        first.close()
