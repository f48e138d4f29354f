"""One typed settings object for every redserve process.

Values come from (highest first) explicit keyword arguments (the CLI passes
its flags this way), environment variables prefixed ``REDSERVE_`` and the
defaults below. ``REDIS_URL`` is honoured as well, since that is the name
everyone already exports.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DispatchMethod = Literal["shortest_queue", "lottery"]
EventLoop = Literal["auto", "uvloop", "asyncio"]
#: The processes a setting concerns: each gets a flag for it (``redis``: every process that meets in Redis).
Role = Literal["redis", "worker", "gateway", "batch-runner"]


def _for(*roles: Role) -> dict[str, Any]:
    """A field's metadata: which processes take it as a flag (and its env var, as every field)."""
    return {"roles": list(roles)}


def fields_for(*roles: Role) -> list[str]:
    """The settings the given processes take, in declaration order: what the CLI makes flags of."""
    def concerns(extra: object) -> bool:
        named = extra.get("roles") if isinstance(extra, dict) else None
        return isinstance(named, list) and bool(set(roles) & set(named))

    return [name for name, f in Settings.model_fields.items() if concerns(f.json_schema_extra)]


class MissingRedisURL(ValueError):
    """A process that meets the others in Redis was started without saying where."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REDSERVE_", extra="ignore")

    # --- Redis -------------------------------------------------------------
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDSERVE_REDIS_URL", "REDIS_URL", "redis_url"),
        description="Redis to meet in (redis://, rediss://, redis+sentinel://, or redis+cluster://host:port,... "
                    "for Redis Cluster); unset means `redserve up` starts a private one.",
        json_schema_extra=_for("redis"),
    )
    batch_redis_url: str | None = Field(
        default=None,
        description="A plain Redis (or Sentinel) for the batch plane: arq's queue, files and OpenAI batches "
                    "(arq has no Cluster support). Unset: redis_url, which must then not be a cluster.",
        json_schema_extra=_for("redis"),
    )
    key_prefix: str = Field(
        default="redserve", description="Namespace of every key and channel.",
        json_schema_extra=_for("redis"),
    )
    event_loop: EventLoop = Field(
        default="auto", description="Event loop of every process: uvloop when installed (auto), or asyncio's own.",
        json_schema_extra=_for("redis"),
    )

    # --- workers -------------------------------------------------------------
    worker_ttl: float = Field(
        default=10.0, gt=0, description="Seconds a worker record lives without a heartbeat.",
        json_schema_extra=_for("worker"),
    )
    heartbeat_interval: float = Field(
        default=3.0, gt=0, description="Seconds between heartbeats.",
        json_schema_extra=_for("worker"),
    )
    max_concurrency: int = Field(
        default=8, ge=1, description="Jobs a worker runs at once.",
        json_schema_extra=_for("worker"),
    )
    max_queue: int = Field(
        default=0, ge=0,
        description="Jobs (running + waiting) a worker accepts before dispatch skips it; 0 = 4 x max_concurrency.",
        json_schema_extra=_for("worker"),
    )
    speed: float = Field(
        default=1.0, gt=0, description="Relative speed: shortest-queue dispatch divides this worker's queue by it, "
                                       "lottery dispatch weighs its odds by it.",
        json_schema_extra=_for("worker"),
    )
    drain_timeout: float = Field(
        default=60.0, ge=0, description="Seconds a draining worker waits for in-flight jobs.",
        json_schema_extra=_for("worker"),
    )
    model_path: str | None = Field(
        default=None, description="Local model directory for the hf and vllm engines (default: the model name).",
        json_schema_extra=_for("worker"),
    )
    lora: list[str] = Field(
        default_factory=list,
        description="LoRA adapters to serve beside the base model, each as its own model: NAME=PATH (a PEFT "
                    "adapter directory); hf engine.",
        json_schema_extra=_for("worker"),
    )
    device: str = Field(
        default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$",
        description="Where the hf engine runs the model: cpu, cuda, cuda:N, mps, or auto (the first GPU if there "
                    "is one; with accelerate installed, a model too big for one spreads over all of them).",
        json_schema_extra=_for("worker"),
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="The weights' dtype (hf and vllm engines); auto: what the checkpoint says.",
        json_schema_extra=_for("worker"),
    )
    max_model_len: int | None = Field(
        default=None, ge=1, description="Cap the context below the model's own (hf and vllm engines).",
        json_schema_extra=_for("worker"),
    )
    torch_threads: int | None = Field(
        default=None, ge=1,
        description="Intra-op threads of the hf engine's compute thread (default: torch's own, one per core). "
                    "Where the gateway, Redis or other workers share the CPUs, fewer can be faster.",
        json_schema_extra=_for("worker"),
    )
    load_in: Literal["8bit", "4bit"] | None = Field(
        default=None, description="Quantized loading on a GPU (hf engine; needs the bitsandbytes package).",
        json_schema_extra=_for("worker"),
    )
    vllm_engine_args: str | None = Field(
        default=None,
        description="JSON object of extra vLLM AsyncEngineArgs, e.g. '{\"gpu_memory_utilization\": 0.85}'.",
        json_schema_extra=_for("worker"),
    )
    api_config: str | None = Field(
        default=None, description="TOML file of upstreams for the openai engine.",
        json_schema_extra=_for("worker"),
    )
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="Port of a worker's Prometheus /metrics (0 = any free port).",
        json_schema_extra=_for("worker"),
    )
    echo_tokens: int = Field(
        default=16, ge=1, description="Tokens an echo worker produces when max_tokens allows.",
        json_schema_extra=_for("worker"),
    )
    echo_delay: float = Field(
        default=0.0, ge=0, description="Seconds between echo tokens.",
        json_schema_extra=_for("worker"),
    )
    chat_template: str | None = Field(
        default=None,
        description="The chat template to use instead of the model's own (or for a model that has none): a Jinja "
                    "file, or chatml, llama-2, vicuna, alpaca, mistral or zephyr.",
        json_schema_extra=_for("worker"),
    )
    tool_parser: str = Field(
        default="hermes",
        description="How this worker finds tool calls in a model's text under tool_choice auto: hermes "
                    "(<tool_call>{...}</tool_call>), llama3_json, mistral ([TOOL_CALLS][...]) or pythonic.",
        json_schema_extra=_for("worker"),
    )

    # --- dispatch and gateway ----------------------------------------------
    dispatch_method: DispatchMethod = Field(
        default="shortest_queue",
        description="How a gateway picks a worker: shortest queue (length / speed), or a lottery by speed.",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    gateway_processes: int = Field(
        default=1, ge=1,
        description="Gateway processes sharing one listening socket, each a whole gateway with its own reply "
                    "channel: spreads HTTP and SSE work over cores.",
        json_schema_extra=_for("gateway"),
    )
    reply_timeout: float = Field(
        default=60.0, gt=0, description="Seconds of worker silence before a request fails (504 / error event).",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    replay_window: float = Field(
        default=60.0, ge=0, description="Seconds a stream stays resumable after its last message; 0 = off.",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    max_attempts: int = Field(
        default=3, ge=1, description="Workers a job may die on before it is dead-lettered.",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    replica_acks: int = Field(
        default=0, ge=0,
        description="Replicas that must hold a dispatched job before the gateway relies on it (WAIT, up to "
                    "replica_ack_timeout); 0 = do not wait.",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    replica_ack_timeout: float = Field(
        default=0.5, gt=0, description="Seconds a dispatch waits for replica_acks before going on regardless.",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    redis_wait: float = Field(
        default=5.0, ge=0,
        description="Seconds a new request waits for Redis (and this gateway's reply subscription) to come back "
                    "before it is refused with 503.",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    orphan_grace: float = Field(
        default=3.0, gt=0,
        description="Seconds a worker keeps a job going while no gateway hears its replies (a gateway "
                    "reconnecting to Redis is not gone) before it stops the job.",
        json_schema_extra=_for("worker"),
    )
    resend_window: float = Field(
        default=30.0, ge=0,
        description="Seconds a worker keeps a finished job's replies to send again to a gateway that missed them.",
        json_schema_extra=_for("worker"),
    )
    outbox_max_bytes: int = Field(
        default=64 * 2**20, ge=1024,
        description="Reply bytes a worker holds while Redis is unreachable; past it the oldest jobs fail.",
        json_schema_extra=_for("worker"),
    )
    stream_buffer: int = Field(
        default=1024, ge=1, description="Reply messages buffered per request before a slow client is shed.",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    send_timeout: float = Field(
        default=30.0, gt=0, description="Seconds one SSE write may wait on a client before it is dropped.",
        json_schema_extra=_for("gateway"),
    )
    keepalive: float = Field(
        default=15.0, gt=0, description="Seconds a stream may be silent before it is sent an SSE comment (for "
        "proxies that cut idle connections).", json_schema_extra=_for("gateway"),
    )
    # --- security and limits (gateway) -----------------------------------------
    api_keys: list[str] = Field(
        default_factory=list, description="Accepted API keys; none = no authentication.",
        json_schema_extra=_for("gateway"),
    )
    api_keys_file: str | None = Field(
        default=None, description="File of accepted API keys, one per line.",
        json_schema_extra=_for("gateway"),
    )
    admin_api_keys: list[str] = Field(
        default_factory=list,
        description="Operators' keys: they see every tenant's files, batches and requests, and /metrics needs one.",
        json_schema_extra=_for("gateway"),
    )
    open_paths: list[str] = Field(
        default_factory=lambda: ["/health"],
        description="Routes reachable without an API key (e.g. /metrics for an unauthenticated scraper).",
        json_schema_extra=_for("gateway"),
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins a browser may call the API from (e.g. https://app.example.com, or * for any); "
                    "none by default.",
        json_schema_extra=_for("gateway"),
    )
    api_docs: bool = Field(
        default=True, description="Serve /docs, /redoc and /openapi.json (behind the API key when keys are set).",
        json_schema_extra=_for("gateway"),
    )
    rpm_limit: int = Field(
        default=0, ge=0, description="Requests per minute per API key, across all gateways; 0 = none.",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    tpm_limit: int = Field(
        default=0, ge=0,
        description="Tokens per minute per API key, across all gateways, reserved at admission (prompt estimate + "
                    "max_tokens) and settled to the true usage; 0 = none.",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    tpm_default_max_tokens: int = Field(
        default=1024, ge=1,
        description="Under a tpm_limit, max_tokens for a request that sets none (what its reservation holds).",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    max_in_flight_per_key: int = Field(
        default=256, ge=0, description="Requests one API key may have in flight on one gateway process; 0 = no cap.",
        json_schema_extra=_for("gateway"),
    )
    max_body_bytes: int = Field(
        default=4 * 2**20, ge=1024, description="Largest request body accepted.",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    max_prompt_chars: int = Field(
        default=1_000_000, ge=1, description="Longest prompt (all messages) in characters.",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    max_tokens_cap: int = Field(
        default=32_768, ge=1, description="Largest max_tokens a request may ask for.",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    max_messages: int = Field(
        default=1024, ge=1, description="Most messages in one chat request.",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    max_n: int = Field(
        default=16, ge=1, description="Most choices (n) in one request.",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    # --- batch jobs ------------------------------------------------------------
    batch_concurrency: int = Field(
        default=64, ge=1, description="Batch jobs one batch runner works on at once.",
        json_schema_extra=_for("batch-runner"),
    )
    batch_share: float = Field(
        default=0.75, gt=0,
        description="Batch jobs are dispatched only while some worker's queue is below this share of its "
                    "max_concurrency (at least 1 slot), so interactive requests keep the rest.",
        json_schema_extra=_for("batch-runner"),
    )
    batch_lease: float = Field(
        default=10.0, gt=0, description="Seconds a batch runner's claim on a job lasts unrenewed; a killed "
                                        "runner's jobs run again after it.",
        json_schema_extra=_for("batch-runner"),
    )
    batch_max_file_bytes: int = Field(
        default=32 * 2**20, ge=1024, description="Largest file /v1/files stores.",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    tenant_max_bytes: int = Field(
        default=256 * 2**20, ge=0,
        description="Bytes of files (uploads and batch output) one tenant may keep stored; 0 = no quota.",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    tenant_max_files: int = Field(
        default=100, ge=0, description="Files one tenant may keep stored; 0 = no quota.",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    max_concurrent_uploads: int = Field(
        default=2, ge=1, description="File uploads one gateway process stores at once (each is held in memory).",
        json_schema_extra=_for("gateway"),
    )
    votes_max_entries: int = Field(
        default=100_000, ge=1, description="Votes kept in the votes stream; older ones are trimmed.",
        json_schema_extra=_for("gateway"),
    )
    arena_models: list[str] = Field(
        default_factory=list, description="Models the arena draws battles from (default: every live model).",
        json_schema_extra=_for("gateway"),
    )
    arena_exclude: list[str] = Field(
        default_factory=list, description="Models the arena never draws (embeddings models, say).",
        json_schema_extra=_for("gateway"),
    )
    arena_battle_ttl: float = Field(
        default=86_400.0, gt=0, description="Seconds an arena battle is kept after its last turn or vote.",
        json_schema_extra=_for("gateway"),
    )
    log_conversations: bool = Field(
        default=False, description="Log each chat and completion request with its reply, timings and hashed API "
                                   "key to the conversations stream (never the key itself).",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    conversations_max_entries: int = Field(
        default=100_000, ge=1, description="Conversations kept in the log; older ones are trimmed.",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    moderation: bool = Field(
        default=False, description="Refuse flagged prompts (400, code content_filter) using --moderation-rules "
                                   "and/or --moderation-url.",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    moderation_rules: str | None = Field(
        default=None, description="Moderation rules file: a word or phrase per line, `re:REGEX` for a regex, an "
                                  "optional `[category]` prefix, `#` comments.",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    moderation_url: str | None = Field(
        default=None, description="An OpenAI-compatible moderations endpoint (https://host/v1/moderations) asked "
                                  "about every prompt; unreachable, it fails requests closed (503).",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    moderation_api_key: str | None = Field(
        default=None, description="Bearer key for --moderation-url.",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    batch_max_requests: int = Field(
        default=50_000, ge=1, description="Most requests in one batch.",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    batch_ttl: float = Field(
        default=7 * 86400.0, gt=0, description="Seconds files, batches and job results stay in Redis.",
        json_schema_extra=_for("gateway", "batch-runner"),
    )
    host: str = Field(
        default="127.0.0.1", description="Address to listen on (a gateway's HTTP, a worker's metrics).",
        json_schema_extra=_for("worker", "gateway"),
    )
    port: int = Field(default=8000, ge=0, le=65535, json_schema_extra=_for("gateway"))

    @field_validator("redis_url", "batch_redis_url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        from broker.connection import cluster_client, is_cluster_url, sentinel_target  # a bad URL is said at once

        if url and is_cluster_url(url):
            cluster_client(url)  # parses only: it connects on first use
        elif url:
            sentinel_target(url)
        return url

    def batch_url(self, redis_url: str) -> str | None:
        """Where the batch plane lives: ``batch_redis_url``, else ``redis_url`` unless that is a cluster (None:
        there is no batch plane, and the batch API says so)."""
        from broker.connection import is_cluster_url

        if self.batch_redis_url:
            if is_cluster_url(self.batch_redis_url):
                raise ValueError("batch_redis_url must be a plain Redis or Sentinel URL: arq has no Cluster support")
            return self.batch_redis_url
        return None if is_cluster_url(redis_url) else redis_url

    def required_batch_url(self, redis_url: str) -> str:
        """``batch_url``, for the processes that cannot work without it (a batch runner, ``redserve batch``)."""
        url = self.batch_url(redis_url)
        if url is None:
            raise MissingRedisURL("redis_url is a Redis Cluster, which arq (the batch queue) does not support: "
                                  "set --batch-redis-url (or REDSERVE_BATCH_REDIS_URL) to a plain Redis")
        return url

    def resolved_redis_url(self) -> str:
        """``redis_url``, required: every process but ``redserve up`` (which starts a private Redis) needs one.
        The edges (the CLI, the arq entry point) resolve it once and hand it to what they build."""
        if not self.redis_url:
            raise MissingRedisURL("set --redis-url or REDIS_URL (only `redserve up` starts a private Redis)")
        return self.redis_url

    def to_env(self) -> dict[str, str]:
        """These settings as environment variables, for child processes."""
        return {f"REDSERVE_{k.upper()}": json.dumps(v) if isinstance(v, (list, dict)) else str(v)
                for k, v in self.model_dump().items() if v is not None}
