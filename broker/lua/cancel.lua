-- Find where a request runs, if the asking tenant may cancel it.
--
-- KEYS[1] the request's hash (worker, model, owner)
-- ARGV    the asking tenant ("" = anyone: an admin, or the gateway releasing its own stream)
-- Returns the worker id (the caller tells that worker, on its control channel,
-- which lives in another slot on Redis Cluster), or false when the request is
-- unknown, finished, or not the asking tenant's (the caller cannot tell these apart).
local rec = redis.call('HMGET', KEYS[1], 'worker', 'owner')
local wid, owner = rec[1], rec[2]
if not wid then return false end
if ARGV[1] ~= '' and owner ~= ARGV[1] then return false end
return wid
