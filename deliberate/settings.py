"""The one settings object. Every field is an env var `DELIBERATE_<NAME>` and a CLI flag
`--<name>`; flags override env vars, which override the defaults here.

This module imports nothing of the project's, so `server/` and `coprocessor_worker/` may take
a `Settings` without depending on each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from coprocessor_worker.hardware import auto_dtype


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DELIBERATE_", extra="ignore")

    # --- models -----------------------------------------------------------------------------
    cache_dir: Path = Field(
        Path.home() / ".cache" / "deliberate",
        description="where the bundled decoder is prepared and other caches live",
    )
    model: Path | None = Field(
        None, description="Hugging Face decoder folder; default: the bundled SmolLM2-135M"
    )
    coprocessor: Path | None = Field(
        None, description="coprocessor checkpoint folder; default: the bundled one"
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="compute dtype; auto: bfloat16 on GPUs that have it (compute capability "
        ">= 8.0) and on CPUs with native bf16 (AVX512_BF16 or AMX), float16 on older GPUs, "
        "float32 on other CPUs (emulated bf16 is ~50x slower on AVX2)",
    )

    # --- store ------------------------------------------------------------------------------
    redis_url: str | None = Field(
        None,
        description="redis://, rediss://, redis+sentinel:// or redis+cluster:// URL; "
        "default: the in-memory store (one process)",
    )
    tenant: str = Field("default", description="tenant used when a request names none")
    payload_ttl_seconds: int = Field(7 * 24 * 3600, description="lifetime of a published payload")
    max_queue_length: int = Field(10_000, description="jobs the queue holds before refusing")
    visibility_timeout_seconds: float = Field(
        120.0, description="a job idle this long in a worker's hands is reclaimed"
    )
    max_deliveries: int = Field(3, description="deliveries before a job is dead-lettered")
    max_payload_bytes: int = Field(4 << 20, description="largest payload accepted")
    declined_ttl_seconds: int = Field(
        24 * 3600, description="a key the value check declined is not recomputed for this long"
    )
    lookup_timeout_seconds: float = Field(
        0.01, description="time budget of the store lookup on the request path"
    )
    store_max_connections: int = Field(
        32,
        ge=4,
        description="most connections to Redis per process (per node on a Cluster); callers "
        "wait for a free one within their time budget instead of opening more",
    )
    store_breaker_failures: int = Field(
        5,
        ge=0,
        description="consecutive store failures that open the circuit breaker (the store is "
        "then skipped, answered plainly, for the cool-down); 0: no breaker",
    )
    store_breaker_cooldown_seconds: float = Field(
        1.0, gt=0, description="how long an open circuit breaker skips the store"
    )
    payload_secret: SecretStr | None = Field(
        None,
        description="shared secret with which workers sign payloads and servers verify them "
        "(HMAC-SHA256), so a Redis writer without it cannot inject latents; env var only (a "
        "flag would show in the process list), or --payload-secret-file; default: unsigned",
    )
    payload_secret_file: Path | None = Field(
        None,
        description="file holding the payload secret (e.g. a mounted Kubernetes secret; "
        "surrounding whitespace ignored); instead of DELIBERATE_PAYLOAD_SECRET",
    )

    # --- decoder engine (vLLM) --------------------------------------------------------------
    max_model_len: int | None = Field(
        None,
        description="longest prompt + completion the engine takes; default: the model's (as vLLM)",
    )
    enforce_eager: bool = Field(
        False, description="skip torch.compile (much faster start, slower decoding)"
    )
    kv_cache_gib: int = Field(
        1, ge=1, description="KV cache size in GiB on the CPU backend (VLLM_CPU_KVCACHE_SPACE)"
    )
    gpu_memory_utilization: float = Field(
        0.5, description="fraction of device memory vLLM may use (also gates the CPU backend)"
    )
    served_model_name: str | None = Field(
        None,
        description="model name in the API; default: the decoder folder's name (vLLM's "
        "--served-model-name, which takes aliases too, overrides it)",
    )
    chat_template: str | None = Field(
        None,
        description="chat template (a file, or the template itself) instead of the "
        "tokenizer's, as vLLM's --chat-template",
    )

    enable_auto_tool_choice: bool = Field(
        False,
        description='answer tool_choice "auto" (the default when tools are given) by parsing '
        "the model's tool calls out of its output with --tool-call-parser, as vLLM's flag",
    )
    tool_call_parser: str | None = Field(
        None,
        description="vLLM's tool-call parser for the model's format (hermes, llama3_json, "
        "mistral, ...: any name vLLM registers), as vLLM's flag; needed by "
        "--enable-auto-tool-choice",
    )

    # --- server -----------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="address the server listens on")
    port: int = Field(8000, description="port the server listens on")
    api_keys: str = Field(
        "",
        description="comma-separated bearer API keys, each `key` or `key:tenant` (a bare key "
        "acts for --tenant; `key:*` may name any tenant); empty (and no --api-keys-file): "
        "no authentication",
    )
    api_keys_file: Path | None = Field(
        None,
        description="file of API keys, one `key [tenant]` per line (# comments), e.g. a "
        "mounted secret; merged with --api-keys",
    )
    metrics_key: str | None = Field(
        None,
        description="bearer token that may read /metrics only (Prometheus' scrape token); "
        "/metrics needs an API key or this token whenever either is configured",
    )
    docs: bool = Field(
        False, description="serve the API docs (/docs, /redoc, /openapi.json); off by default"
    )
    max_concurrent_requests: int = Field(
        256,
        ge=0,
        description="generation and pre-warm requests in progress at once; more are answered "
        "503 at once; 0: no limit",
    )
    min_context_tokens: int = Field(
        32, description="contexts shorter than this are not augmented (status too-short)"
    )
    max_context_tokens: int = Field(3072, description="longest context accepted, in tokens")
    max_request_bytes: int = Field(1 << 20, description="largest request body accepted")
    shutdown_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="on SIGTERM the server stops accepting connections and lets requests in "
        "progress (streams included) finish for this long, then cancels the rest (aborting "
        "their generation) and exits",
    )
    max_augment_wait_seconds: float = Field(
        30.0, description="cap on a request's bounded wait for a pending augmentation"
    )
    allow_unvalidated_coprocessor: bool = Field(
        False,
        description="apply latents even from a checkpoint whose recorded evaluation failed "
        "the quality gate (status otherwise: skipped-unvalidated)",
    )
    value_check: bool = Field(
        True,
        description="serve latents only where the workers' value check shows no harm: per "
        "tenant (else overall) running estimate's upper bound, and single contexts whose own "
        "figure is confidently harmful declined (status declined); off: serve every payload",
    )
    value_min_contexts: int = Field(
        20, ge=1, description="value-check figures needed before an estimate is trusted"
    )
    value_tolerance: float = Field(
        0.0,
        ge=0.0,
        description="largest perplexity change (0.005 = +0.5%) the estimate's upper bound may "
        "show while latents are served",
    )
    value_refresh_seconds: float = Field(
        2.0, gt=0, description="how long a server reuses a tenant's value-check verdict"
    )
    embedded_worker: bool | None = Field(
        None,
        description="run the worker loop inside the server; default: only with the in-memory store",
    )

    @model_validator(mode="after")
    def _auto_tools_need_a_parser(self) -> Settings:
        # As `vllm serve`: refused at start, not on the first request with tools.
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("--enable-auto-tool-choice requires --tool-call-parser")
        return self

    def compute_dtype(self) -> Literal["bfloat16", "float16", "float32"]:
        return auto_dtype() if self.dtype == "auto" else self.dtype

    def api_key_tenants(self) -> dict[str, str]:
        """API key -> the tenant it acts for ("*": any), from --api-keys and the file."""
        keys: dict[str, str] = {}
        entries = [e.strip() for e in self.api_keys.split(",") if e.strip()]
        pairs = [e.partition(":")[::2] for e in entries]
        if self.api_keys_file is not None:
            for n, line in enumerate(self.api_keys_file.read_text().splitlines(), 1):
                fields = line.split("#", 1)[0].split()
                if not fields:
                    continue
                if len(fields) > 2:
                    raise ValueError(
                        f"{self.api_keys_file}:{n}: expected `key [tenant]`, got {len(fields)} "
                        "fields"
                    )
                pairs.append((fields[0], fields[1] if len(fields) == 2 else ""))
        for key, tenant in pairs:
            key, tenant = key.strip(), tenant.strip()
            if not key:
                raise ValueError("an API key entry has an empty key")
            keys[key] = tenant or self.tenant
        return keys

    def payload_mac_key(self) -> bytes | None:
        """The payload secret from the env var or the file, as HMAC key bytes; None: off."""
        if self.payload_secret is not None and self.payload_secret_file is not None:
            raise ValueError("give the payload secret once: the env var or the file, not both")
        if self.payload_secret_file is not None:
            secret = self.payload_secret_file.read_text().strip()
            where = str(self.payload_secret_file)
        elif self.payload_secret is not None:
            secret = self.payload_secret.get_secret_value()
            where = "DELIBERATE_PAYLOAD_SECRET"
        else:
            return None
        # A short secret can be guessed offline from one signed payload.
        if len(secret) < 16:
            raise ValueError(f"the payload secret in {where} is shorter than 16 characters")
        return secret.encode()

    # --- worker -----------------------------------------------------------------------------
    worker_batch_max_jobs: int = Field(8, description="most jobs computed in one batch")
    worker_batch_max_tokens: int = Field(
        8192, description="most prefix tokens (padded) computed in one batch"
    )
    worker_claim_block_seconds: float = Field(
        1.0, description="how long one claim waits for new jobs"
    )
    worker_dead_consumer_seconds: float = Field(
        3600.0,
        gt=0,
        description="workers remove consumers of the group idle this long that hold no job "
        "(workers that stopped or restarted under a new name); checked every 10 minutes",
    )
    worker_host: str = Field("127.0.0.1", description="address of the worker's health port")
    worker_metrics_port: int = Field(
        9100, description="worker's /health, /ready and /metrics port; 0: none"
    )
    worker_consumer: str | None = Field(
        None, description="consumer name in the group; default: host name and pid"
    )
    torch_threads: int | None = Field(None, description="torch CPU threads; default: all cores")
