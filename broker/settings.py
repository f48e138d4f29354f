"""One typed settings object for every redserve process.

Values come from (highest first) explicit keyword arguments (the CLI passes
its flags this way), environment variables prefixed ``REDSERVE_`` and the
defaults below. ``REDIS_URL`` is honoured as well, since that is the name
everyone already exports.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DispatchMethod = Literal["shortest_queue", "lottery"]
EventLoop = Literal["auto", "uvloop", "asyncio"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REDSERVE_", extra="ignore")

    # --- Redis -------------------------------------------------------------
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDSERVE_REDIS_URL", "REDIS_URL", "redis_url"),
        description="Redis to meet in; unset means `redserve up` starts a private one.",
    )
    key_prefix: str = Field(default="redserve", description="Namespace of every key and channel.")
    event_loop: EventLoop = Field(
        default="auto", description="Event loop of every process: uvloop when installed (auto), or asyncio's own."
    )

    # --- workers -------------------------------------------------------------
    worker_ttl: float = Field(default=10.0, gt=0, description="Seconds a worker record lives without a heartbeat.")
    heartbeat_interval: float = Field(default=3.0, gt=0, description="Seconds between heartbeats.")
    max_concurrency: int = Field(default=8, ge=1, description="Jobs a worker runs at once.")
    max_queue: int = Field(
        default=0, ge=0,
        description="Jobs (running + waiting) a worker accepts before dispatch skips it; 0 = 4 x max_concurrency.",
    )
    speed: float = Field(default=1.0, gt=0, description="Relative speed, the weight of lottery dispatch.")
    drain_timeout: float = Field(default=60.0, ge=0, description="Seconds a draining worker waits for in-flight jobs.")
    model_path: str | None = Field(
        default=None, description="Local model directory for the hf and vllm engines (default: the model name)."
    )
    vllm_engine_args: str | None = Field(
        default=None,
        description="JSON object of extra vLLM AsyncEngineArgs, e.g. '{\"gpu_memory_utilization\": 0.85}'.",
    )
    api_config: str | None = Field(default=None, description="TOML file of upstreams for the openai engine.")
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="Port of a worker's Prometheus /metrics (0 = any free port)."
    )
    echo_tokens: int = Field(default=16, ge=1, description="Tokens an echo worker produces when max_tokens allows.")
    echo_delay: float = Field(default=0.0, ge=0, description="Seconds between echo tokens.")

    # --- dispatch and gateway ----------------------------------------------
    dispatch_method: DispatchMethod = "shortest_queue"
    gateway_processes: int = Field(
        default=1, ge=1,
        description="Gateway processes sharing one listening socket, each a whole gateway with its own reply "
                    "channel: spreads HTTP and SSE work over cores.",
    )
    reply_timeout: float = Field(
        default=60.0, gt=0, description="Seconds of worker silence before a request fails (504 / error event)."
    )
    replay_window: float = Field(
        default=60.0, ge=0, description="Seconds a stream stays resumable after its last message; 0 = off."
    )
    max_attempts: int = Field(
        default=3, ge=1, description="Workers a job may die on before it is dead-lettered."
    )
    replica_acks: int = Field(
        default=0, ge=0,
        description="Replicas that must hold a dispatched job before the gateway relies on it (WAIT, up to "
                    "replica_ack_timeout); 0 = do not wait.",
    )
    replica_ack_timeout: float = Field(
        default=0.5, gt=0, description="Seconds a dispatch waits for replica_acks before going on regardless."
    )
    redis_wait: float = Field(
        default=5.0, ge=0,
        description="Seconds a new request waits for Redis (and this gateway's reply subscription) to come back "
                    "before it is refused with 503.",
    )
    orphan_grace: float = Field(
        default=3.0, gt=0,
        description="Seconds a worker keeps a job going while no gateway hears its replies (a gateway "
                    "reconnecting to Redis is not gone) before it stops the job.",
    )
    resend_window: float = Field(
        default=30.0, ge=0,
        description="Seconds a worker keeps a finished job's replies to send again to a gateway that missed them.",
    )
    outbox_max_bytes: int = Field(
        default=64 * 2**20, ge=1024,
        description="Reply bytes a worker holds while Redis is unreachable; past it the oldest jobs fail.",
    )
    stream_buffer: int = Field(
        default=1024, ge=1, description="Reply messages buffered per request before a slow client is shed."
    )
    send_timeout: float = Field(
        default=30.0, gt=0, description="Seconds one SSE write may wait on a client before it is dropped."
    )
    # --- security and limits (gateway) -----------------------------------------
    api_keys: list[str] = Field(
        default_factory=list, description="Accepted API keys; none = no authentication."
    )
    api_keys_file: str | None = Field(default=None, description="File of accepted API keys, one per line.")
    admin_api_keys: list[str] = Field(
        default_factory=list,
        description="Operators' keys: they see every tenant's files, batches and requests, and /metrics needs one.",
    )
    open_paths: list[str] = Field(
        default_factory=lambda: ["/health"],
        description="Routes reachable without an API key (e.g. /metrics for an unauthenticated scraper).",
    )
    api_docs: bool = Field(
        default=True, description="Serve /docs, /redoc and /openapi.json (behind the API key when keys are set)."
    )
    rpm_limit: int = Field(default=0, ge=0, description="Requests per minute per API key, across all gateways; 0 = none.")
    tpm_limit: int = Field(
        default=0, ge=0,
        description="Tokens per minute per API key, across all gateways, reserved at admission (prompt estimate + "
                    "max_tokens) and settled to the true usage; 0 = none.",
    )
    tpm_default_max_tokens: int = Field(
        default=1024, ge=1,
        description="Under a tpm_limit, max_tokens for a request that sets none (what its reservation holds).",
    )
    max_in_flight_per_key: int = Field(
        default=256, ge=0, description="Requests one API key may have in flight on one gateway process; 0 = no cap."
    )
    max_body_bytes: int = Field(default=4 * 2**20, ge=1024, description="Largest request body accepted.")
    max_prompt_chars: int = Field(default=1_000_000, ge=1, description="Longest prompt (all messages) in characters.")
    max_tokens_cap: int = Field(default=32_768, ge=1, description="Largest max_tokens a request may ask for.")
    max_messages: int = Field(default=1024, ge=1, description="Most messages in one chat request.")
    max_n: int = Field(default=16, ge=1, description="Most choices (n) in one request.")
    # --- batch jobs ------------------------------------------------------------
    batch_concurrency: int = Field(default=64, ge=1, description="Batch jobs one batch runner works on at once.")
    batch_share: float = Field(
        default=0.75, gt=0,
        description="Batch jobs are dispatched only while some worker's queue is below this share of its "
                    "max_concurrency (at least 1 slot), so interactive requests keep the rest.",
    )
    batch_lease: float = Field(
        default=10.0, gt=0, description="Seconds a batch runner's claim on a job lasts unrenewed; a killed "
                                        "runner's jobs run again after it.",
    )
    batch_max_file_bytes: int = Field(default=32 * 2**20, ge=1024, description="Largest file /v1/files stores.")
    tenant_max_bytes: int = Field(
        default=256 * 2**20, ge=0,
        description="Bytes of files (uploads and batch output) one tenant may keep stored; 0 = no quota.",
    )
    tenant_max_files: int = Field(default=100, ge=0, description="Files one tenant may keep stored; 0 = no quota.")
    max_concurrent_uploads: int = Field(
        default=2, ge=1, description="File uploads one gateway process stores at once (each is held in memory)."
    )
    votes_max_entries: int = Field(
        default=100_000, ge=1, description="Votes kept in the votes stream; older ones are trimmed."
    )
    batch_max_requests: int = Field(default=50_000, ge=1, description="Most requests in one batch.")
    batch_ttl: float = Field(
        default=7 * 86400.0, gt=0, description="Seconds files, batches and job results stay in Redis."
    )
    host: str = Field(default="127.0.0.1", description="Address to listen on (a gateway's HTTP, a worker's metrics).")
    port: int = Field(default=8000, ge=0, le=65535)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        from broker.connection import sentinel_target  # a bad Sentinel URL is a settings error, said at once

        if url:
            sentinel_target(url)
        return url

    def to_env(self) -> dict[str, str]:
        """These settings as environment variables, for child processes."""
        return {f"REDSERVE_{k.upper()}": json.dumps(v) if isinstance(v, (list, dict)) else str(v)
                for k, v in self.model_dump().items() if v is not None}
