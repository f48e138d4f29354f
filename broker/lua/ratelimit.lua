-- Admit one request for an API key if its requests and tokens this minute are under the limits.
--
-- KEYS[1] the key's request counter for this minute   KEYS[2] its token counter
-- ARGV    requests per minute (0 = no limit), tokens per minute (0 = no limit), counter TTL (ms)
-- Returns 1 (admitted, counted) or 0 (refused). Atomic, so the limit holds across every gateway.
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
if rpm > 0 and tonumber(redis.call('GET', KEYS[1]) or '0') >= rpm then return 0 end
if tpm > 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= tpm then return 0 end
redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
