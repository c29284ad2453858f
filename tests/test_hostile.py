"""Hostile input, table-driven: every bad input gets one clear line naming the field.

Two interfaces: the CLI (``tracker set/emit/get`` as a subprocess, exit code 2, no
traceback) and the Python API (``Tracker.set``, ``set_json``, ``Publisher.*``:
``ValidationError`` whose ``field`` is the culprit). After each, NOTHING was
appended: the XLEN of every partition (and dead-letter stream) is unchanged.
The Faktory endpoint has its own table in the server's tests.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import cleanup

from tracker.errors import ValidationError
from tracker.query import Tracker
from tracker.store import keys
from tracker.store.deployment import Deployment
from tracker.store.settings import Settings

NOW = dt.datetime.now(dt.UTC)
IN_2_DAYS = (NOW + dt.timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
ARG_MAX_SAFE = 130_000  # one argv string is capped at 128 KiB by Linux (MAX_ARG_STRLEN)

# (id, argv after `tracker`, the word the error must name)
CLI_CASES = [
    ("set-jid-empty", ["set", ""], "jid"),
    ("set-jid-10kB", ["set", "x" * 10_000], "jid"),
    ("set-jid-129", ["set", "x" * 129], "jid"),
    ("set-jid-space", ["set", "a b"], "jid"),
    ("set-jid-newline", ["set", "a\nb"], "jid"),
    ("set-jid-cr", ["set", "a\rb"], "jid"),
    ("set-jid-tab", ["set", "a\tb"], "jid"),
    ("set-jid-ctrl", ["set", "a\x01b"], "jid"),
    ("set-jid-esc", ["set", "\x1b[31mred"], "jid"),
    ("set-jid-del", ["set", "a\x7f"], "jid"),
    ("set-jid-raw-bytes", [b"set", b"\xff\xfe"], "jid"),
    ("set-jid-unicode", ["set", "j\u00fcrgen"], "jid"),
    ("set-jid-missing", ["set"], "jid"),
    ("set-percent--1", ["set", "J", "--percent", "-1"], "percent"),
    ("set-percent-101", ["set", "J", "--percent", "101"], "percent"),
    ("set-percent-12.5", ["set", "J", "--percent", "12.5"], "percent"),
    ("set-percent-true", ["set", "J", "--percent", "true"], "percent"),
    ("set-percent-1e309", ["set", "J", "--percent", "1e309"], "percent"),
    ("set-percent-NaN", ["set", "J", "--percent", "NaN"], "percent"),
    ("set-percent-empty", ["set", "J", "--percent", ""], "percent"),
    ("set-percent-hex", ["set", "J", "--percent", "0x10"], "percent"),
    ("set-percent-huge", ["set", "J", "--percent", "9" * 30], "percent"),
    ("set-percent-novalue", ["set", "J", "--percent"], "percent"),
    ("set-desc-130kB", ["set", "J", "--desc", "d" * ARG_MAX_SAFE], "desc"),
    ("set-desc-1001B", ["set", "J", "--desc", "d" * 1001], "desc"),
    ("set-desc-1002B-euro", ["set", "J", "--desc", "\u20ac" * 334], "desc"),
    ("set-desc-raw-ff", [b"set", b"J", b"--desc", b"caf\xe9 \xff"], "desc"),
    ("set-desc-raw-surrogate", [b"set", b"J", b"--desc", b"\xed\xa0\x80"], "desc"),
    ("set-desc-raw-overlong", [b"set", b"J", b"--desc", b"\xc0\xaf"], "desc"),
    ("set-until-word", ["set", "J", "--reserve-until", "tomorrow"], "reserve_until"),
    ("set-until-no-tz", ["set", "J", "--reserve-until", "2020-08-01T11:43:20"], "reserve_until"),
    ("set-until-far-past", ["set", "J", "--reserve-until", "1970-01-01T00:00:00Z"],
     "reserve_until"),
    ("set-until-2-days", ["set", "J", "--reserve-until", IN_2_DAYS], "reserve_until"),
    ("set-until-month-13", ["set", "J", "--reserve-until", "2030-13-01T00:00:00Z"],
     "reserve_until"),
    ("set-until-feb-30", ["set", "J", "--reserve-until", "2030-02-30T00:00:00Z"],
     "reserve_until"),
    ("set-until-empty", ["set", "J", "--reserve-until", ""], "reserve_until"),
    ("set-until-epoch", ["set", "J", "--reserve-until", "1700000000"], "reserve_until"),
    ("set-unknown-option", ["set", "J", "--colour", "red"], "colour"),
    ("set-extra-argument", ["set", "J", "extra"], "extra"),
    ("emit-enq-jid-empty", ["emit", "enqueued", "", "--track"], "jid"),
    ("emit-enq-jid-10kB", ["emit", "enqueued", "x" * 10_000, "--track"], "jid"),
    ("emit-enq-custom-bad", ["emit", "enqueued", "J", "--custom", "{bad"], "custom"),
    ("emit-enq-custom-list", ["emit", "enqueued", "J", "--custom", "[1]"], "custom"),
    ("emit-enq-custom-deep", ["emit", "enqueued", "J", "--custom",
                              '{"a":' + "[" * 50_000 + "]" * 50_000 + "}"], "custom"),
    ("emit-enq-reserve-neg", ["emit", "enqueued", "J", "--reserve-for", "-5"], "reserve_for"),
    ("emit-enq-reserve-word", ["emit", "enqueued", "J", "--reserve-for", "abc"], "reserve-for"),
    ("emit-enq-queue-newline", ["emit", "enqueued", "J", "--queue", "a\nb"], "queue"),
    ("emit-enq-queue-201B", ["emit", "enqueued", "J", "--queue", "q" * 201], "queue"),
    ("emit-enq-jobtype-ctrl", ["emit", "enqueued", "J", "--jobtype", "\x01"], "jobtype"),
    ("emit-working-jid-space", ["emit", "working", "a b"], "jid"),
    ("emit-working-reserve-1.5", ["emit", "working", "J", "--reserve-for", "1.5"], "reserve-for"),
    ("emit-success-jid-129", ["emit", "success", "x" * 129], "jid"),
    ("emit-failed-jid-empty", ["emit", "failed", "", "--errtype", "E"], "jid"),
    ("emit-dead-jid-cr", ["emit", "dead", "a\rb"], "jid"),
    ("emit-unknown-event", ["emit", "bogus", "J"], "bogus"),
    ("get-jid-empty", ["get", ""], "jid"),
    ("get-jid-space", ["get", "a b"], "jid"),
    ("get-jid-10kB", ["get", "x" * 10_000], "jid"),
    ("get-second-jid-bad", ["get", "ok", "a\nb"], "jid"),
    ("get-missing", ["get"], "jid"),
]


@pytest.fixture(scope="module")
def hostile_deployment(real_redis_url):
    prefix = "thostile" + os.urandom(4).hex()
    d = Deployment.open(Settings(redis_url=real_redis_url, prefix=prefix, partitions=4))
    t = Tracker(d)
    t.publisher.enqueued("J", custom={"track": 1})  # a real job, so "J" is not a weak case
    yield d
    cleanup(d.client, prefix)
    d.close()


def lengths(d: Deployment) -> list[int]:
    pipe = d.client.pipeline(transaction=False)
    for p in range(d.partitions):
        pipe.xlen(keys.stream(d.prefix, p))
        pipe.xlen(keys.dlq(d.prefix, p))
    return pipe.execute()


@pytest.fixture(scope="module")
def cli_results(hostile_deployment, real_redis_url):
    """All CLI cases, three at a time (each is a process start), with the log lengths."""
    env = {**os.environ, "TRACKER_REDIS_URL": real_redis_url,
           "TRACKER_PREFIX": hostile_deployment.prefix}
    env.pop("TRACKER_PARTITIONS", None)

    def run(case):
        return subprocess.run(["tracker", *case[1]], env=env, capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=60)

    before = lengths(hostile_deployment)
    with ThreadPoolExecutor(3) as pool:
        results = dict(zip((_values(c)[0] for c in CLI_CASES),
                           pool.map(lambda c: run(_values(c)), CLI_CASES)))
    return results, before, lengths(hostile_deployment)


def test_cli_table_is_big_enough():
    assert len(CLI_CASES) >= 40


def test_cli_appends_nothing(cli_results):
    _, before, after = cli_results
    assert before == after


def _values(case):
    return case.values if hasattr(case, "values") else case


@pytest.mark.parametrize("name,argv,field", CLI_CASES, ids=[_values(c)[0] for c in CLI_CASES])
def test_cli_rejects(cli_results, name, argv, field):
    r = cli_results[0][name]
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2, err
    assert r.stdout == b""
    assert "Traceback" not in err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err[:500]
    assert lines[0].startswith("tracker: error: ")
    assert field.lower() in lines[0].lower(), lines[0]
    assert len(lines[0]) < 300, lines[0][:500]


# ------------------------------------------------------------------- Python API
def _set(**kw):
    return lambda t: t.set(**{"jid": "J", **kw})


def _json(payload):
    return lambda t: t.set_json(payload)


def _pub(method, *args, **kw):
    return lambda t: getattr(t.publisher, method)(*args, **kw)


def _batch_with_one_bad(t):
    with t.publisher.batch() as b:
        b.success("J")
        b.set("J", percent=50)
        b.success("")  # raises: the good ones above must not be appended either


_deep = '{"jid":"J","desc":' + "[" * 5000 + "]" * 5000 + "}"
API_CASES = [
    # Tracker.set: the JID
    ("set-jid-empty", _set(jid=""), "jid"),
    ("set-jid-10kB", _set(jid="x" * 10_000), "jid"),
    ("set-jid-space", _set(jid="a b"), "jid"),
    ("set-jid-newline", _set(jid="a\nb"), "jid"),
    ("set-jid-nul", _set(jid="a\x00b"), "jid"),
    ("set-jid-esc", _set(jid="\x1b[2J"), "jid"),
    ("set-jid-unicode", _set(jid="j\u00fcrgen"), "jid"),
    ("set-jid-surrogate", _set(jid="a\ud800"), "jid"),
    ("set-jid-none", _set(jid=None), "jid"),
    ("set-jid-int", _set(jid=123), "jid"),
    ("set-jid-bytes", _set(jid=b"abc"), "jid"),
    # percent
    ("set-percent--1", _set(percent=-1), "percent"),
    ("set-percent-101", _set(percent=101), "percent"),
    ("set-percent-12.5", _set(percent=12.5), "percent"),
    ("set-percent-'12'", _set(percent="12"), "percent"),
    ("set-percent-True", _set(percent=True), "percent"),
    ("set-percent-1e309", _set(percent=1e309), "percent"),
    ("set-percent-nan", _set(percent=float("nan")), "percent"),
    ("set-percent-huge", _set(percent=10**30), "percent"),
    ("set-percent-list", _set(percent=[50]), "percent"),
    # desc
    ("set-desc-1MB", _set(desc="d" * (1 << 20)), "desc"),
    ("set-desc-1001B", _set(desc="d" * 1001), "desc"),
    ("set-desc-surrogate", _set(desc="bad \ud800 text"), "desc"),
    ("set-desc-surrogateescape", _set(desc=b"caf\xe9".decode("utf-8", "surrogateescape")),
     "desc"),
    ("set-desc-bytes", _set(desc=b"text"), "desc"),
    ("set-desc-int", _set(desc=5), "desc"),
    # reserve_until
    ("set-until-word", _set(reserve_until="tomorrow"), "reserve_until"),
    ("set-until-no-tz", _set(reserve_until="2020-08-01T11:43:20"), "reserve_until"),
    ("set-until-naive-datetime", _set(reserve_until=dt.datetime.now()), "reserve_until"),
    ("set-until-far-past", _set(reserve_until="1970-01-01T00:00:00Z"), "reserve_until"),
    ("set-until-2-days", _set(reserve_until=IN_2_DAYS), "reserve_until"),
    ("set-until-year-9999", _set(reserve_until="9999-12-31T23:59:59Z"), "reserve_until"),
    ("set-until-feb-30", _set(reserve_until="2030-02-30T00:00:00Z"), "reserve_until"),
    ("set-until-epoch-int", _set(reserve_until=1700000000), "reserve_until"),
    ("set-until-empty", _set(reserve_until=""), "reserve_until"),
    ("set-until-10kB", _set(reserve_until="2" * 10_000), "reserve_until"),
    ("set-unknown-kwarg", _set(colour="red"), "colour"),
    # set_json: Faktory's payload
    ("json-unknown-field", _json('{"jid":"J","colour":"red"}'), "colour"),
    ("json-missing-jid", _json('{"percent":5}'), "jid"),
    ("json-jid-null", _json('{"jid":null}'), "jid"),
    ("json-jid-int", _json('{"jid":123}'), "jid"),
    ("json-jid-space", _json('{"jid":"a b"}'), "jid"),
    ("json-dup-jid", _json('{"jid":"J","jid":"a b"}'), "jid"),
    ("json-percent-'12'", _json('{"jid":"J","percent":"12"}'), "percent"),
    ("json-percent-true", _json('{"jid":"J","percent":true}'), "percent"),
    ("json-percent-12.5", _json('{"jid":"J","percent":12.5}'), "percent"),
    ("json-percent-1e309", _json('{"jid":"J","percent":1e309}'), "percent"),
    ("json-percent-NaN", _json('{"jid":"J","percent":NaN}'), "payload"),
    ("json-percent-101", _json('{"jid":"J","percent":101}'), "percent"),
    ("json-desc-surrogate-escape", _json('{"jid":"J","desc":"\\ud800"}'), "payload"),
    ("json-desc-raw-ff", _json(b'{"jid":"J","desc":"\xff"}'), "payload"),
    ("json-desc-1MB", _json(json.dumps({"jid": "J", "desc": "d" * (1 << 20)})), "payload"),
    ("json-desc-1001B", _json(json.dumps({"jid": "J", "desc": "d" * 1001})), "desc"),
    ("json-deep-small", _json(_deep), "desc"),
    ("json-deep-10MB", _json("[" * (10 << 20)), "payload"),
    ("json-10MB", _json(json.dumps({"jid": "J", "desc": "d" * (10 << 20)})), "payload"),
    ("json-until-no-tz", _json('{"jid":"J","reserve_until":"2020-08-01T11:43:20"}'),
     "reserve_until"),
    ("json-until-number", _json('{"jid":"J","reserve_until":1700000000}'), "reserve_until"),
    ("json-array", _json("[]"), "payload"),
    ("json-string", _json('"J"'), "payload"),
    ("json-empty", _json(""), "payload"),
    ("json-truncated", _json('{"jid":"J"'), "payload"),
    ("json-trailing", _json('{"jid":"J"} x'), "payload"),
    ("json-not-text", _json(12345), "payload"),
    # Publisher
    ("pub-enq-jid-empty", _pub("enqueued", "", custom={"track": 1}), "jid"),
    ("pub-enq-custom-list", _pub("enqueued", "J", custom=[1]), "custom"),
    ("pub-enq-custom-str", _pub("enqueued", "J", custom='{"track":1}'), "custom"),
    ("pub-enq-queue-newline", _pub("enqueued", "J", queue="a\nb"), "queue"),
    ("pub-enq-queue-201B", _pub("enqueued", "J", queue="q" * 201), "queue"),
    ("pub-enq-queue-int", _pub("enqueued", "J", queue=7), "queue"),
    ("pub-enq-jobtype-nul", _pub("enqueued", "J", jobtype="a\x00"), "jobtype"),
    ("pub-enq-reserve--1", _pub("enqueued", "J", reserve_for=-1), "reserve_for"),
    ("pub-enq-reserve-'60'", _pub("enqueued", "J", reserve_for="60"), "reserve_for"),
    ("pub-enq-reserve-1.5", _pub("enqueued", "J", reserve_for=1.5), "reserve_for"),
    ("pub-enq-reserve-True", _pub("enqueued", "J", reserve_for=True), "reserve_for"),
    ("pub-working-jid-space", _pub("working", "a b"), "jid"),
    ("pub-working-reserve-nan", _pub("working", "J", reserve_for=float("nan")), "reserve_for"),
    ("pub-success-none", _pub("success", None), "jid"),
    ("pub-success-jid-129", _pub("success", "x" * 129), "jid"),
    ("pub-failed-jid-empty", _pub("failed", "", errtype="E"), "jid"),
    ("pub-failed-errtype-int", _pub("failed", "J", errtype=123), "errtype"),
    ("pub-failed-message-bytes", _pub("failed", "J", message=b"x"), "message"),
    ("pub-dead-errtype-list", _pub("dead", "J", errtype=["x"]), "errtype"),
    ("pub-dead-jid-ctrl", _pub("dead", "a\x07"), "jid"),
    ("pub-batch-one-bad", _batch_with_one_bad, "jid"),
]


@pytest.fixture(scope="module")
def api(hostile_deployment):
    return Tracker(hostile_deployment)


def test_api_table_is_big_enough():
    assert len(API_CASES) >= 40


@pytest.mark.parametrize("name,call,field", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_rejects(api, hostile_deployment, name, call, field):
    before = lengths(hostile_deployment)
    with pytest.raises((ValidationError, TypeError)) as info:
        call(api)
    err = info.value
    if isinstance(err, ValidationError):
        assert err.field == field, str(err)[:300]
    else:  # only an unknown keyword argument: Python's own error, naming it
        assert name == "set-unknown-kwarg" and f"'{field}'" in str(err)
    text = str(err)
    assert "\n" not in text and len(text) < 300 and field in text, text[:500]
    assert lengths(hostile_deployment) == before, "something was appended"
