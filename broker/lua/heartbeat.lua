-- Register or refresh one worker, idempotently (also after a Redis restart).
--
-- KEYS[1] worker record (hash)   KEYS[2] set of worker ids
-- KEYS[3] known-models zset      KEYS[4] the worker's job stream
-- ARGV    ttl_ms, now_ms, worker_id, consumer group, model key prefix,
--         model key suffix, number of models, models..., then record
--         fields as name/value pairs.
--
-- Finished jobs are deleted from the stream, so what is left is exactly the
-- jobs running or waiting: the record's ``queue`` is the stream's length,
-- and each model's sorted set gets that model's share of it (the entries
-- whose ``model`` field names it; the whole length when the worker serves
-- one model). This recount corrects any drift of the scores dispatch and
-- finish keep between heartbeats; for a worker of several models it reads
-- the stream, so it runs only while the stream holds at most RECOUNT_MAX
-- entries (a bounded cost per heartbeat): a longer queue keeps the scores
-- dispatch and finish maintain, and a new member starts at 0.
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
local RECOUNT_MAX = 256
local recount = nmodels == 1 or queue <= RECOUNT_MAX
local per_model = {}
if nmodels > 1 and queue > 0 and recount then
  for _, entry in ipairs(redis.call('XRANGE', KEYS[4], '-', '+')) do
    local f = entry[2]
    for j = 1, #f, 2 do
      if f[j] == 'model' then per_model[f[j + 1]] = (per_model[f[j + 1]] or 0) + 1 break end
    end
  end
end
for i = 8, 7 + nmodels do
  if recount then
    local own = queue
    if nmodels > 1 then own = per_model[ARGV[i]] or 0 end
    redis.call('ZADD', mpre .. ARGV[i] .. msuf, own, wid)
  else
    redis.call('ZADD', mpre .. ARGV[i] .. msuf, 'NX', 0, wid)
  end
  redis.call('ZADD', KEYS[3], now, ARGV[i])
end
return queue
