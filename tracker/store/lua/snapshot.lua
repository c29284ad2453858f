-- snapshot.lua: a generation's stored jobs (packed.lua values in bucket hashes) and its
-- state index (index.lua), shared by project.lua, replay.lua and sweep.lua (prepended
-- after ids.lua, packed.lua and index.lua), so the live projector and a rebuild store a
-- job the very same way.
--
-- Keys come from the generation-0 prefix '{prefix:p}:b:' (tracker/store/keys.py
-- snapshot_prefix) by the rules of keys.py (meta, bucket_prefix, overflow_prefix,
-- state_index_prefix); tests/test_replay.py checks the two agree.
--
-- Snap.store(base, g, n) -> S   generation g's keys, its field count n
-- Snap.live(base) -> S, meta    the live generation, from one HMGET of the meta hash
-- Snap.read(S, jid)             -> value (nil: none), its bucket (nil: a long JID), stub?
-- Snap.batch(S, physical)       one step's jobs: b.load(jid), b.note(jid, ms, seq), b.flush()
-- Snap.put(S, jid, key, stub, v, e)   store value v (nil: delete), dead after e (ms)
-- Snap.grow(S, max)             up to max linear-hashing splits while buckets are too full
-- Snap.expire(S)                bucket key expiries for what this step wrote
-- Snap.ix(S, state)             the state index handle (index.lua) of one state
-- Before a batch, set S.now (Redis's clock), S.grace and S.retention (ms).

local Snap = {}
Snap.DEFAULT_RETENTION = 7 * 86400000 -- ms; tracker/retention.py DEFAULT_MS
Snap.LISTPACK = 128 -- fields a bucket may hold and stay a listpack (the lowest usual limit)
Snap.id_lt, Snap.now_ms = Id.lt, Id.now_ms
local HOUR = 3600000
local fmt, sub, floor = string.format, string.sub, math.floor

function Snap.store(base, g, n)
  local tag = sub(base, 1, -4)
  local gs = g.gen == 0 and '' or fmt('%d', g.gen)
  return {tag = tag, g = g, n = n or 0, meta = tag .. ':meta', bpre = tag .. ':b' .. gs .. ':',
          vpre = tag .. ':v' .. gs .. ':', idx = tag .. ':s' .. gs .. ':', bexp = {}, ix = {},
          now = 0, grace = 0, retention = Snap.DEFAULT_RETENTION}
end

-- The live generation's store, with retention and now set; m = {geo, n, retention} as read.
function Snap.live(base)
  local m = redis.call('HMGET', sub(base, 1, -4) .. ':meta', 'geo', 'n', 'retention')
  local S = Snap.store(base, P.geometry(m[1] or nil), tonumber(m[2]))
  S.retention = tonumber(m[3]) or Snap.DEFAULT_RETENTION
  S.now = Id.now_ms()
  return S, m
end

function Snap.ix(S, state)
  local x = S.ix[state]
  if not x then
    x = Ix.open(S.idx .. state)
    S.ix[state] = x
  end
  return x
end

function Snap.read(S, jid)
  if #jid > P.CAP then return redis.call('GET', S.vpre .. jid) or nil, nil, false end
  local key = S.bpre .. P.addr(P.hash(jid), S.g)
  local v = redis.call('HGET', key, jid)
  if v == P.STUB then return redis.call('GET', S.vpre .. jid) or nil, key, true end
  return v or nil, key, false
end

-- A key expiry for something dead after e: rounded up to the next hour and at least an
-- hour away, so a bucket's expiry changes at most once an hour (one PTTL per write, one
-- PEXPIREAT an hour), and a rebuild writing the past never sets one in the past.
function Snap.deadline(S, e)
  if e < S.now then e = S.now end
  return fmt('%d', (floor(e / HOUR) + 2) * HOUR)
end

