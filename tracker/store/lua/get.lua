-- get.lua: read the snapshots of some JIDs of one partition, with Redis's clock, once
-- the fold has reached the entry the reader needs. Prepended with ids.lua (Id) and
-- packed.lua (P: where a job lives, its value).
--
-- KEYS[1]  the partition's stream {prefix:p}:log
-- KEYS[2]  the partition's meta hash {prefix:p}:meta (geo: live generation and bucket
--          geometry; pos: the newest entry project.lua has folded)
-- KEYS[3]  the partition's fence {prefix:p}:fence (never written; see tracker/store/keys.py)
-- ARGV[1]  job key prefix of generation 0   {prefix:p}:b:
-- ARGV[2]  the entry the fold must have reached: an ID, or '' for the stream's newest
--          entry now (a read answers the fold of the log as it stands)
-- ARGV[3..] the JIDs
-- Returns {now_ms, '', {s, p, d, u, r, x} per JID}, or {now_ms, need} without rows when
-- the fold has not reached `need` yet: the caller folds (project.lua) or waits, then
-- asks again with that same `need`, so a busy log cannot keep it waiting forever.
-- A track whose expiry (x) has passed is still stored for a while but answers as
-- absent: the caller compares x with now_ms, the clock the fold's times came from. The
-- generation and its geometry are read in the same step as the snapshots, so a rebuild's
-- switch (replay.lua) or a split (project.lua) is seen all at once or not at all.

local now = string.format('%d', Id.now_ms())
local m = redis.call('HMGET', KEYS[2], 'geo', 'pos')
local need = ARGV[2]
if need == '' then
  local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  need = newest[1] and newest[1][1] or '0-0'
end
if need ~= '0-0' and (not m[2] or Id.lt(m[2], need)) then return {now, need} end
local g = P.geometry(m[1] or nil)
local tag = string.sub(ARGV[1], 1, -4)
local gs = g.gen == 0 and '' or string.format('%d', g.gen)
local bpre, vpre = tag .. ':b' .. gs .. ':', tag .. ':v' .. gs .. ':' -- Snap.store
local fmt, hash, addr, decode, STUB = string.format, P.hash, P.addr, P.decode, P.STUB
local NONE = {false, false, false, false, false, false}
local out = {now, ''}
for i = 3, #ARGV do
  local jid, v = ARGV[i], nil
  if #jid <= P.CAP then
    v = redis.call('HGET', bpre .. addr(hash(jid), g), jid)
    if v == STUB then v = redis.call('GET', vpre .. jid) end
  else
    v = redis.call('GET', vpre .. jid)
  end
  local row = NONE
  if v then
    local ok, t = pcall(decode, v)
    if ok and t then
      row = {t.s, t.p and fmt('%d', t.p) or false, t.d or false, fmt('%d', t.u),
             t.r > 0 and fmt('%d', t.r) or false, fmt('%d', t.x)}
    end
  end
  out[i] = row
end
return out
