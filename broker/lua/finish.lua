-- Retire one job from a worker's stream of one model and report what is left.
--
-- KEYS[1] the worker's job stream of the model   KEYS[2] the model's load set
-- ARGV    consumer group, entry id, worker id
--
-- Finished jobs are deleted, so the stream's length is exactly the worker's
-- queue of this model (running + waiting), and that becomes its score. Both
-- keys carry the model's hash tag (one slot on Redis Cluster).
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
local queue = redis.call('XLEN', KEYS[1])
redis.call('ZADD', KEYS[2], 'XX', queue, ARGV[3])
return queue
