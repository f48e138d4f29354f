-- Register or refresh one worker's seat among a model's workers, idempotently (also after a Redis restart).
--
-- KEYS[1] the worker's seat for the model (hash)   KEYS[2] the model's load set
-- KEYS[3] the worker's job stream of the model      KEYS[4] the model's ``seen`` string
-- ARGV    ttl_ms, now_ms, worker id, consumer group, seen TTL (ms), then the
--         seat's fields as name/value pairs (status, speed, max_queue,
--         max_concurrency, others)
--
-- Finished jobs are deleted from the stream, so its length is exactly the
-- worker's jobs of this model running or waiting: the score becomes that,
-- correcting any drift. All four keys carry the model's hash tag, so a worker
-- of several models beats once per model, each in its own slot; the worker's
-- record (for people and readers) is written beside, by the caller.
-- Returns the stream's length.
local ttl, now, wid, group = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
pcall(redis.call, 'XGROUP', 'CREATE', KEYS[3], group, '0', 'MKSTREAM')
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('PEXPIRE', KEYS[1], ttl)
local queue = redis.call('XLEN', KEYS[3])
redis.call('ZADD', KEYS[2], queue, wid)
redis.call('SET', KEYS[4], now, 'PX', ARGV[5])
return queue