function Snap.put(S, jid, key, stub, v, e)
  local over = S.vpre .. jid
  if not key then -- a JID longer than a bucket field: its overflow string alone
    if v then redis.call('SET', over, v, 'PXAT', Snap.deadline(S, e)) else redis.call('DEL', over) end
    return
  end
  if not v then
    S.n = S.n - redis.call('HDEL', key, jid)
    if stub then redis.call('DEL', over) end
    return
  end
  if #v <= P.CAP then
    S.n = S.n + redis.call('HSET', key, jid, v)
    if stub then redis.call('DEL', over) end
  else
    redis.call('SET', over, v, 'PXAT', Snap.deadline(S, e))
    if not stub then S.n = S.n + redis.call('HSET', key, jid, P.STUB) end
  end
  local b = S.bexp[key]
  if not b or e > b then S.bexp[key] = e end
end

-- Each bucket written expires after its latest field (a safety net: the sweep removes dead
-- fields). PTTL and compare rather than PEXPIREAT GT: GT never sets a first expiry (a key
-- without one counts as infinite) and Redis 6.2 has no GT.
function Snap.expire(S)
  for key, e in pairs(S.bexp) do
    local want = Snap.deadline(S, e)
    local pt = redis.call('PTTL', key)
    if pt == -1 or (pt >= 0 and S.now + pt + 60000 < tonumber(want)) then
      redis.call('PEXPIREAT', key, want)
    end
  end
  S.bexp = {}
end

