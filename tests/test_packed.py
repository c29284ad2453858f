"""The packed value: Lua codec (tracker/store/lua/packed.lua) == Python twin (packed.py).

Random snapshots and histories are encoded by each side and decoded by the other, on
fakeredis and on real Redis; the bucket address, expiry and strip agree too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from projections.track import STATES, Track
from tracker.store import packed, scripts

LUA = (Path(scripts.__file__).parent / "lua" / "packed.lua").read_text() + r"""
local fmt = string.format
local function opt(s) if s == '' then return nil end return string.sub(s, 2) end
local mode = ARGV[1]
if mode == 'enc' then
  -- ARGV[2..8] s u x r p d q ('' = none; d and q prefixed with '+'), then ms seq pairs,
  -- oldest first; ARGV[9] how many of the newest go first, the rest as an older history.
  local t = nil
  if ARGV[2] ~= '' then
    t = {s = ARGV[2], u = tonumber(ARGV[3]), x = tonumber(ARGV[4]), r = tonumber(ARGV[5]),
         p = tonumber(ARGV[6]), d = opt(ARGV[7]), q = opt(ARGV[8])}
  end
  local e = {}
  for i = 10, #ARGV, 2 do e[#e + 1] = {tonumber(ARGV[i]), tonumber(ARGV[i + 1])} end
  local new = tonumber(ARGV[9])
  local old = #e - new
  if old == 0 then return P.value(t, e, #e) end
  -- the older part as stored: encode it alone, then keep the bytes after its first entry
  local older = {}
  for i = 1, old do older[i] = e[i] end
  local ov = P.value(nil, older, old)
  local _, i = P.decode(ov)
  local md, seq, j = P.entry(ov, i)
  local recent = {}
  for k = old + 1, #e do recent[#recent + 1] = e[k] end
  return P.value(t, recent, #recent, e[old][1], e[old][2], string.sub(ov, j))
end
if mode == 'dec' then
  local v = ARGV[2]
  local t = P.decode(v)
  local out = {t and t.s or '', t and fmt('%d', t.u) or '', t and fmt('%d', t.x) or '',
               t and fmt('%d', t.r) or '', t and t.p and fmt('%d', t.p) or '',
               t and t.d and '+' .. t.d or '', t and t.q and '+' .. t.q or ''}
  for _, id in ipairs(P.entries(v)) do
    out[#out + 1] = fmt('%d', id[1])
    out[#out + 1] = fmt('%d', id[2])
  end
  return out
end
if mode == 'misc' then
  local v, grace, retention = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
  local g = P.geometry(ARGV[6])
  return {fmt('%d', P.expiry(v, grace, retention)), P.strip(v) or false,
          fmt('%d', P.addr(P.hash(ARGV[5]), g)), P.geo(g)}
end
"""

MS = 2**48 - 1
texts = st.one_of(st.none(), st.text(max_size=40), st.text(alphabet="ab€😀", max_size=3))


@st.composite
def values(draw):
    entries = []
    ms = draw(st.integers(10**12, 2 * 10**12))
    for _ in range(draw(st.integers(0, 12))):
        ms += draw(st.sampled_from([0, 1, 127, 128, 16383, 16384, 3 * 86_400_000,
                                    draw(st.integers(0, 10**9))]))
        entries.append((ms, draw(st.sampled_from([0, 1, 127, 128, 70000, packed.SEQ_MAX]))))
    track = None
    if draw(st.booleans()) or not entries:
        u = max(ms, draw(st.integers(10**12, MS // 2)))
        r = draw(st.one_of(st.just(0), st.integers(1, 2 * u)))
        x = max(u, r) + draw(st.integers(0, 10**10))
        track = Track(state=draw(st.sampled_from(STATES[1:])), updated_at=u, expires_at=x,
                      reserved_until=r, percent=draw(st.one_of(st.none(), st.integers(0, 100))),
                      desc=draw(texts), queue=draw(texts))
    return track, entries[::-1]  # newest first


def lua_args(track, entries, new):
    t = track
    head = ["", "", "", "", "", "", ""] if t is None else [
        t.state, t.updated_at, t.expires_at, t.reserved_until,
        "" if t.percent is None else t.percent,
        "" if t.desc is None else "+" + t.desc, "" if t.queue is None else "+" + t.queue]
    flat = [x for e in reversed(entries) for x in e]
    return ["enc", *head, new, *flat]


def from_lua(reply) -> packed.Value:
    s = [x.decode() for x in reply]
    track = None
    if s[0]:
        track = Track(state=s[0], updated_at=int(s[1]), expires_at=int(s[2]),
                      reserved_until=int(s[3]), percent=int(s[4]) if s[4] else None,
                      desc=s[5][1:] if s[5] else None, queue=s[6][1:] if s[6] else None)
    entries = [(int(s[i]), int(s[i + 1])) for i in range(7, len(s), 2)]
    return packed.Value(track, entries)


@pytest.fixture
def lua(backend):
    client = backend(partitions=1).client
    return client.register_script(LUA)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(value=values(), data=st.data())
def test_lua_and_python_codecs_agree(lua, value, data):
    track, entries = value
    want = packed.encode(track, entries)
    new = data.draw(st.integers(1 if track is None else 0, len(entries)))
    assert lua(args=lua_args(track, entries, new)) == want  # appending as the fold does
    assert from_lua(lua(args=["dec", want])) == packed.Value(track, entries)
    assert packed.decode(want) == packed.Value(track, entries)
    grace, retention = data.draw(st.integers(0, 10**7)), data.draw(st.integers(60_000, 10**10))
    jid = data.draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1,
                            max_size=24))
    geo = packed.Geometry(0, data.draw(st.integers(1, 300)), data.draw(st.integers(0, 12)), 0)
    geo = geo._replace(split=data.draw(st.integers(0, geo.b0 * 2**geo.level - 1)))
    e, stripped, addr, text = lua(args=["misc", want, grace, retention, jid, geo.text()])
    assert int(e) == packed.expiry(want, grace, retention)
    assert (stripped or None) == (packed.encode(None, entries) if entries else None)
    assert int(addr) == geo.address(jid) and text.decode() == geo.text()


def test_the_example_in_the_format_description():
    """The research's example job (storage-research.md), plus a queue: 46 bytes."""
    t = Track(state="success", updated_at=1764600000123, expires_at=1764601800123,
              percent=90, desc="step 2 of 3", queue="default")
    ids = [(1764600000123, 0), (1764599975400, 0), (1764599961000, 3), (1764599952100, 0),
           (1764599950000, 0)]
    v = packed.encode(t, ids)
    assert v.hex() == ("5b019ada5b2e7bc0ee6d5a0b" + b"step 2 of 3".hex() + "07"
                       + b"default".hex() + "000093c10100c07003c44500b41000")
    assert len(v) == 46 <= packed.CAP
    assert packed.decode(v) == packed.Value(t, ids)
    assert packed.decode(packed.encode(None, ids)) == packed.Value(None, ids)
    with pytest.raises(ValueError):
        packed.decode(b"\x07abcdef")
    with pytest.raises(ValueError):
        packed.decode(packed.STUB)
