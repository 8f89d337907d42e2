"""Teacher generation (``/v1/completions`` with ``max_tokens`` > 1): the job an engine is given, what it answers,
and the vLLM stopping semantics the transformers engine reproduces.

vLLM's rules, matched here so that both engines answer alike: a completion's ``token_ids`` hold every
generated token, the stop token (EOS or one of ``stop_token_ids``) included; its ``text`` leaves the stop
token out, and is cut before a stop string (kept with ``include_stop_str_in_output``); ``stop_reason`` is
the stop token id or string, None for the tokenizer's EOS and for ``length``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerateJob:
    """One validated generation request: ``n`` completions of each prompt (token ids)."""

    prompts: list[list[int]]
    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    """0 is greedy (then ``n`` identical completions), as in vLLM."""
    top_p: float = 1.0
    top_k: int = 0
    """0: no top-k cut."""
    seed: int | None = None
    """Same request, same seed: same completions (per engine). vLLM seeds the i-th of ``n`` with ``seed + i``."""
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    @property
    def num_sequences(self) -> int:
        return len(self.prompts) * self.n


@dataclass(frozen=True)
class Completion:
    """One generated completion, in vLLM's terms."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    stop_reason: int | str | None = None


def finish_completion(
    tokens: list[int],
    job: GenerateJob,
    stop_ids: frozenset[int],
    primary_eos: int | None,
    decode: Callable[[list[int]], str],
    string_stop: tuple[int, str] | None = None,
) -> Completion:
    """A completion from one row of generated ``tokens`` (possibly padded after its end), cut as vLLM cuts.

    ``stop_ids`` are the ids that end a completion (EOS unless ``ignore_eos``, and ``stop_token_ids``);
    ``string_stop`` is (generated length, stop string) where the engine's stop-string matcher fired.
    Whichever stop comes first wins; without one, the completion ran to ``max_tokens``.
    """
    cut = next((i + 1 for i, t in enumerate(tokens) if t in stop_ids), None)
    if string_stop is not None and (cut is None or string_stop[0] < cut):
        length, stop = string_stop
        text = decode(tokens[:length])
        at = text.find(stop)
        if at >= 0:  # not found: the match began in the prompt (the matcher sees prompt and completion)
            text = text[: at + len(stop)] if job.include_stop_str_in_output else text[:at]
        return Completion(tokens[:length], text, "stop", stop)
    if cut is not None:
        token = tokens[cut - 1]
        kept = tokens[:cut] if job.include_stop_str_in_output else tokens[: cut - 1]
        reason = None if token == primary_eos and not job.ignore_eos else token
        return Completion(tokens[:cut], decode(kept), "stop", reason)
    tokens = tokens[: job.max_tokens]
    return Completion(tokens, decode(tokens), "length", None)