-- One step's jobs, each read once: b.tracks[jid] = the fold's track (false when none),
-- b.jobs[jid] = what was stored (its history's newest entry h0/q0 and the bytes after it).
-- physical: the live projector, to which a snapshot past x + grace and a history past
-- retention (by Redis's clock) are absent, as when each had its own expiring key, so its
-- fold never depends on whether the sweep has been there yet. A rebuild folds the past and
-- keeps to the fold's own rules. on_miss(jid) runs for a JID with nothing stored.
function Snap.batch(S, physical, on_miss)
  local b = {tracks = {}, jobs = {}}
  function b.load(jid)
    local t = b.tracks[jid]
    if t ~= nil then return t or nil end
    local v, key, stub = Snap.read(S, jid)
    local e = {key = key, stub = stub, n = 0, had = v ~= nil}
    if v then
      local ok, tr, i, T = pcall(P.decode, v)
      if ok then -- (else not a value tracker wrote: as if absent, overwritten)
        if tr then e.s0, e.u0 = tr.s, tr.u end
        if tr and physical and tr.x + S.grace <= S.now then tr = nil end
        if i <= #v then
          local ok2, md, seq, j = pcall(P.entry, v, i)
          if ok2 and not (physical and T - md + S.retention <= S.now) then
            e.h0, e.q0, e.rest = T - md, seq, sub(v, j)
          end
        end
        t = tr
      end
    elseif on_miss then
      on_miss(jid)
    end
    e.t0 = t or false
    b.jobs[jid] = e
    b.tracks[jid] = e.t0
    return t
  end
  -- Note entry (ms, seq) in jid's history (loaded first). A history whose newest entry is
  -- retention older than this one starts again: by event time, so a rebuild agrees.
  function b.note(jid, ms, seq)
    local e = b.jobs[jid]
    local n = e.n
    local newest = n > 0 and e[n][1] or e.h0
    if newest and newest + S.retention <= ms then
      n = 0
      e.h0 = nil
    end
    n = n + 1
    e[n] = {ms, seq}
    e.n = n
  end
  -- Write every job that changed, in (update time, JID) order: the state index's newest
  -- page then takes them in its order (index.lua), never splitting under a later write.
  function b.flush()
    local todo, us, n = {}, {}, 0
    for jid, e in pairs(b.jobs) do
      local t = b.tracks[jid]
      if e.n > 0 or t ~= e.t0 then
        n = n + 1
        todo[n] = jid
        us[jid] = t and t.u or 0
      end
    end
    if n > 1 then
      table.sort(todo, function(a, c)
        local ua, uc = us[a], us[c]
        return ua < uc or (ua == uc and a < c)
      end)
    end
    for i = 1, n do
      local jid = todo[i]
      Snap.write(S, jid, b.jobs[jid], b.tracks[jid] or nil)
    end
  end
  return b
end

-- Store job jid as track t (nil: history only, or nothing) with e's history, and keep the
-- state index in step: a track is in the index of its state, by its update time.
function Snap.write(S, jid, e, t)
  local newest = e.n > 0 and e[e.n][1] or e.h0
  local v, dead = P.value(t, e, e.n, e.h0, e.q0, e.rest), nil
  if v then
    dead = t and t.x + S.grace or 0
    if newest and newest + S.retention > dead then dead = newest + S.retention end
  end
  if v or e.had then Snap.put(S, jid, e.key, e.stub, v, dead) end
  if e.s0 and (not t or t.s ~= e.s0) then Ix.remove(Snap.ix(S, e.s0), e.u0, jid) end
  if t then
    if t.s == e.s0 then Ix.move(Snap.ix(S, t.s), e.u0, t.u, jid) else Ix.add(Snap.ix(S, t.s), t.u, jid) end
  end
end

-- Whether a bucket converted to a hashtable (it then stays one until rewritten). A server
-- without OBJECT (an emulator) answers no; any other refusal (ACL) is an error.
function Snap.hashtable(key)
  local r = redis.pcall('OBJECT', 'ENCODING', key)
  if type(r) == 'table' and r.err then
    if string.find(tostring(r.err), 'unknown command', 1, true) then return false end
    error(r)
  end
  return r == 'hashtable'
end

-- redis.call(cmd, key, ...arr) in slices (a Lua call takes a few thousand arguments at most).
function Snap.many(cmd, key, arr)
  for i = 1, #arr, 400 do
    redis.call(cmd, key, unpack(arr, i, math.min(i + 399, #arr)))
  end
end

-- Rewrite a bucket that converted and fits again, so it is a listpack again; flat holds
-- its fields and values. Keeps its expiry.
function Snap.heal(key, flat)
  local pt = redis.call('PTTL', key)
  redis.call('DEL', key)
  Snap.many('HSET', key, flat)
  if pt > 0 then redis.call('PEXPIRE', key, pt) end
end

-- Linear hashing: while the buckets hold more than P.ALPHA fields on average, split bucket
-- bs, moving the fields whose hash says so to bucket bs + b0*2^bl (at most max splits).
function Snap.grow(S, max)
  local g, splits = S.g, 0
  while splits < max and S.n > P.ALPHA * P.count(g) do
    local n0 = g.b0 * 2 ^ g.bl
    local old, new = S.bpre .. g.bs, S.bpre .. (g.bs + n0)
    local h = redis.call('HGETALL', old)
    local mv, del, stay = {}, {}, {}
    for i = 1, #h, 2 do
      if P.hash(h[i]) % (2 * n0) ~= g.bs then
        mv[#mv + 1] = h[i]
        mv[#mv + 1] = h[i + 1]
        del[#del + 1] = h[i]
      else
        stay[#stay + 1] = h[i]
        stay[#stay + 1] = h[i + 1]
      end
    end
    if #del > 0 then
      local pt = redis.call('PTTL', old)
      Snap.many('HSET', new, mv)
      if pt > 0 then redis.call('PEXPIRE', new, pt) end
      if #stay > 0 and #stay / 2 <= Snap.LISTPACK and Snap.hashtable(old) then
        Snap.heal(old, stay)
      else
        Snap.many('HDEL', old, del)
      end
    end
    g.bs = g.bs + 1
    if g.bs == n0 then
      g.bl = g.bl + 1
      g.bs = 0
    end
    splits = splits + 1
  end
  return splits
end
