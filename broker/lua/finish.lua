-- Retire one job from a worker's stream and report the new queue length.
--
-- KEYS[1] the worker's job stream   KEYS[2] worker record
-- KEYS[3..] the sorted sets of the worker's models
-- ARGV    consumer group, entry id, worker id
local n = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
local queue = redis.call('XLEN', KEYS[1])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('HSET', KEYS[2], 'queue', queue) end
for i = 3, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', queue, ARGV[3])
end
return queue
