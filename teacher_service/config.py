"""Service settings: every default in one place, with the reason for it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

DEFAULT_PORT = 8000
"""vLLM's default port, so `--teacher_url http://127.0.0.1:8000` works against either server."""


class ServiceConfig(BaseModel):
    model: str = Field(description="Model directory (Hugging Face layout) to serve.")
    served_model_name: str | None = Field(
        default=None, description="Name in /v1/models; default: the directory's name."
    )
    engine: Literal["transformers"] = Field(
        default="transformers", description="Backend: transformers (embedded default, CPU or one GPU)."
    )
    host: str = Field(
        default="127.0.0.1", description="Loopback unless told otherwise: the API has no auth by default."
    )
    port: int = Field(default=DEFAULT_PORT, description="TCP port (vLLM's default, 8000).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weights dtype; auto takes the checkpoint's. Log-probs are always computed in fp32."
    )
    device: str = Field(default="cpu", description="torch device for the transformers engine.")
    max_top_k: int = Field(default=64, ge=1, description="GKD uses k of 8-64; larger k grows the frame linearly.")
    max_sequences: int = Field(default=512, ge=1, description="Sequences per request.")
    max_tokens: int = Field(default=131072, ge=2, description="Tokens per request, summed over sequences.")
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, description="Request body limit (413 above).")
    max_batch_tokens: int = Field(default=8192, ge=2, description="Padded tokens per forward pass (memory bound).")
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log verbosity.")
