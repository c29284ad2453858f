-- index.lua: the state index (listing by state, newest update first), paged so that a
-- track costs ~20 bytes in it instead of the ~100 of a sorted set's skiplist entry.
-- Prepended to the scripts that keep or read it (see tracker/store/scripts.py).
--
-- An entry is a JID scored by its update time; entries are ordered by (time, JID), the
-- order a sorted set keeps. Per generation g and state, the directory {p}:s<g>:<state>
-- is a sorted set of pages: member the page's label, the lowest (time, JID) it may hold,
-- written '<ms>' or, when a split fell between entries of one millisecond, '<ms>:<jid>';
-- score that time. Page {p}:s<g>:<state>:<label> is a sorted set of its entries; page 0
-- holds whatever is below the lowest label listed and is never listed itself. A page
-- splits in two once it holds more than Ix.PAGE entries, so each stays a listpack
-- (zset-max-listpack-entries is 128 by default). Nearly every write goes to the newest
-- page, which a handle caches for the length of a script; it splits at 7/8, since
-- times only grow there, the others in the middle.
--
-- Ix.open(dir) -> x          a handle on directory key dir
-- Ix.add(x, u, jid), Ix.remove(x, u, jid), Ix.move(x, u0, u, jid)   (u: update times)
-- Ix.pages(dir, max) -> f    f() gives the page keys holding times <= max, newest first
-- Ix.sweep(dir, before)      remove entries with times < before; returns how many

local Ix = {}
Ix.PAGE = 120
local fmt, match = string.format, string.match

function Ix.open(dir)
  return {dir = dir}
end

-- Whether (u, jid) sorts before a page's label.
local function before(u, jid, label)
  local ms, j = match(label, '^(%d+):?(.*)$')
  ms = tonumber(ms)
  return u < ms or (u == ms and jid < j)
end

local function newest(x)
  if not x.lo then
    local r = redis.call('ZREVRANGE', x.dir, 0, 0)
    x.lo = r[1] or '0'
    x.n = redis.call('ZCARD', x.dir .. ':' .. x.lo)
  end
end

-- The label of the page that holds (u, jid).
local function page(x, u, jid)
  newest(x)
  if not before(u, jid, x.lo) then return x.lo end
  local off, ms = 0, fmt('%d', u)
  while true do
    local r = redis.call('ZREVRANGEBYSCORE', x.dir, ms, '-inf', 'LIMIT', off, 4)
    for _, label in ipairs(r) do
      if not before(u, jid, label) then return label end
    end
    if #r < 4 then return '0' end
    off = off + 4
  end
end

local function split(x, lo, key)
  local all = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  local n = #all / 2
  local k = (lo == x.lo) and math.floor(n * 7 / 8) + 1 or math.floor(n / 2) + 1
  local ms = fmt('%d', tonumber(all[2 * k]))
  local label = ms
  if tonumber(all[2 * k]) == tonumber(all[2 * k - 2]) then label = ms .. ':' .. all[2 * k - 1] end
  local moved = {}
  for i = k, n do
    moved[#moved + 1] = all[2 * i]
    moved[#moved + 1] = all[2 * i - 1]
  end
  redis.call('ZREMRANGEBYRANK', key, k - 1, -1)
  redis.call('ZADD', x.dir .. ':' .. label, unpack(moved))
  redis.call('ZADD', x.dir, ms, label)
  if lo == x.lo then x.lo, x.n = label, n - k + 1 end
end

local function add_at(x, lo, u, jid)
  local key = x.dir .. ':' .. lo
  if redis.call('ZADD', key, fmt('%d', u), jid) == 0 then return end
  local n
  if lo == x.lo then
    x.n = x.n + 1
    n = x.n
  else
    n = redis.call('ZCARD', key)
  end
  if n > Ix.PAGE then split(x, lo, key) end
end

local function remove_at(x, lo, jid)
  local key = x.dir .. ':' .. lo
  if redis.call('ZREM', key, jid) == 0 then return end
  if lo == x.lo then
    x.n = x.n - 1 -- (the newest page stays listed, empty or not)
  elseif lo ~= '0' and redis.call('EXISTS', key) == 0 then
    redis.call('ZREM', x.dir, lo)
  end
end

function Ix.add(x, u, jid)
  add_at(x, page(x, u, jid), u, jid)
end

function Ix.remove(x, u, jid)
  remove_at(x, page(x, u, jid), jid)
end

function Ix.move(x, u0, u, jid)
  local from, to = page(x, u0, jid), page(x, u, jid)
  if from == to then
    redis.call('ZADD', x.dir .. ':' .. to, fmt('%d', u), jid)
  else
    remove_at(x, from, jid)
    add_at(x, to, u, jid)
  end
end

-- An iterator over the page keys that may hold times <= max ('+inf' or ms), newest first.
function Ix.pages(dir, max)
  local batch, i, off, last = {}, 1, 0, false
  return function()
    if i > #batch then
      if last then return nil end
      batch = redis.call('ZREVRANGEBYSCORE', dir, max, '-inf', 'LIMIT', off, 16)
      i, off = 1, off + 16
      if #batch < 16 then
        batch[#batch + 1] = '0'
        last = true
      end
    end
    i = i + 1
    return dir .. ':' .. batch[i - 1]
  end
end

function Ix.sweep(dir, before_ms)
  local n = 0
  local labels = redis.call('ZRANGEBYSCORE', dir, '-inf', '(' .. before_ms)
  labels[#labels + 1] = '0'
  for _, lo in ipairs(labels) do
    local key = dir .. ':' .. lo
    n = n + redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. before_ms)
    if lo ~= '0' and redis.call('EXISTS', key) == 0 then redis.call('ZREM', dir, lo) end
  end
  return n
end
