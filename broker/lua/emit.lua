-- Append one reply message to a request's replay log (its publishing travels in the gateway's bundle).
--
-- KEYS[1] the request's replay log (stream)
-- ARGV    message, replay TTL (ms), cap on entries
-- Returns the entry id.
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'r', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return id
