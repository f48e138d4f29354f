-- Publish one reply message and append it to the request's replay log, in one command.
--
-- KEYS[1] the request's replay log (stream)
-- ARGV    reply channel, message, replay TTL (ms), cap on entries
-- Returns how many gateways received the message (0: nobody listens).
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', 'r', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return redis.call('PUBLISH', ARGV[1], ARGV[2])
