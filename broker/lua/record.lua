-- Write a worker's record (for people and readers: /v1/models, redserve status) and its TTL, in one step.
--
-- KEYS[1] the worker's record (hash)
-- ARGV    ttl_ms, then the record's fields as name/value pairs
--
-- Its existence is the worker's liveness for readers and the janitor: a
-- record must never be left without its TTL, hence one script, not two
-- commands.
local fields = {}
for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
