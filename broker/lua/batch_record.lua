-- Store one OpenAI batch request's output line, exactly once, and count it.
--
-- KEYS[1]  the batch (hash)
-- KEYS[2]  its results (hash: request index -> output line)
-- ARGV     request index, output line ("" = skipped because the batch was
--          cancelled), counter to bump ("completed", "failed" or ""),
--          prompt tokens, completion tokens, TTL of the results hash (ms)
--
-- A second attempt at the same request (arq re-ran it) finds the field set and
-- changes nothing; a batch that already ended takes nothing more.
-- Returns {requests settled so far, total requests} ({-1, 0} once ended).
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'completed' or status == 'failed' or status == 'cancelled' or status == 'expired' then
  return {-1, 0}
end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 1 then
  if ARGV[3] ~= '' then redis.call('HINCRBY', KEYS[1], ARGV[3], 1) end
  if tonumber(ARGV[4]) > 0 then redis.call('HINCRBY', KEYS[1], 'input_tokens', ARGV[4]) end
  if tonumber(ARGV[5]) > 0 then redis.call('HINCRBY', KEYS[1], 'output_tokens', ARGV[5]) end
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
return {redis.call('HLEN', KEYS[2]), tonumber(redis.call('HGET', KEYS[1], 'total') or '-1')}
