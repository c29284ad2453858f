"""The Lua fold (live projector) against the Python fold, on random raw logs.

Entries are written with XADD as raw bytes, bypassing every Python check, with
explicit entry IDs so that the events' times (and so logical expiry, with a one
second TTL) are under the test's control. Both sides must agree on which
entries are poison (the Lua side dead-letters them) and on every snapshot.
"""

from __future__ import annotations

import time
import uuid

import pytest
from helpers import open_deployment, read_log, read_snapshots, track_fields, wipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import projections
from tracker import dlq, events
from tracker.projector import Projector
from tracker.store import keys
from tracker.store.deployment import Deployment

JIDS = [b"job-a", b"job-b", b"J" * 128, b"c!~"]
TTL = 1  # seconds: entry IDs are spread over several TTLs, so expiry happens in the fold


# ------------------------------------------------------------- entry strategies

def _ints(valid_max: int):
    return st.one_of(
        st.integers(0, valid_max).map(lambda n: str(n).encode()),
        st.sampled_from([b"0", b"1000000000000000", b"1000000000000001", b"99999999999999999",
                         b"100000000000000000000", b"007", b"-1", b"+1", b" 1", b"1.0", b"",
                         b"1e3", b"0x10", "١٢".encode()]),
    )


def _text(limit: int):
    return st.one_of(
        st.text(max_size=12).map(lambda s: s.encode("utf-8")),
        st.sampled_from([b"", b"x" * limit, b"x" * (limit + 1), "é".encode() * (limit // 2),
                         "é".encode() * (limit // 2) + b"x", b"nul\x00byte"]),
    )


def _opt(name: bytes, values):
    return st.one_of(st.none(), values.map(lambda v: (name, v)))


@st.composite
def valid_fields(draw, base_ms: int):
    """A mostly-valid entry as a list of (field, value) byte pairs."""
    t = draw(st.sampled_from([b"enqueued", b"enqueued", b"working", b"trackset", b"trackset",
                              b"trackset", b"success", b"failed", b"dead"]))
    pairs = [(b"t", t), (b"j", draw(st.sampled_from(JIDS)))]
    if t == b"enqueued":
        extra = [_opt(b"k", st.sampled_from([b"1", b"1", b"1", b"0"])),
                 _opt(b"q", _text(200)), _opt(b"y", _text(200)),
                 _opt(b"r", st.sampled_from([b"0", b"60", b"1800", b"90000"]))]
    elif t == b"working":
        extra = [_opt(b"r", st.sampled_from([b"0", b"1", b"2", b"60", b"100", b"86400",
                                             b"999999"]))]
    elif t == b"trackset":
        until = st.integers(-5_000, 2 * 86_400_000).map(lambda d: str(base_ms + d).encode())
        extra = [_opt(b"p", st.integers(0, 100).map(lambda n: str(n).encode())),
                 _opt(b"d", _text(1000)), _opt(b"u", until)]
    elif t == b"success":
        extra = []
    else:
        extra = [_opt(b"e", _text(100)), _opt(b"m", _text(1000))]
    for s in extra:
        pair = draw(s)
        if pair is not None:
            pairs.append(pair)
    return draw(st.permutations(pairs))


BAD_UTF8 = [b"\xff", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
            b"\xe2\x82", b"\x80", b"\xf8\x88\x80\x80\x80", b"ok\xfe"]


@st.composite
def poison(draw, pairs):
    """Mutate an entry: most mutations make it poison, a few keep it valid."""
    pairs = list(pairs)
    kind = draw(st.sampled_from(["junk_field", "type", "utf8_value", "utf8_key", "int", "percent",
                                 "jid", "desc", "repeat", "drop", "k"]))
    i = draw(st.integers(0, len(pairs) - 1))
    if kind == "junk_field":
        name = draw(st.binary(min_size=0, max_size=3))
        pairs.insert(i, (name, draw(st.binary(max_size=5))))
    elif kind == "type":
        pairs = [(k, v) for k, v in pairs if k != b"t"]
        pairs.insert(i, (b"t", draw(st.one_of(
            st.sampled_from([b"Enqueued", b"TRACKSET", b"track_set", b"", b"event", b"_failure",
                             b"success "]), st.binary(max_size=8)))))
    elif kind == "utf8_value":
        k, v = pairs[i]
        pairs[i] = (k, v + draw(st.sampled_from(BAD_UTF8)))
    elif kind == "utf8_key":
        pairs.insert(i, (draw(st.sampled_from(BAD_UTF8)), b"v"))
    elif kind == "int":
        pairs.insert(i, (draw(st.sampled_from([b"r", b"p", b"u"])), draw(_ints(10**15))))
    elif kind == "percent":
        pairs.append((b"p", draw(st.sampled_from([b"100", b"101", b"150", b"1000"]))))
    elif kind == "jid":
        pairs = [(k, v) for k, v in pairs if k != b"j"]
        pairs.insert(i, (b"j", draw(st.sampled_from(
            [b"has space", b"", b"J" * 129, b"J" * 128, "jé".encode(), b"tab\tjid", b"nl\n",
             b"\x00", b"del\x7f"]))))
    elif kind == "desc":
        pairs.append((b"d", draw(st.sampled_from(
            [b"d" * 1000, b"d" * 1001, "€".encode() * 333 + b"x", "€".encode() * 334]))))
    elif kind == "repeat":
        k, v = pairs[i]
        other = draw(st.one_of(st.just(v), st.binary(max_size=4), st.sampled_from(BAD_UTF8)))
        first, last = draw(st.permutations([v, other]))
        pairs[i] = (k, first)
        pairs.append((k, last))
    elif kind == "drop":
        pairs.pop(i)
    elif kind == "k":
        pairs.append((b"k", draw(st.sampled_from([b"0", b"1", b"2", b"true", b"", b"01"]))))
    return pairs


@st.composite
def raw_logs(draw, base_ms: int, max_size: int = 40):
    """(gap ms, fields) entries; a gap of 0 puts two entries in one millisecond."""
    n = draw(st.integers(1, max_size))
    out = []
    for _ in range(n):
        pairs = draw(valid_fields(base_ms))
        if draw(st.integers(0, 3)) == 0:
            pairs = draw(poison(pairs))
        gap = draw(st.sampled_from([0, 0, 1, 100, 400, 900, 999, 1000, 1001, 1500, 2500]))
        out.append((gap, pairs))
    return out


# ------------------------------------------------------------------ the harness

def _open(kind: str, real_redis_url: str, prefix: str) -> Deployment:
    return open_deployment(kind, real_redis_url, prefix, partitions=1, ttl=TTL)


def write_log(d: Deployment, log, base_ms: int) -> list[str]:
    """XADD each entry (raw bytes, explicit IDs) to partition 0; return the IDs."""
    stream = keys.stream(d.prefix, 0)
    ms, seq, ids = base_ms, 0, []
    pipe = d.client.pipeline(transaction=False)
    for gap, pairs in log:
        if gap:
            ms, seq = ms + gap, 0
        else:
            seq += 1
        entry_id = f"{ms}-{seq}"
        ids.append(entry_id)
        flat = [x for pair in pairs for x in pair]
        if not flat:
            flat = [b"t", b""]  # XADD needs at least one field
        pipe.execute_command("XADD", stream, entry_id, *flat)
    pipe.execute()
    return ids


def python_side(d: Deployment):
    """Read the log back (XRANGE) and fold it with the Python twin."""
    entries, poisoned = read_log(d)
    return projections.fold(entries, d.ttl_ms), poisoned


def lua_side(d: Deployment, batch: int):
    Projector(d, consumer="diff", batch=batch).drain()
    # The dead letters as tracker.dlq reads them: raw, so original fields named
    # "id" or "reason" do not shadow the ones project.lua writes first.
    dead = {letter.original_id: letter for letter in dlq.list_dead(d, 0)}
    return read_snapshots(d, 0), dead


def check(kind, real_redis_url, log, batch):
    prefix = "tdiff" + uuid.uuid4().hex[:10]
    d = _open(kind, real_redis_url, prefix)
    try:
        base = int(time.time() * 1000)
        ids = write_log(d, log, base)
        tracks, py_poison = python_side(d)
        snaps, lua_dead = lua_side(d, batch)
        assert set(lua_dead) == py_poison, "the two folds disagree on which entries are poison"
        for entry_id, letter in lua_dead.items():
            assert letter.reason, "a dead letter carries its reason"
            original = d.client.xrange(keys.stream(d.prefix, 0), entry_id, entry_id)[0][1]
            assert dict(letter.fields) == original
        assert snaps == {jid: track_fields(t) for jid, t in tracks.items()}
        # everything is acknowledged, nothing pending
        assert d.client.xpending(keys.stream(d.prefix, 0), keys.GROUP)["pending"] == 0
        stats = d.client.hgetall(keys.stats(d.prefix, 0))
        assert int(stats.get(b"applied", 0)) == len(ids) - len(py_poison)
        assert int(stats.get(b"dead_lettered", 0)) == len(py_poison)
    finally:
        wipe(d)
        d.close()


@pytest.fixture(params=["fake", "real"])
def kind(request):
    return request.param


BASE = int(time.time() * 1000)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(log=raw_logs(BASE), batch=st.sampled_from([1, 2, 3, 7, 500]))
def test_lua_fold_equals_python_fold(kind, real_redis_url, log, batch):
    check(kind, real_redis_url, log, batch)


# Hand-picked entries, each checked on its own so a failure names the case.
CASES = {
    "valid enqueued": [(b"t", b"enqueued"), (b"j", b"x"), (b"k", b"1")],
    "overlong utf8 desc": [(b"t", b"trackset"), (b"j", b"x"), (b"d", b"\xc0\xaf")],
    "surrogate utf8 desc": [(b"t", b"trackset"), (b"j", b"x"), (b"d", b"\xed\xa0\x80")],
    "beyond U+10FFFF": [(b"t", b"trackset"), (b"j", b"x"), (b"d", b"\xf4\x90\x80\x80")],
    "max code point ok": [(b"t", b"trackset"), (b"j", b"x"), (b"d", b"\xf4\x8f\xbf\xbf")],
    "huge int": [(b"t", b"working"), (b"j", b"x"), (b"r", b"1" + b"0" * 30)],
    "max int ok": [(b"t", b"working"), (b"j", b"x"), (b"r", b"1" + b"0" * 15)],
    "max int + 1": [(b"t", b"working"), (b"j", b"x"), (b"r", b"1" + b"0" * 14 + b"1")],
    "leading zero": [(b"t", b"trackset"), (b"j", b"x"), (b"p", b"07")],
    "percent 101": [(b"t", b"trackset"), (b"j", b"x"), (b"p", b"101")],
    "jid with space": [(b"t", b"success"), (b"j", b"a b")],
    "jid 129 bytes": [(b"t", b"success"), (b"j", b"a" * 129)],
    "desc 1001 bytes": [(b"t", b"trackset"), (b"j", b"x"), (b"d", b"d" * 1001)],
    "repeated field, last wins": [(b"t", b"trackset"), (b"j", b"x"), (b"p", b"500"),
                                  (b"p", b"5")],
    "repeated field, bad last": [(b"t", b"trackset"), (b"j", b"x"), (b"p", b"5"),
                                 (b"p", b"500")],
    "unknown type": [(b"t", b"explode"), (b"j", b"x")],
    "no type": [(b"j", b"x")],
    "field of another type": [(b"t", b"success"), (b"j", b"x"), (b"p", b"5")],
    "k not 0/1": [(b"t", b"enqueued"), (b"j", b"x"), (b"k", b"true")],
    "errtype 101 bytes": [(b"t", b"failed"), (b"j", b"x"), (b"e", b"e" * 101)],
}
EXPECT_POISON = {"overlong utf8 desc", "surrogate utf8 desc", "beyond U+10FFFF", "huge int",
                 "max int + 1", "leading zero", "percent 101", "jid with space", "jid 129 bytes",
                 "desc 1001 bytes", "repeated field, bad last", "unknown type", "no type",
                 "field of another type", "k not 0/1", "errtype 101 bytes"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_poison_cases(kind, real_redis_url, case):
    """Each case follows a tracked enqueued of the same JID, so a valid one changes it."""
    log = [(0, [(b"t", b"enqueued"), (b"j", b"x"), (b"k", b"1")]), (5, CASES[case])]
    check(kind, real_redis_url, log, batch=500)
    # and the Python side alone says what the contract's rules say
    fields = {}
    for k, v in CASES[case]:
        fields[k] = v
    if case in EXPECT_POISON:
        with pytest.raises(events.PoisonEntry):
            events.decode_entry(fields)
    else:
        events.decode_entry(fields)


def test_poison_never_stops_the_projector(kind, real_redis_url):
    """A batch of nothing but junk is dead-lettered and acknowledged; the next entry folds."""
    junk = [(1, [(b"\xff", b"\xfe")]), (1, [(b"t", b"working"), (b"j", b"x"), (b"r", b"-")]),
            (1, [(b"zz", b"")]), (1, [(b"t", b"enqueued"), (b"j", b"ok"), (b"k", b"1")])]
    check(kind, real_redis_url, junk, batch=2)
