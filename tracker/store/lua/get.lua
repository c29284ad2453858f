-- get.lua: read the snapshots of some JIDs of one partition, with Redis's clock, once
-- the fold has reached the entry the reader needs. Prepended with ids.lua (Id).
--
-- KEYS[1]  the partition's stream {prefix:p}:log
-- KEYS[2]  the partition's meta hash {prefix:p}:meta (gen: live snapshot generation;
--          pos: the newest entry project.lua has folded)
-- KEYS[3]  the partition's fence {prefix:p}:fence (never written; see tracker/store/keys.py)
-- ARGV[1]  snapshot key prefix of generation 0   {prefix:p}:t:
-- ARGV[2]  the entry the fold must have reached: an ID, or '' for the stream's newest
--          entry now (a read answers the fold of the log as it stands)
-- ARGV[3..] the JIDs
-- Returns {now_ms, '', {s, p, d, u, r, x} per JID}, or {now_ms, need} without rows when
-- the fold has not reached `need` yet: the caller folds (project.lua) or waits, then
-- asks again with that same `need`, so a busy log cannot keep it waiting forever.
-- A track whose expiry (x) has passed is still a key for a grace period but answers as
-- absent: the caller compares x with now_ms, the clock the fold's times came from. The
-- generation is read in the same step as the snapshots, so a rebuild's switch
-- (replay.lua) is seen all at once or not at all.

local now = string.format('%d', Id.now_ms())
local m = redis.call('HMGET', KEYS[2], 'gen', 'pos')
local need = ARGV[2]
if need == '' then
  local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  need = newest[1] and newest[1][1] or '0-0'
end
if need ~= '0-0' and (not m[2] or Id.lt(m[2], need)) then return {now, need} end
local snap, gen = ARGV[1], m[1]
if gen and gen ~= '0' then snap = string.sub(snap, 1, -2) .. gen .. ':' end -- Snap.prefix
local out = {now, ''}
for i = 3, #ARGV do
  out[i] = redis.call('HMGET', snap .. ARGV[i], 's', 'p', 'd', 'u', 'r', 'x')
end
return out
