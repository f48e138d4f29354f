-- Cancel a request wherever it runs: look up its worker, tell that worker.
--
-- KEYS[1] the request's hash (worker, owner)
-- ARGV    control channel prefix and suffix, a msgpack Cancel (broker/protocol.py),
--         the asking tenant ("" = anyone: an admin, or the gateway releasing its own stream)
-- Returns the worker id, or false when the request is unknown, finished, or
-- not the asking tenant's (the caller cannot tell these apart).
local rec = redis.call('HMGET', KEYS[1], 'worker', 'owner')
local wid, owner = rec[1], rec[2]
if not wid then return false end
if ARGV[4] ~= '' and owner ~= ARGV[4] then return false end
redis.call('PUBLISH', ARGV[1] .. wid .. ARGV[2], ARGV[3])
return wid
