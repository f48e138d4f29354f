-- Register or refresh one worker, idempotently (also after a Redis restart).
--
-- KEYS[1] worker record (hash)   KEYS[2] set of worker ids
-- KEYS[3] known-models zset      KEYS[4] the worker's job stream
-- ARGV    ttl_ms, now_ms, worker_id, consumer group, model key prefix,
--         model key suffix, number of models, models..., then record
--         fields as name/value pairs.
--
-- The queue length reported into each model's sorted set is the stream's
-- length: finished jobs are deleted from the stream, so what is left is
-- exactly the jobs running or waiting.
local ttl, now, wid, group, mpre, msuf = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local nmodels = tonumber(ARGV[7])

local ok = pcall(redis.call, 'XGROUP', 'CREATE', KEYS[4], group, '0', 'MKSTREAM')
local fields = {}
for i = 8 + nmodels, #ARGV do fields[#fields + 1] = ARGV[i] end
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
redis.call('HSET', KEYS[1], 'last_heartbeat', now)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('SADD', KEYS[2], wid)

local queue = redis.call('XLEN', KEYS[4])
redis.call('HSET', KEYS[1], 'queue', queue)
for i = 8, 7 + nmodels do
  redis.call('ZADD', mpre .. ARGV[i] .. msuf, queue, wid)
  redis.call('ZADD', KEYS[3], now, ARGV[i])
end
return queue
