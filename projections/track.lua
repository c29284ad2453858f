-- The track fold, Lua twin of projections/track.py (the live projector runs it
-- inside Redis). Same rules, same order; tests/test_differential.py checks the
-- two on random logs, poison entries included. Pure: no redis.call here.
--
-- Fold.configure(limits)          limits from tracker/events.py, via ARGV
-- Fold.configure_argv(ARGV, i)    the same, read from ARGV[i..i+8]
-- Fold.decode(fields) -> ev | nil, reason   validate one stream entry
-- Fold.apply(track, ev, at, ttl) -> track | nil
-- A track is {s=state, u=updated_at, x=expires_at, r=reserved_until, p=percent, d=desc,
-- q=queue}
-- with times in epoch ms and r = 0 for "no reservation".

local Fold = {}
local L = {}

function Fold.configure(limits) L = limits end

-- The same from ARGV[first..first+8], in the order of tracker/store/scripts.py LIMITS.
local LIMIT_NAMES = {'max_jid', 'max_desc', 'max_errtype', 'max_message', 'max_name', 'max_int',
                     'reserve_default', 'reserve_min', 'reserve_max'}
function Fold.configure_argv(argv, first)
  local limits = {}
  for i, name in ipairs(LIMIT_NAMES) do limits[name] = tonumber(argv[first + i - 1]) end
  L = limits
end

local ALLOWED = {
  enqueued = {t = 1, j = 1, k = 1, q = 1, y = 1, r = 1},
  working = {t = 1, j = 1, r = 1},
  trackset = {t = 1, j = 1, p = 1, d = 1, u = 1},
  success = {t = 1, j = 1},
  failed = {t = 1, j = 1, e = 1, m = 1},
  dead = {t = 1, j = 1, e = 1, m = 1},
}
local INT_FIELDS = {r = 1, p = 1, u = 1}
local BYTE_LIMIT = {d = 'max_desc', e = 'max_errtype', m = 'max_message', q = 'max_name', y = 'max_name'}
local FINISHED = {success = 'success', failed = 'failed', dead = 'dead'}

-- Strict UTF-8 (no overlongs, surrogates or code points past U+10FFFF), as Python decodes it.
local function valid_utf8(s)
  if not string.find(s, '[\128-\255]') then return true end
  local i, n = 1, #s
  local byte = string.byte
  while i <= n do
    local c = byte(s, i)
    if c < 0x80 then
      i = i + 1
    else
      local len, lo, hi
      if c >= 0xC2 and c <= 0xDF then len, lo, hi = 2, 0x80, 0xBF
      elseif c == 0xE0 then len, lo, hi = 3, 0xA0, 0xBF
      elseif c == 0xED then len, lo, hi = 3, 0x80, 0x9F
      elseif c >= 0xE1 and c <= 0xEF then len, lo, hi = 3, 0x80, 0xBF
      elseif c == 0xF0 then len, lo, hi = 4, 0x90, 0xBF
      elseif c >= 0xF1 and c <= 0xF3 then len, lo, hi = 4, 0x80, 0xBF
      elseif c == 0xF4 then len, lo, hi = 4, 0x80, 0x8F
      else return false end
      if i + len - 1 > n then return false end
      local c2 = byte(s, i + 1)
      if c2 < lo or c2 > hi then return false end
      for k = i + 2, i + len - 1 do
        local ck = byte(s, k)
        if ck < 0x80 or ck > 0xBF then return false end
      end
      i = i + len
    end
  end
  return true
end

-- fields: the flat {f1, v1, f2, v2, ...} array of a stream entry.
-- The reference path: every rule in the order events.py decides the reason. One pass over
-- the fields once the type is known; the UTF-8 walk runs only when some byte is >= 0x80
-- (one string.find over all fields at once).
local find, concat, format = string.find, table.concat, string.format
local function decode_checked(fields)
  local ev = {}
  for i = 1, #fields, 2 do ev[fields[i]] = fields[i + 1] end
  if find(concat(fields), '[\128-\255]') then
    for f, v in pairs(ev) do
      if not valid_utf8(f) or not valid_utf8(v) then return nil, 'invalid UTF-8' end
    end
  end
  local t = ev.t
  if t == nil then return nil, 'type: missing' end
  local allowed = ALLOWED[t]
  if not allowed then return nil, 'type: unknown event type' end
  for f, v in pairs(ev) do
    if not allowed[f] then return nil, format('%q: unknown field', f) end
    if INT_FIELDS[f] then
      if #v > 16 or not (v == '0' or find(v, '^[1-9]%d*$')) then
        return nil, format('%q: not a non-negative integer', f)
      end
      v = tonumber(v)
      if v > L.max_int then return nil, format('%q: too large', f) end
      ev[f] = v
    elseif f == 'k' then
      if v ~= '0' and v ~= '1' then return nil, 'track: must be 0 or 1' end
      ev[f] = (v == '1')
    else
      local limit = BYTE_LIMIT[f]
      if limit and #v > L[limit] then return nil, format('%q: too long', f) end
    end
  end
  local j = ev.j
  if j == nil then return nil, 'jid: required' end
  if #j < 1 or #j > L.max_jid or find(j, '[^!-~]') then return nil, 'jid: invalid' end
  if ev.p and ev.p > 100 then return nil, 'percent: more than 100' end
  return ev
