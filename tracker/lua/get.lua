-- get.lua: read the snapshots of some JIDs of one partition, with Redis's clock.
--
-- KEYS[1]  the partition's stream (routes the call to the partition's slot)
-- ARGV[1]  snapshot key prefix            {prefix:p}:t:
-- ARGV[2..] the JIDs
-- Returns {now_ms, {s, p, d, u, r, x} per JID}. A track whose expiry (x) has
-- passed is still a key for a grace period (see project.lua) but answers as
-- absent: the caller compares x with now_ms, the clock the fold's times came from.

local time = redis.call('TIME')
local now = string.format('%d', tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000))
local out = {now}
for i = 2, #ARGV do
  out[i] = redis.call('HMGET', ARGV[1] .. ARGV[i], 's', 'p', 'd', 'u', 'r', 'x')
end
return out
