"""Poison entries: fuzz the log, the projector never crashes, each lands in the DLQ.

Then DLQ management (tracker/dlq.py and ``tracker dlq``): list, retry after a fix,
purge. Runs on real Redis: the DLQ is written by project.lua, which fakeredis
cannot be trusted to run byte for byte.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import cleanup, missing, open_real, read_snapshots
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracker import dlq as dead
from tracker import events
from tracker.projector import Projector
from tracker.store import keys
from tracker.store.deployment import Deployment
from tracker.store.settings import Settings


@pytest.fixture
def d1(real_redis_url, prefix):
    """One partition, so every raw entry lands where the test reads."""
    yield from open_real(real_redis_url, prefix, 1)


def raw_xadd(d, fields, part=0) -> str:
    return d.client.xadd(keys.stream(d.prefix, part), fields).decode()


# ------------------------------------------------------------------- the fuzzer
VALID = [
    {"t": "enqueued", "j": "J1", "k": "1", "q": "default", "y": "Job", "r": "1800"},
    {"t": "working", "j": "J1", "r": "60"},
    {"t": "trackset", "j": "J1", "p": "12", "d": "Calculating", "u": "1700000000000"},
    {"t": "success", "j": "J1"},
    {"t": "failed", "j": "J1", "e": "IOError", "m": "disk full"},
    {"t": "dead", "j": "J1", "e": "IOError", "m": "disk full"},
]
nasty_values = st.one_of(
    st.sampled_from([b"", b"-1", b"01", b"1e3", b"12.5", b"true", b"NaN", b"101", b"2",
                     b"\xff\xfe", b"\xed\xa0\x80", b"\xc0\xaf", b"a b", b"a\nb", b"\x00",
                     b"99999999999999999", b"1000000000000001", b"x" * 129, b"x" * 1001,
                     b"d" * (1 << 20), b"enqueued", b"TRACKSET", b"id", b"reason"]),
    st.binary(max_size=40),
    st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")),
)
field_names = st.one_of(st.sampled_from([c.encode() for c in "tjkqyrpduem"] + [b"id", b"reason", b"x", b"T", b""]),
                        st.binary(min_size=1, max_size=8))


@st.composite
def mutated_entry(draw):
    base = dict(draw(st.sampled_from(VALID)))
    fields = {k.encode(): v.encode() for k, v in base.items()}
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["drop", "set", "add", "type"]))
        if op == "drop" and fields:
            fields.pop(draw(st.sampled_from(sorted(fields))))
        elif op == "set" and fields:
            fields[draw(st.sampled_from(sorted(fields)))] = draw(nasty_values)
        elif op == "add":
            fields[draw(field_names)] = draw(nasty_values)
        else:
            fields[b"t"] = draw(st.sampled_from([b"bogus", b"", b"Enqueued", b"\xff", b"track"]))
    if not fields:
        fields = {b"x": b"1"}  # XADD needs at least one field
    return fields


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(st.one_of(mutated_entry(), st.sampled_from(VALID)), min_size=1, max_size=6))
def test_fuzzed_entries_are_dead_lettered_with_their_reason(d1, batch):
    d1.client.delete(keys.dlq(d1.prefix, 0), keys.stream(d1.prefix, 0))
    ids = [raw_xadd(d1, f) for f in batch]
    expect_poison = {}
    for i, f in zip(ids, batch):
        try:
            events.decode_entry(f)
        except events.PoisonEntry as e:
            expect_poison[i] = e.reason
    Projector(d1, consumer="fuzz", batch=4).drain()  # raises if the script errors
    letters = {dl.original_id: dl for dl in dead.list_dead(d1)}
    assert set(letters) == set(expect_poison), "Lua and Python disagree on what is poison"
    for i, f in zip(ids, batch):
        if i in letters:
            dl = letters[i]
            # "field: problem" (the field may be an empty name) or "invalid UTF-8"
            assert dl.reason == "invalid UTF-8" or ": " in dl.reason
            assert dict(dl.fields) == f  # the original fields survive byte for byte
    pending = d1.client.xpending(keys.stream(d1.prefix, 0), keys.GROUP)["pending"]
    assert pending == 0


def test_projector_daemon_survives_a_poison_corpus(d1, real_redis_url):
    corpus = [{b"x": b"1"}, {b"t": b"bogus", b"j": b"a"}, {b"t": b"success"},
              {b"t": b"success", b"j": b"\xff"}, {b"t": b"trackset", b"j": b"a", b"p": b"-1"},
              {b"t": b"trackset", b"j": b"a", b"d": b"x" * (1 << 20)},
              {b"t": b"working", b"j": b"a", b"r": b"9" * 400},
              {b"id": b"0-1", b"reason": b"forged", b"t": b"success", b"j": b"a b"},
              {b"t": b"enqueued", b"j": b"a", b"k": b"true"}, {b"\xed\xa0\x80": b"1"}]
    env = {**os.environ, "TRACKER_REDIS_URL": real_redis_url, "TRACKER_PREFIX": d1.prefix}
    proc = subprocess.Popen(["tracker", "project", "--batch", "3"], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        for f in corpus:
            raw_xadd(d1, f)
        raw_xadd(d1, {"t": "enqueued", "j": "ok", "k": "1"})
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and d1.client.hget(keys.stats(d1.prefix, 0),
                                                             "applied") != b"1":
            assert proc.poll() is None, "the projector died"
            time.sleep(0.1)
        assert proc.poll() is None
        assert d1.client.xlen(keys.dlq(d1.prefix, 0)) == len(corpus)
        reasons = [dl.reason for dl in dead.list_dead(d1)]
        assert all(reasons) and len(reasons) == len(corpus)
        assert dead.list_dead(d1)[7].fields[0] == (b"id", b"0-1")  # forged id kept as data
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and b"Traceback" not in err


def test_atheris_decode_entry_raises_only_poison(tmp_path):
    if importlib.util.find_spec("atheris") is None:
        missing("atheris did not install on this machine")
    harness = tmp_path / "fuzz_decode.py"
    harness.write_text(textwrap.dedent("""
        import sys, atheris
        with atheris.instrument_imports():
            from tracker import events
        def one(data):
            fdp = atheris.FuzzedDataProvider(data)
            fields = {}
            for _ in range(fdp.ConsumeIntInRange(0, 8)):
                k = fdp.PickValueInList([b"t", b"j", b"k", b"q", b"y", b"r", b"p", b"d", b"u",
                                         b"e", b"m", fdp.ConsumeBytes(3)])
                fields[k] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
            if fdp.ConsumeBool():
                fields[b"t"] = fdp.PickValueInList([b"enqueued", b"working", b"trackset",
                                                    b"success", b"failed", b"dead"])
            try:
                events.decode_entry(fields)
            except events.PoisonEntry:
                pass
        atheris.Setup(sys.argv, one)
        atheris.Fuzz()
    """))
    r = subprocess.run([sys.executable, str(harness), "-runs=8000", "-seed=1"],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]


# ---------------------------------------------------------------- management
def _dead_letter(d, fields, reason="type: unknown event type", part=0) -> str:
    """A dead letter as project.lua writes it (as an older version might have)."""
    return d.client.execute_command("XADD", keys.dlq(d.prefix, part), "*", "id", "1-1",
                                    "reason", reason, *[x for kv in fields for x in kv]).decode()


def test_retry_reappends_fixed_entries_and_removes_them(d1):
    fixed = _dead_letter(d1, [(b"t", b"enqueued"), (b"j", b"J9"), (b"k", b"1")])
    still = _dead_letter(d1, [(b"t", b"bogus"), (b"j", b"J9")])
    res = dead.retry(d1)
    assert [r[0] for r in res.retried] == [f"0/{fixed}"]
    assert res.skipped == [(f"0/{still}", "type: unknown event type")]  # as `dlq list` says
    log = d1.client.xrange(keys.stream(d1.prefix, 0))
    assert [e[1] for e in log] == [{b"t": b"enqueued", b"j": b"J9", b"k": b"1"}]
    assert [dl.dlq_id for dl in dead.list_dead(d1)] == [still]
    Projector(d1, consumer="t").drain()
    assert read_snapshots(d1)["J9"][b"s"] == b"enqueued"
    # --force re-appends anyway; the projector refuses it again, with a fresh dead letter.
    res = dead.retry(d1, [still], force=True)
    assert len(res.retried) == 1
    Projector(d1, consumer="t").drain()
    (again,) = dead.list_dead(d1)
    assert again.dlq_id != still and again.reason == "type: unknown event type"
    assert again.fields == [(b"t", b"bogus"), (b"j", b"J9")]


def test_retry_keeps_fields_named_id_and_reason(d1):
    raw_xadd(d1, {"id": "x", "reason": "y", "t": "success", "j": "J1"})  # poison: unknown field
    Projector(d1, consumer="t").drain()
    (dl,) = dead.list_dead(d1)
    assert dl.reason == "id: unknown field" or dl.reason.endswith("unknown field")
    assert dl.fields == [(b"id", b"x"), (b"reason", b"y"), (b"t", b"success"), (b"j", b"J1")]


def test_list_filters_and_bad_arguments(real_redis_url, prefix):
    d = Deployment.open(Settings(redis_url=real_redis_url, prefix=prefix, partitions=3))
    try:
        a = _dead_letter(d, [(b"t", b"x")], part=0)
        b = _dead_letter(d, [(b"t", b"y")], part=2)
        assert [x.dlq_id for x in dead.list_dead(d, partition=2)] == [b]
        if a == b:  # dead-letter IDs are per partition: a bare ID can be ambiguous
            with pytest.raises(events.ValidationError, match="P/"):
                dead.retry(d, [a])
        assert [x.ref for x in dead.list_dead(d, ids=[f"0/{a}"])] == [f"0/{a}"]
        assert dead.retry(d, ["99-0"]).missing == ["99-0"]
        with pytest.raises(events.ValidationError, match="partition"):
            dead.list_dead(d, partition=3)
        with pytest.raises(events.ValidationError, match="id"):
            dead.retry(d, ["not-an-id"])
        assert dead.purge(d, partition=0) == 1
        assert dead.count(d) == 1
    finally:
        cleanup(d.client, prefix)
        d.close()


def _cli(real_redis_url, prefix, *args, stdin=subprocess.DEVNULL):
    env = {**os.environ, "TRACKER_REDIS_URL": real_redis_url, "TRACKER_PREFIX": prefix}
    return subprocess.run(["tracker", *args], env=env, capture_output=True, stdin=stdin,
                          timeout=30)


def test_cli_list_retry_purge(d1, real_redis_url):
    raw_xadd(d1, {"t": "trackset", "j": "J1", "d": b"\xff"})
    fixed = _dead_letter(d1, [(b"t", b"success"), (b"j", b"J1")], reason="old: reason")
    r = _cli(real_redis_url, d1.prefix, "project", "--once")
    assert r.returncode == 0
    r = _cli(real_redis_url, d1.prefix, "dlq", "list", "--json")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.returncode == 0 and [x["reason"] for x in rows] == ["old: reason", "invalid UTF-8"]
    assert rows[1]["fields"][2] == ["d", "\\xff"]
    r = _cli(real_redis_url, d1.prefix, "dlq", "list")
    assert r.returncode == 0 and b"invalid UTF-8" in r.stdout and b"2 dead letters" in r.stderr
    r = _cli(real_redis_url, d1.prefix, "dlq", "retry", fixed)
    assert r.returncode == 0 and r.stdout.startswith(f"retried 0/{fixed} as ".encode())
    r = _cli(real_redis_url, d1.prefix, "dlq", "retry")  # the UTF-8 one is still refused
    assert r.returncode == 1 and b"still refused (invalid UTF-8)" in r.stderr
    r = _cli(real_redis_url, d1.prefix, "dlq", "purge")  # no tty, no --yes: refuse
    assert r.returncode == 2 and b"--yes" in r.stderr and dead.count(d1) == 1
    r = _cli(real_redis_url, d1.prefix, "dlq", "purge", "--yes")
    assert r.returncode == 0 and b"purged 1" in r.stdout and dead.count(d1) == 0
    assert all(b"Traceback" not in x for x in (r.stdout, r.stderr))


def test_two_retries_of_one_dead_letter_append_it_once(d1, monkeypatch):
    """Two operators retrying at once: both list the letter, only one re-appends it."""
    _dead_letter(d1, [(b"t", b"enqueued"), (b"j", b"J7"), (b"k", b"1")])
    stale = dead.list_dead(d1)
    monkeypatch.setattr(dead, "list_dead", lambda *a, **k: list(stale))
    first, second = dead.retry(d1), dead.retry(d1)
    assert len(first.retried) == 1 and second.retried == []
    assert second.missing == [stale[0].ref]
    assert d1.client.xlen(keys.stream(d1.prefix, 0)) == 1


# ------------------------------------------------ wording (issue 10)
def test_list_and_retry_word_each_reason_alike(d1, real_redis_url):
    poison = [{"t": "bogus", "j": "J1"}, {"t": "trackset", "j": "J1", "p": "101"},
              {"t": "trackset", "j": "J1", "p": "abc"}, {"t": "working", "j": "J1", "r": "-5"},
              {"t": "enqueued", "j": "J1", "k": "7"}, {"t": "success", "j": "J1", "x": "1"},
              {"t": "failed"}, {"t": "trackset", "j": "J1", "d": b"\xff"}]
    for f in poison:
        raw_xadd(d1, f)
    Projector(d1, consumer="t").drain()
    r = _cli(real_redis_url, d1.prefix, "dlq", "list", "--json")
    listed = {row["ref"]: row["reason"] for row in map(json.loads, r.stdout.splitlines())}
    assert r.returncode == 0 and len(listed) == len(poison)
    r = _cli(real_redis_url, d1.prefix, "dlq", "retry")
    assert r.returncode == 1
    said = dict(re.findall(r"skipped (\S+): still refused \((.*)\)", r.stderr.decode()))
    assert said == listed, "dlq list and dlq retry word a reason differently"
    # fields by their long names, as every other error names them
    assert "percent: not a non-negative integer" in listed.values()
    assert "reserve_for: not a non-negative integer" in listed.values()
    assert not any(reason.startswith('"') for reason in listed.values()), listed


def test_retry_of_a_partition_that_does_not_exist_says_so(real_redis_url, prefix):
    d = Deployment.open(Settings(redis_url=real_redis_url, prefix=prefix, partitions=4))
    try:
        with pytest.raises(events.ValidationError, match=r"partition 9 does not exist.*0\.\.3"):
            dead.retry(d, ["9/123-0"])
        with pytest.raises(events.ValidationError, match="expected a dead letter ID"):
            dead.retry(d, ["x/123-0"])
        r = _cli(real_redis_url, prefix, "dlq", "retry", "9/123-0")
        err = r.stderr.decode().strip()
        assert r.returncode == 2 and len(err.splitlines()) == 1, err
        assert "partition 9 does not exist" in err and "ID like" not in err
        assert dead.retry(d, ["3/123-0"]).missing == ["3/123-0"]  # exists, just not found
    finally:
        cleanup(d.client, prefix)
        d.close()


def test_purge_without_a_terminal_says_to_pass_yes(d1, real_redis_url):
    _dead_letter(d1, [(b"t", b"x")])
    r = _cli(real_redis_url, d1.prefix, "dlq", "purge")  # stdin is not a terminal
    err = r.stderr.decode().strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("tracker: error: ") and "pass --yes" in err and "1 dead letters" in err
    assert "yes:" not in err and dead.count(d1) == 1
