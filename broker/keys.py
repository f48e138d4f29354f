"""Every Redis key and channel name redserve uses, built in this one module.

``docs/redis.md`` documents each of them with the ``redis-cli`` commands that
inspect it. Names read naturally in ``redis-cli --scan``: ``redserve:worker:<id>``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The consumer group every worker stream carries (the consumer is the worker id).
WORKER_GROUP = "workers"


@dataclass(frozen=True)
class Keys:
    """Key builder bound to one namespace prefix (so test runs and stacks can share a server)."""

    prefix: str = "redserve"

    # --- workers -------------------------------------------------------------
    def worker(self, worker_id: str) -> str:
        """Hash with a TTL: the worker's record; its existence *is* liveness."""
        return f"{self.prefix}:worker:{worker_id}"

    def worker_jobs(self, worker_id: str) -> str:
        """Stream of jobs for one worker, read through the consumer group ``workers``."""
        return f"{self.prefix}:worker:{worker_id}:jobs"

    def worker_control(self, worker_id: str) -> str:
        """Pub/sub channel a worker listens on for cancellations."""
        return f"{self.prefix}:worker:{worker_id}:control"

    def workers(self) -> str:
        """Set of worker ids that have registered; dead ids are pruned by readers."""
        return f"{self.prefix}:workers"

    # --- models --------------------------------------------------------------
    def model_workers(self, model: str) -> str:
        """Sorted set: member = worker id serving ``model``, score = its queue length."""
        return f"{self.prefix}:model:{model}:workers"

    def models(self) -> str:
        """Sorted set: member = model name, score = last time (ms) a worker announced it."""
        return f"{self.prefix}:models"

    # --- requests ------------------------------------------------------------
    def request(self, request_id: str) -> str:
        """Hash with a TTL: ``worker`` (where the request was last dispatched, for cancel and inspect), ``owner``."""
        return f"{self.prefix}:request:{request_id}"

    def replay(self, request_id: str) -> str:
        """Stream with a TTL: a request's reply messages (a ``meta``/``owner`` entry first), for resuming streams."""
        return f"{self.prefix}:replay:{request_id}"

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
        return f"{self.prefix}:arena:battle:{battle_id}"

    def battle_turn(self, battle_id: str) -> str:
        """String with a TTL: a battle's turn is under way (no second turn, and no vote, until it ends)."""
        return f"{self.prefix}:arena:battle:{battle_id}:turn"

    def arena_votes(self) -> str:
        """Stream of anonymous battle votes, one readable entry per vote: what the leaderboard is computed from."""
        return f"{self.prefix}:arena:votes"

    def leaderboard(self) -> str:
        """Hash: the leaderboard's running state (outcome counts per pair, online Elo, votes per model) and
        ``last_id``, the last vote folded in."""
        return f"{self.prefix}:arena:leaderboard"

    def leaderboard_lock(self) -> str:
        """String with a TTL: which gateway is folding new votes into the leaderboard now."""
        return f"{self.prefix}:arena:leaderboard:lock"

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
    # A worker's models (and a chosen worker's id) are only known inside the
    # Lua scripts, so they build those names from these pieces.
    def model_workers_parts(self) -> tuple[str, str]:
        """(prefix, suffix) such that prefix + model + suffix == model_workers(model)."""
        return f"{self.prefix}:model:", ":workers"

    def worker_control_parts(self) -> tuple[str, str]:
        """(prefix, suffix): prefix + id + suffix == worker_control(id)."""
        return f"{self.prefix}:worker:", ":control"

    def worker_parts(self) -> tuple[str, str]:
        """(prefix, jobs suffix): prefix + id == worker(id), and + suffix == worker_jobs(id)."""
        return f"{self.prefix}:worker:", ":jobs"
