"""Every Redis key and channel name redserve uses, built in this one module.

``docs/redis.md`` documents each of them with the ``redis-cli`` commands that
inspect it. Names read naturally in ``redis-cli --scan``: ``redserve:worker:<id>``.

**Hash tags, so one dispatch is one slot on Redis Cluster.** What a dispatch
reads and writes (the model's load set, its workers' seats, the chosen
worker's job stream for the model, the request's hash and replay log) shares
one hash tag, ``{<model tag>}``: four hex digits of a hash of the model name.
A request id *begins* with its model's tag, so whoever holds only the id
(cancel, resume, inspect) builds the same slot's names. Different models, and
the gateways' reply channels (named by gateway id, untagged), spread over the
slots. Keys no script combines carry no tag. On a single Redis the braces are
just characters in a name.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

#: The consumer group every worker stream carries (the consumer is the worker id).
WORKER_GROUP = "workers"
#: Hex digits of a model's slot tag (and so the first characters of its request ids).
TAG_LENGTH = 4


def model_tag(model: str) -> str:
    """The hash tag every key of ``model``'s dispatch carries: stable, spread evenly over the slots."""
    return hashlib.blake2b(model.encode(), digest_size=TAG_LENGTH // 2).hexdigest()


def request_tag(request_id: str) -> str:
    """A request's tag: the first characters of its id (its model's tag, see ``broker.ids.new_request_id``)."""
    return request_id[:TAG_LENGTH]


@dataclass(frozen=True)
class Keys:
    """Key builder bound to one namespace prefix (so test runs and stacks can share a server)."""

    prefix: str = "redserve"

    # --- workers -------------------------------------------------------------
    def worker(self, worker_id: str) -> str:
        """Hash with a TTL: the worker's record; its existence *is* liveness."""
        return f"{self.prefix}:worker:{worker_id}"

    def worker_control(self, worker_id: str) -> str:
        """Pub/sub channel (sharded on a cluster) a worker listens on for cancellations and resend requests."""
        return f"{self.prefix}:worker:{worker_id}:control"

    def workers(self) -> str:
        """Hash: every registered worker id -> its models (comma-separated), so the janitor finds a dead
        worker's job streams after its record expired; the janitor removes the id once they are reclaimed."""
        return f"{self.prefix}:workers"

    # --- models (one slot per model: see the module docstring) ----------------
    def model_workers(self, model: str) -> str:
        """Sorted set: member = worker id serving ``model``, score = its queue of this model."""
        return f"{self.prefix}:{{{model_tag(model)}}}:model:{model}:workers"

    def seat(self, model: str, worker_id: str) -> str:
        """Hash with the worker's TTL: what dispatch needs of one worker of ``model`` (status, speed, caps, and
        ``others``: its queue of its other models), in the model's slot."""
        return f"{self.seat_prefix(model)}{worker_id}"

    def jobs(self, model: str, worker_id: str) -> str:
        """Stream of one worker's jobs of ``model``, read through the consumer group ``workers``."""
        return f"{self.jobs_prefix(model)}{worker_id}"

    def model_seen(self, model: str) -> str:
        """String with a TTL: when (ms) a worker last announced ``model`` (dispatch tells 404 from 503 by it)."""
        return f"{self.prefix}:{{{model_tag(model)}}}:model:{model}:seen"

    def models(self) -> str:
        """Sorted set: member = model name, score = last time (ms) a worker announced it (for listing)."""
        return f"{self.prefix}:models"

    # --- requests (in their model's slot: the id begins with the tag) ----------
    def request(self, request_id: str) -> str:
        """Hash with a TTL: ``worker`` and ``model`` (where the request was last dispatched, for cancel and
        inspect), ``owner``."""
        return f"{self.prefix}:{{{request_tag(request_id)}}}:request:{request_id}"

    def replay(self, request_id: str) -> str:
        """Stream with a TTL: a request's reply messages (a ``meta``/``owner`` entry first), for resuming streams."""
        return f"{self.prefix}:{{{request_tag(request_id)}}}:replay:{request_id}"

    def dead_letters(self) -> str:
        """Stream of jobs that failed ``max_attempts`` times, with the reason."""
        return f"{self.prefix}:deadletter"

    def reclaim_lock(self, worker_id: str) -> str:
        """String with a TTL: which janitor is reclaiming a dead worker's stream."""
        return f"{self.prefix}:reclaim:{worker_id}"

    # --- API keys ----------------------------------------------------------
    def rate(self, tenant: str, minute: int, what: str) -> str:
        """Counter with a TTL: a tenant's ``requests`` or ``tokens`` (reserved, then settled) in one clock minute."""
        return f"{self.prefix}:rate:{tenant}:{minute}:{what}"

    def tenant_batches(self, tenant: str) -> str:
        """Sorted set: one tenant's OpenAI batch ids, score = created_at (ms), for listing its own newest first."""
        return f"{self.prefix}:tenant:{tenant}:batches"

    def tenant_files(self, tenant: str) -> str:
        """Hash: one tenant's stored files, field = file id, value = ``<bytes> <expires ms>``, for its quota."""
        return f"{self.prefix}:tenant:{tenant}:files"

    # --- replies -------------------------------------------------------------
    def replies(self, gateway_id: str) -> str:
        """Pub/sub channel carrying token deltas back to one gateway process."""
        return f"{self.prefix}:replies:{gateway_id}"

    # --- web UI --------------------------------------------------------------
    def votes(self) -> str:
        """Stream of side-by-side votes cast in the web UI, one readable entry per vote."""
        return f"{self.prefix}:votes"

    def feedback(self) -> str:
        """Stream of feedback on single-chat replies (up, down, flag), each with the conversation it judges."""
        return f"{self.prefix}:feedback"

    def conversations(self) -> str:
        """Stream (opt-in, ``--log-conversations``): each chat or completion request with its reply and timings."""
        return f"{self.prefix}:conversations"

    # --- the arena -------------------------------------------------------------
    def battle(self, battle_id: str) -> str:
        """Hash with a TTL: one anonymous battle (both models, each side's turns, state, the vote once cast)."""
        return f"{self.prefix}:{{arena}}:battle:{battle_id}"

    def battle_turn(self, battle_id: str) -> str:
        """String with a TTL: a battle's turn is under way (no second turn, and no vote, until it ends)."""
        return f"{self.prefix}:{{arena}}:battle:{battle_id}:turn"

    def arena_votes(self) -> str:
        """Stream of anonymous battle votes, one readable entry per vote: what the leaderboard is computed from."""
        return f"{self.prefix}:{{arena}}:votes"

    def leaderboard(self) -> str:
        """Hash: the leaderboard's running state (outcome counts per pair, online Elo, votes per model) and
        ``last_id``, the last vote folded in."""
        return f"{self.prefix}:{{arena}}:leaderboard"

    def leaderboard_lock(self) -> str:
        """String with a TTL: which gateway is folding new votes into the leaderboard now."""
        return f"{self.prefix}:{{arena}}:leaderboard:lock"

    # --- batch jobs ----------------------------------------------------------
    def batch_queue(self) -> str:
        """Sorted set: arq's queue of batch jobs (member = job id, score = when it may run, ms)."""
        return f"{self.prefix}:batch:queue"

    def batch_runner_health(self) -> str:
        """String with a TTL: the live batch runners' last health line (arq's health check key)."""
        return f"{self.prefix}:batch:queue:health-check"

    def batch_job_result(self, job_id: str) -> str:
        """String with a TTL: a Python API job's one stored result (msgpack ``{status_code, body}``)."""
        return f"{self.prefix}:batch:result:{job_id}"

    def batch(self, batch_id: str) -> str:
        """Hash with a TTL: one OpenAI batch (status, timestamps, request counts, file ids, owner)."""
        return f"{self.prefix}:batch:{batch_id}"

    def batch_results(self, batch_id: str) -> str:
        """Hash with a TTL: an OpenAI batch's output lines so far, field = request index, set exactly once."""
        return f"{self.prefix}:batch:{batch_id}:results"

    def batches(self) -> str:
        """Sorted set: every OpenAI batch id, score = created_at (ms), for listing newest first."""
        return f"{self.prefix}:batches"

    def file(self, file_id: str) -> str:
        """Hash with a TTL: an uploaded or generated file (``content``, ``owner`` and OpenAI's file fields)."""
        return f"{self.prefix}:file:{file_id}"

    # --- pieces for Lua -----------------------------------------------------
    # The dispatch script learns its candidates' ids from the load set, so it
    # builds their seat and stream names from these prefixes (same slot).
    def seat_prefix(self, model: str) -> str:
        """prefix + worker id == seat(model, worker id)."""
        return f"{self.prefix}:{{{model_tag(model)}}}:model:{model}:seat:"

    def jobs_prefix(self, model: str) -> str:
        """prefix + worker id == jobs(model, worker id)."""
        return f"{self.prefix}:{{{model_tag(model)}}}:model:{model}:jobs:"
