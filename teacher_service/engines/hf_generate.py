"""Generation for the transformers engine: ``model.generate`` over left-padded prompts, seeded, in row chunks,
stopped by EOS, ``stop_token_ids``, stop strings (transformers' own matcher) or cancellation.

Runs in a worker thread under the engine's lock (the model is not re-entrant); the answer follows vLLM's
stopping rules (:func:`teacher_service.engines.generation.finish_completion`).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Sequence
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, StopStringCriteria

from shared.alignment import pad_sequences
from teacher_service.engines.generation import Completion, GenerateJob, finish_completion


class GenerationCancelled(RuntimeError):
    """The caller went away; the rows generated so far are dropped."""


class _StopWatch(StoppingCriteria):
    """Stop-string matchers (one per string) and a cancellation flag, recording the generated length at which
    each row first met a stop string: rows that stop early are padded afterwards, so the length is the truth."""

    def __init__(
        self, matchers: Sequence[tuple[str, StopStringCriteria]], prompt_width: int, rows: int, cancel: threading.Event
    ) -> None:
        self.matchers, self.prompt_width, self.cancel = matchers, prompt_width, cancel
        self.hits: list[tuple[int, str] | None] = [None] * rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        length = input_ids.shape[1] - self.prompt_width
        for stop, matcher in self.matchers:
            hit = matcher(input_ids, scores)
            for row in hit.nonzero().flatten().tolist():
                if self.hits[row] is None:
                    self.hits[row] = (length, stop)
            done |= hit
        if self.cancel.is_set():
            done[:] = True
        return done  # type: ignore[return-value]


def eos_ids(model: torch.nn.Module, tokenizer: Any) -> tuple[int | None, frozenset[int]]:
    """The tokenizer's EOS (vLLM's primary EOS) and every EOS of the model's generation config, as vLLM reads them."""
    primary = tokenizer.eos_token_id
    ids = {primary} if primary is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids |= {configured} if isinstance(configured, int) else set(configured)
    return primary, frozenset(ids)


def row_chunks(rows: int, width: int, max_batch_tokens: int) -> list[tuple[int, int]]:
    """Runs of rows whose padded prompt-plus-completion tokens stay under the budget (one row at least)."""
    per_chunk = max(1, max_batch_tokens // max(width, 1))
    return [(lo, min(lo + per_chunk, rows)) for lo in range(0, rows, per_chunk)]


def generate_sync(
    model: torch.nn.Module,
    tokenizer: Any,
    job: GenerateJob,
    *,
    max_batch_tokens: int,
    cancel: threading.Event | None = None,
) -> list[list[Completion]]:
    """Per prompt, its ``job.n`` completions. The RNG is forked and seeded with ``job.seed`` (a fresh random seed
    without one), so the same request with the same seed gives the same completions."""
    cancel = cancel or threading.Event()
    device = next(model.parameters()).device
    primary_eos, all_eos = eos_ids(model, tokenizer)
    stop_ids = frozenset(job.stop_token_ids) | (frozenset() if job.ignore_eos else all_eos)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": job.temperature, "top_p": job.top_p, "top_k": job.top_k}
        if job.temperature > 0
        else {"do_sample": False}
    )
    config = GenerationConfig(
        max_new_tokens=job.max_tokens,
        # [] rather than None: None would take the model's EOS back from its generation config
        eos_token_id=sorted(stop_ids),
        pad_token_id=pad_id,
        **sampling,
    )
    rows = [prompt for prompt in job.prompts for _ in range(job.n)]
    width = max(len(p) for p in rows) + job.max_tokens
    seed = job.seed if job.seed is not None else secrets.randbits(63)
    generated: list[tuple[list[int], tuple[int, str] | None]] = []
    with torch.inference_mode(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed % 2**64)
        for lo, hi in row_chunks(len(rows), width, max_batch_tokens):
            ids, mask = pad_sequences(rows[lo:hi], pad_id, side="left")
            matchers = [(s, StopStringCriteria(tokenizer, [s])) for s in job.stop]
            watch = _StopWatch(matchers, ids.shape[1], hi - lo, cancel)
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([watch]),
            )
            if cancel.is_set():
                raise GenerationCancelled("generation cancelled: the request was abandoned")
            generated += zip(out[:, ids.shape[1] :].tolist(), watch.hits, strict=True)

    def decode(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=job.skip_special_tokens)

    completions = [
        finish_completion(tokens, job, stop_ids, primary_eos, decode, string_stop) for tokens, string_stop in generated
    ]
    return [completions[i * job.n : (i + 1) * job.n] for i in range(len(job.prompts))]
