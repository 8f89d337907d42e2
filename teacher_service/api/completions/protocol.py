"""The vLLM/OpenAI request shapes this teacher accepts (pydantic only; unknown fields are ignored)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MAX_TOKENS = 16
"""vLLM's (and OpenAI's) default when ``max_tokens`` is absent or null."""


class CompletionRequest(BaseModel):
    """The subset of the OpenAI/vLLM completions request this teacher serves: scoring (``prompt_logprobs``) and
    generation (``max_tokens`` > 1). Fields it cannot honour are refused (:meth:`unsupported`) when set to
    anything but their neutral value; fields it does not know are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="Text or token ids, one or many.")
    max_tokens: int | None = Field(default=None, ge=0)
    prompt_logprobs: int | None = Field(default=None, ge=-1)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    # generation, with vLLM's names, defaults and ranges
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    return_token_ids: bool | None = None
    # refused unless neutral: no silent difference from vLLM
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    use_beam_search: bool = False
    best_of: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    min_tokens: int = 0
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None

    @property
    def max_new_tokens(self) -> int:
        return DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported(self) -> str | None:
        """The first field set to a value this teacher does not implement (None: all served)."""
        neutral = {
            "logprobs": (None,),
            "echo": (None, False),
            "suffix": (None, ""),
            "use_beam_search": (False,),
            "best_of": (None, self.n),
            "presence_penalty": (None, 0.0),
            "frequency_penalty": (None, 0.0),
            "repetition_penalty": (None, 1.0),
            "min_p": (None, 0.0),
            "min_tokens": (0,),
            "logit_bias": (None, {}),
            "allowed_token_ids": (None,),
            "bad_words": (None, []),
        }
        return next((name for name, ok in neutral.items() if getattr(self, name) not in ok), None)


class TokenizeRequest(BaseModel):
    """vLLM's `/tokenize` request (completion form), so a client can check the tokenizer the way it checks vLLM."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
