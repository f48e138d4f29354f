-- Store one file, charged to its owner's quota, atomically (so concurrent uploads cannot both squeeze in).
--
-- KEYS[1] the file (hash)   KEYS[2] the owner's files (hash: file id -> "<bytes> <expires ms>")
-- ARGV    now (ms), TTL (ms), file id, size (bytes), the owner's byte quota and
--         file-count quota (0 = none), enforce (1 = refuse past a quota, 0 =
--         charge regardless: batch output, which must not fail), then the
--         file's fields as name/value pairs
-- Returns {1, bytes used, files} when stored, {0, bytes used, files} when a
-- quota refused it (what was in use before). Files that have expired are
-- dropped from the owner's ledger first, so the quota frees itself.
local now, ttl, id, size = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local max_bytes, max_files, enforce = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7] == '1'
local ledger = redis.call('HGETALL', KEYS[2])
local used, files = 0, 0
for i = 1, #ledger, 2 do
  local bytes, expires = string.match(ledger[i + 1], '(%d+) (%d+)')
  if tonumber(expires) <= now then
    redis.call('HDEL', KEYS[2], ledger[i])
  else
    used, files = used + tonumber(bytes), files + 1
  end
end
if enforce and ((max_bytes > 0 and used + size > max_bytes) or (max_files > 0 and files + 1 > max_files)) then
  return {0, used, files}
end
local fields = {}
for i = 8, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('HSET', KEYS[2], id, size .. ' ' .. (now + ttl))
redis.call('PEXPIRE', KEYS[2], ttl)
return {1, used + size, files + 1}
