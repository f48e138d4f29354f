-- Move an OpenAI batch from one status to another, atomically.
--
-- KEYS[1]  the batch (hash)
-- ARGV     the statuses it may move from (comma-separated), the new status,
--          now (epoch s, stored as <new status>_at), then extra field/value
--          pairs to set in the same step
--
-- Returns the status it had (unchanged unless it was one of the allowed), or
-- false for a batch that does not exist.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
for allowed in string.gmatch(ARGV[1], '[^,]+') do
  if allowed == status then
    redis.call('HSET', KEYS[1], 'status', ARGV[2], ARGV[2] .. '_at', ARGV[3])
    for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
    return status
  end
end
return status
