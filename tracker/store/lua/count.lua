-- count.lua: how many tracks of one partition are in each state, from the state index.
--
-- KEYS[1]  the partition's meta hash {prefix:p}:meta (gen: the live generation)
-- KEYS[2]  its fence {prefix:p}:fence (never written; see tracker/store/keys.py)
-- ARGV[1]  snapshot key prefix of generation 0   {prefix:p}:t:
-- ARGV[2]  the track TTL, ms
-- ARGV[3..] the states
-- Returns the count per state, in ARGV order: the index entries updated within the TTL
-- (Redis's clock), which is every live track but a working one whose reservation keeps it
-- alive longer than the TTL after its last update. A gauge, not a listing: list.lua checks
-- each entry against its snapshot.

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local snap, gen = ARGV[1], redis.call('HGET', KEYS[1], 'gen')
if gen and gen ~= '0' then snap = string.sub(snap, 1, -2) .. gen .. ':' end -- Snap.prefix
local tag, g = string.match(snap, '^(.*):t(%d*):$')
local idx = tag .. ':s' .. g .. ':' -- Snap.index
local since = string.format('(%d', now - tonumber(ARGV[2]))
local out = {}
for i = 3, #ARGV do out[#out + 1] = redis.call('ZCOUNT', idx .. ARGV[i], since, '+inf') end
return out
