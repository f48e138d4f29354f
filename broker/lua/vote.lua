-- Cast the one vote of an anonymous battle and append it to the votes stream, atomically.
--
-- KEYS[1] the battle (hash)   KEYS[2] the arena's votes stream
-- KEYS[3] the battle's turn marker (exists while a turn is under way)
-- ARGV    winner (a, b, tie or both_bad), battle id, votes kept (MAXLEN ~),
--         battle TTL (ms)
--
-- A battle takes one vote, and only while it is ``open``: a second vote is
-- refused (VOTED), as is a vote on a battle a failing side ended (ENDED) or
-- one that has expired (GONE), and so is a vote while a turn is still
-- streaming (BUSY: the replies being judged are not complete). The entry copies the battle's models, owner,
-- flag and conversations, so the stream alone rebuilds the leaderboard.
-- Returns {model_a, model_b, vote entry id}.
local b = redis.call('HMGET', KEYS[1], 'state', 'model_a', 'model_b', 'owner', 'flagged', 'messages_a',
                     'messages_b')
if not b[1] then return redis.error_reply('GONE the battle does not exist or has expired') end
if b[1] == 'voted' then return redis.error_reply('VOTED this battle has its vote already') end
if b[1] ~= 'open' then return redis.error_reply('ENDED this battle ended without a vote') end
if redis.call('EXISTS', KEYS[3]) == 1 then return redis.error_reply('BUSY a turn is still under way') end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'battle', ARGV[2], 'model_a', b[2],
                      'model_b', b[3], 'winner', ARGV[1], 'tenant', b[4] or '', 'flagged', b[5] or '0',
                      'messages_a', b[6] or '[]', 'messages_b', b[7] or '[]')
redis.call('HSET', KEYS[1], 'state', 'voted', 'winner', ARGV[1], 'vote', id)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {b[2], b[3], id}
