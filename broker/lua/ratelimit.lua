-- Count against one tenant's per-minute budget (requests, or tokens reserved then settled).
--
-- KEYS[1] the tenant's counter for this clock minute (requests or tokens)
-- ARGV    limit (0 = settle: no check), amount to add (may be negative when
--         settling a reservation), counter TTL (ms)
-- Returns 1 (admitted and counted) or 0 (refused: the counter is already at
-- the limit). A request is admitted while the counter is under the limit, so
-- concurrent admissions overshoot by at most one amount. Atomic: exact across
-- every gateway. Settling into a window that has passed changes nothing.
local limit, amount = tonumber(ARGV[1]), tonumber(ARGV[2])
if limit > 0 and tonumber(redis.call('GET', KEYS[1]) or '0') >= limit then return 0 end
if limit == 0 and redis.call('EXISTS', KEYS[1]) == 0 then return 1 end
redis.call('INCRBY', KEYS[1], amount)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
