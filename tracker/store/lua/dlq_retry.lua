-- dlq_retry.lua: move one dead letter back into its partition's log, once.
--
-- KEYS[1]  the partition's stream     {prefix:p}:log
-- KEYS[2]  its dead-letter stream     {prefix:p}:dlq
-- KEYS[3]  its fence (never written)  {prefix:p}:fence
-- ARGV[1]  the dead letter's ID in KEYS[2]
-- ARGV[2..] the original fields, as field, value pairs
-- Returns the new log entry ID, or false when the dead letter was already gone
-- (another retry took it): deleting first makes two concurrent retries append once.

if redis.call('XDEL', KEYS[2], ARGV[1]) == 0 then return false end
return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
