-- Cancel a request wherever it runs: look up its worker, tell that worker.
--
-- KEYS[1] the request's key (-> worker id)
-- ARGV    control channel prefix and suffix, msgpack {"cancel": request_id}
-- Returns the worker id, or false when the request is unknown or finished.
local wid = redis.call('GET', KEYS[1])
if not wid then return false end
redis.call('PUBLISH', ARGV[1] .. wid .. ARGV[2], ARGV[3])
return wid
