-- Retire one job from a worker's stream and report the new queue length.
--
-- KEYS[1] the worker's job stream   KEYS[2] worker record
-- KEYS[3] the sorted set of the finished job's model
-- ARGV    consumer group, entry id, worker id, number of models the worker serves
--
-- The record's ``queue`` becomes the stream's length (all the worker's
-- jobs); the model's score drops by one, never below 0 (a worker of one
-- model: the stream's length). The heartbeat recounts both exactly.
local n = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
local gone = redis.call('XDEL', KEYS[1], ARGV[2])
local queue = redis.call('XLEN', KEYS[1])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('HSET', KEYS[2], 'queue', queue) end
if tonumber(ARGV[4]) <= 1 then
  redis.call('ZADD', KEYS[3], 'XX', queue, ARGV[3])
elseif gone == 1 then
  local own = redis.call('ZSCORE', KEYS[3], ARGV[3])
  if own then redis.call('ZADD', KEYS[3], 'XX', math.max(0, tonumber(own) - 1), ARGV[3]) end
end
return queue
