-- get.lua: read the snapshots of some JIDs of one partition, with Redis's clock.
--
-- KEYS[1]  the partition's stream (routes the call to the partition's slot)
-- KEYS[2]  the partition's meta hash {prefix:p}:meta (field gen: live snapshot generation)
-- ARGV[1]  snapshot key prefix of generation 0   {prefix:p}:t:
-- ARGV[2..] the JIDs
-- Returns {now_ms, {s, p, d, u, r, x} per JID}. A track whose expiry (x) has
-- passed is still a key for a grace period (see project.lua) but answers as
-- absent: the caller compares x with now_ms, the clock the fold's times came from.
-- The generation is read in the same step as the snapshots, so a rebuild's
-- switch (tracker/store/lua/replay.lua) is seen all at once or not at all.

local time = redis.call('TIME')
local now = string.format('%d', tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000))
local snap = ARGV[1]
local gen = KEYS[2] and redis.call('HGET', KEYS[2], 'gen')
if gen and gen ~= '0' then snap = string.sub(snap, 1, -2) .. gen .. ':' end -- Snap.prefix
local out = {now}
for i = 2, #ARGV do
  out[i] = redis.call('HMGET', snap .. ARGV[i], 's', 'p', 'd', 'u', 'r', 'x')
end
return out
