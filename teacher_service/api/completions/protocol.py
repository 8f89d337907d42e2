"""The vLLM/OpenAI request shapes this scoring teacher accepts (pydantic only; unknown fields are ignored)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CompletionRequest(BaseModel):
    """The subset of the OpenAI/vLLM completions request a scoring teacher needs; other fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="Text or token ids, one or many.")
    max_tokens: int | None = Field(default=None, ge=0)
    prompt_logprobs: int | None = Field(default=None, ge=-1)
    n: int = 1
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class TokenizeRequest(BaseModel):
    """vLLM's `/tokenize` request (completion form), so a client can check the tokenizer the way it checks vLLM."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