end

-- The fast path, for what the publisher writes (t first, every field valid): one pass over
-- the array that checks and converts each pair as it stores it (same keys in the same
-- order, so the same table), and a UTF-8 walk only on free text: every other value passes
-- only as ASCII. It accepts a subset of what decode_checked accepts (it checks every
-- occurrence of a repeated field, not only the one that wins); anything it refuses goes to
-- decode_checked, which decides the reason in its order.
-- KIND[t][f]: 0 j (checked after the loop), 1 integer, 2 the flag k, 3 the type t, else
-- the name of the field's byte limit in L.
local KIND = {}
for t, allowed in pairs(ALLOWED) do
  local kind = {}
  for f in pairs(allowed) do kind[f] = BYTE_LIMIT[f] or (INT_FIELDS[f] and 1) or 0 end
  kind.t, kind.k = 3, allowed.k and 2
  KIND[t] = kind
end
function Fold.decode(fields)
  if fields[1] ~= 't' then return decode_checked(fields) end
  local t = fields[2]
  local kind = KIND[t]
  if not kind then return decode_checked(fields) end
  local ev = {}
  for i = 1, #fields, 2 do
    local f, v = fields[i], fields[i + 1]
    local c = kind[f]
    if c == 0 then -- j
    elseif c == 1 then
      if #v > 16 or not (v == '0' or find(v, '^[1-9]%d*$')) then return decode_checked(fields) end
      v = tonumber(v)
      if v > L.max_int then return decode_checked(fields) end
    elseif c == 3 then
      if v ~= t then return decode_checked(fields) end -- a repeated t that differs
    elseif c == 2 then
      if v == '1' then v = true elseif v == '0' then v = false
      else return decode_checked(fields) end
    elseif c == nil or #v > L[c] or (find(v, '[\128-\255]') and not valid_utf8(v)) then
      return decode_checked(fields) -- unknown field, or free text too long or not UTF-8
    end
    ev[f] = v
  end
  local j = ev.j
  if j == nil or #j < 1 or #j > L.max_jid or find(j, '[^!-~]') then return decode_checked(fields) end
  local p = ev.p
  if p and p > 100 then return decode_checked(fields) end
  return ev
end

local function clamp_reserve(seconds)
  if not seconds or seconds == 0 then return L.reserve_default end
  if seconds < L.reserve_min then return L.reserve_min end
  if seconds > L.reserve_max then return L.reserve_max end
  return seconds
end

local function copy(track)
  return {s = track.s, u = track.u, x = track.x, r = track.r, p = track.p, d = track.d, q = track.q}
end

function Fold.apply(track, ev, at, ttl)
  if track and track.x <= at then track = nil end -- expired before this event
  local t = ev.t
  if t == 'enqueued' then
    if track == nil then
      if not ev.k then return nil end
      track = {s = 'enqueued', u = at, x = 0, r = 0, q = ev.q}
    else
      track = copy(track)
      track.s = 'enqueued'
      track.r = 0
      if ev.q then track.q = ev.q end
    end
  elseif track == nil then
    return nil
  elseif t == 'working' then
    track = copy(track)
    track.s = 'working'
    track.r = at + clamp_reserve(ev.r) * 1000
  elseif t == 'trackset' then
    track = copy(track)
    if ev.p then track.p = ev.p end
    if ev.d then track.d = ev.d end
    if ev.u and track.s == 'working' and track.r > at then
      local wanted = math.min(ev.u, at + L.reserve_max * 1000)
      if wanted > track.r then track.r = wanted end
    end
  else
    track = copy(track)
    track.s = FINISHED[t]
    track.r = 0
  end
  track.u = at
  track.x = math.max(at, track.r) + ttl
  return track
end
