-- Pick a worker for one job and hand it the job, atomically.
--
-- KEYS[1]  sorted set of the model's workers (score = its queue of the model)
-- KEYS[2]  the model's ``seen`` string (to tell "unknown model" from "no worker")
-- KEYS[3]  the request's hash (worker, model, owner), for cancel and inspect
-- KEYS[4]  the request's replay log (stream), started with a ``meta`` entry
--          that also names its owner
-- ARGV     method, random in [0,1), the model's seat prefix and job stream
--          prefix (+ worker id = that worker's seat / stream of this model),
--          model name, request key TTL (ms),
--          source stream and entry id ("" unless moving a job off a dead
--          worker), replay TTL (ms, 0 = no log) and the meta blob, the
--          owning tenant ("" keeps the owner already recorded: a re-dispatch),
--          the job's attempt, the batch share (0 = an interactive job), then
--          the job's stream fields as name/value pairs.
--
-- Every key it touches, the ones built from the prefixes too, carries the
-- model's hash tag: on Redis Cluster the whole step is one slot.
--
-- ``shortest_queue`` picks the least queue length divided by speed (ties at
-- random); ``lottery`` draws with odds proportional to speed. The queue a
-- worker is ranked by is the model's own (its score); the limits (max_queue,
-- the batch share) hold the worker's whole queue, this model's score plus
-- ``others`` (its queue of its other models, as its last heartbeat counted
-- them), since its slots serve every model it has.
-- Workers whose seat has expired are pruned from the set; draining workers
-- and workers whose queue is at their max_queue are skipped. A batch job (a
-- share > 0) only goes where the queue is under share x max_concurrency (at
-- least one slot), so interactive jobs always find the rest; this is the one
-- home of that rule, and the check and the placement are one atomic step. When moving, the
-- source entry is deleted in the same step, so two janitors can never both
-- move it (the loser gets GONE).
-- Idempotent: the same attempt of a request dispatched again (a reply lost
-- on a dropped connection, and the caller retried) returns the placement it
-- already has instead of queueing the job twice.
-- Returns {worker_id, entry_id, queue_length} or an error reply whose first
-- word is UNKNOWN_MODEL, NO_WORKER, BUSY, NO_ROOM (no batch room now) or GONE.
local method, r = ARGV[1], tonumber(ARGV[2])
local seats, jobs, model = ARGV[3], ARGV[4], ARGV[5]

if ARGV[7] == '' then
  local placed = redis.call('HMGET', KEYS[3], 'attempt', 'worker', 'entry')
  if placed[1] == ARGV[12] and placed[2] then return {placed[2], placed[3] or '', '0'} end
end

local share = tonumber(ARGV[13])
local members = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local ids, queues, speeds = {}, {}, {}
local ready = 0
for i = 1, #members, 2 do
  local wid = members[i]
  local rec = redis.call('HMGET', seats .. wid, 'status', 'speed', 'max_queue', 'max_concurrency', 'others')
  if not rec[1] then
    redis.call('ZREM', KEYS[1], wid)
  elseif rec[1] == 'ready' then
    ready = ready + 1
    local q = tonumber(members[i + 1])
    local total = q + (tonumber(rec[5]) or 0)
    local cap = tonumber(rec[3]) or 0
    if share > 0 then  -- a batch job: its share of the slots, and never past max_queue either
      local room = math.max(1, math.floor((tonumber(rec[4]) or 1) * share))
      if cap <= 0 or room < cap then cap = room end
    end
    if cap <= 0 or total < cap then
      ids[#ids + 1] = wid
      queues[#queues + 1] = q
      speeds[#speeds + 1] = tonumber(rec[2]) or 1
    end
  end
end

if #ids == 0 then
  if ready > 0 and share > 0 then return redis.error_reply('NO_ROOM no worker of ' .. model .. ' has room for batch work now') end
  if ready > 0 then return redis.error_reply('BUSY every worker of ' .. model .. ' is at its queue limit') end
  if #members == 0 and redis.call('EXISTS', KEYS[2]) == 0 then
    return redis.error_reply('UNKNOWN_MODEL ' .. model)
  end
  return redis.error_reply('NO_WORKER no live worker serves ' .. model)
end

local pick
if method == 'lottery' then
  local total = 0
  for i = 1, #speeds do total = total + speeds[i] end
  local x = r * total
  pick = #ids
  for i = 1, #speeds do
    x = x - speeds[i]
    if x < 0 then pick = i break end
  end
else  -- shortest queue, in time: the queue a worker of speed s works through is q / s long (FastChat's rule)
  local best = math.huge
  local loads = {}
  for i = 1, #queues do
    loads[i] = queues[i] / math.max(speeds[i], 1e-9)
    if loads[i] < best then best = loads[i] end
  end
  local ties = {}
  for i = 1, #loads do if loads[i] <= best + 1e-9 then ties[#ties + 1] = i end end
  pick = ties[math.min(#ties, math.floor(r * #ties) + 1)]
end

local wid = ids[pick]
if ARGV[7] ~= '' and redis.call('XDEL', ARGV[7], ARGV[8]) == 0 then
  return redis.error_reply('GONE the job was already moved')
end
redis.call('ZADD', KEYS[1], 'XX', 'INCR', 1, wid)
local fields = {}
for i = 14, #ARGV do fields[#fields + 1] = ARGV[i] end
if tonumber(ARGV[9]) > 0 and redis.call('EXISTS', KEYS[4]) == 0 then
  redis.call('XADD', KEYS[4], '*', 'meta', ARGV[10], 'owner', ARGV[11])
  redis.call('PEXPIRE', KEYS[4], ARGV[9])
end
local entry = redis.call('XADD', jobs .. wid, '*', unpack(fields))
redis.call('HSET', KEYS[3], 'worker', wid, 'model', model, 'attempt', ARGV[12], 'entry', entry)
if ARGV[11] ~= '' then redis.call('HSET', KEYS[3], 'owner', ARGV[11]) end
redis.call('PEXPIRE', KEYS[3], ARGV[6])
return {wid, entry, tostring(queues[pick] + 1)}
