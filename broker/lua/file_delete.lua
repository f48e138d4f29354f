-- Delete one file and give its bytes back to its owner's quota.
--
-- KEYS[1] the file (hash)   KEYS[2] its owner's files (hash, see file_store.lua)
-- ARGV    file id, the owner KEYS[2] belongs to (read by the caller, which
--         decided the asking tenant may delete it)
-- Returns 1 when deleted, 0 when the file is gone (or changed hands) meanwhile.
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
