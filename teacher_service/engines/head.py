"""The output layer applied to gathered hidden states, fused with top-k, the normalizer and the exact tail.

The transformers engine runs the model body once and applies the output layer itself, in row chunks,
to the hidden states of the requested rows only: no ``[B, T, V]`` logits tensor is ever built. Each
``[chunk, V]`` block of logits is read by one top-k (k + 1 entries), then overwritten in place by
``exp(logits - m)`` with the top-k masked out, and summed once: that sum is the exact tail mass (no
``1 - sum(p)`` cancellation, never underflowing since the (k+1)-th entry contributes ``exp(0)``), and the
normalizer is the log-sum-exp of the k top values and the tail. Nothing else of size V is allocated.

Heads that transform logits are reproduced from their config (:data:`LOGIT_TRANSFORMS`); a config naming
a transform this module does not know is refused at load, and :func:`check_head` compares the result
with the model's own forward pass on a probe, so an unknown head is refused rather than scored wrongly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

LOGITS_CHUNK_BYTES = 16 * 2**20
"""Default size of one float32 ``[chunk, V]`` logits block: small enough to stay in a CPU's last-level cache
(the passes after the matmul are memory-bound), large enough for an efficient matmul (bench/floors.py)."""

MIN_CHUNK_ROWS = 256
"""Fewest rows per block whatever the vocabulary: each block streams the whole ``[V, D]`` head weight, so at
V = 128k a 16 MiB block (32 rows) would read it once per 32 rows (measured slower, docs/benchmarks.md)."""

UNSUPPORTED_HEAD_KEYS = ("lm_head_multiplier", "dim_model_base", "output_logits_scale", "mup_width_multiplier")
"""Config fields of models (Falcon-H1, MiniCPM, muP variants) that scale logits in ways not reproduced here."""


@dataclass
class RowTopk:
    """Per-row results of :func:`topk_rows`; extras are None unless asked for."""

    ids: torch.Tensor  # int32 [N, k]
    logprobs: torch.Tensor  # float32 [N, k]
    target_logprobs: torch.Tensor | None = None  # float32 [N]
    target_ranks: torch.Tensor | None = None  # int32 [N], 1-based
    tail_logmass: torch.Tensor | None = None  # float32 [N]

    @classmethod
    def empty(cls, n: int, top_k: int, targets: bool, tail: bool) -> RowTopk:
        return cls(
            torch.empty(n, top_k, dtype=torch.int32),
            torch.empty(n, top_k, dtype=torch.float32),
            torch.empty(n, dtype=torch.float32) if targets else None,
            torch.empty(n, dtype=torch.int32) if targets else None,
            torch.empty(n, dtype=torch.float32) if tail else None,
        )

    @classmethod
    def cat(cls, parts: list[RowTopk], top_k: int, targets: bool, tail: bool) -> RowTopk:
        """Parts joined in order; no parts give zero rows with the same fields."""

        def join(tensors: list[torch.Tensor | None], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            present = [t for t in tensors if t is not None]
            return torch.cat(present) if present else torch.empty(shape, dtype=dtype)

        return cls(
            join([p.ids for p in parts], (0, top_k), torch.int32),
            join([p.logprobs for p in parts], (0, top_k), torch.float32),
            join([p.target_logprobs for p in parts], (0,), torch.float32) if targets else None,
            join([p.target_ranks for p in parts], (0,), torch.int32) if targets else None,
            join([p.tail_logmass for p in parts], (0,), torch.float32) if tail else None,
        )


def _fill_block(
    logits: torch.Tensor, out: RowTopk, sl: slice, top_k: int, targets: torch.Tensor | None, temperature: float
) -> None:
    """Rows ``sl`` of ``out`` from one float32 ``[c, V]`` block, which this overwrites (it is a scratch buffer)."""
    if temperature != 1.0:
        logits.div_(temperature)
    vocab = logits.shape[-1]
    if targets is not None and out.target_logprobs is not None and out.target_ranks is not None:
        t_logit = logits.gather(-1, targets.to(logits.device).unsqueeze(-1))
        out.target_ranks[sl] = ((logits > t_logit).sum(-1) + 1).to(torch.int32).cpu()
    vals, idx = torch.topk(logits, min(top_k + 1, vocab), dim=-1, sorted=True)
    top = vals[:, :top_k]
    if top_k < vocab:
        shift = vals[:, top_k:]  # the largest logit outside the top-k: exp(0) = 1 keeps the sum from underflowing
        logits.scatter_(-1, idx[:, :top_k], float("-inf")).sub_(shift).exp_()
        tail = shift.squeeze(-1) + torch.log(logits.sum(-1))
        lse = torch.logsumexp(torch.cat([top, tail.unsqueeze(-1)], dim=-1), dim=-1)
    else:
        tail = torch.full_like(top[:, 0], float("-inf"))
        lse = torch.logsumexp(top, dim=-1)
    out.ids[sl] = idx[:, :top_k].to(torch.int32).cpu()
    out.logprobs[sl] = (top - lse.unsqueeze(-1)).cpu()
    if out.tail_logmass is not None:
        out.tail_logmass[sl] = (tail - lse).cpu()
    if targets is not None and out.target_logprobs is not None:
        out.target_logprobs[sl] = (t_logit.squeeze(-1) - lse).cpu()


def chunk_rows(vocab_size: int, chunk_bytes: int = LOGITS_CHUNK_BYTES) -> int:
    """Rows of one float32 ``[rows, V]`` logits block: about ``chunk_bytes``, at least :data:`MIN_CHUNK_ROWS`."""
    return max(MIN_CHUNK_ROWS, chunk_bytes // (4 * vocab_size))


def topk_rows(
    logits: torch.Tensor,
    top_k: int,
    targets: torch.Tensor | None = None,
    want_tail: bool = False,
    temperature: float = 1.0,
    row_chunk: int | None = None,
) -> RowTopk:
    """Top-k of ``log_softmax(logits / temperature)`` for ``logits`` [N, V], in row chunks, ``logits`` untouched.

    With ``targets`` [N], also the actual next token's log-prob and vocabulary rank; with ``want_tail`` the
    log of the mass outside the top-k, exact at that temperature.
    """
    return topk_from_blocks(
        lambda sl: logits[sl].float().clone() if logits.dtype == torch.float32 else logits[sl].float(),
        logits.shape[0],
        logits.shape[-1],
        top_k,
        targets,
        want_tail,
        temperature,
        row_chunk,
    )


def topk_from_blocks(
    block: Callable[[slice], torch.Tensor],
    n: int,
    vocab_size: int,
    top_k: int,
    targets: torch.Tensor | None,
    want_tail: bool,
    temperature: float = 1.0,
    row_chunk: int | None = None,
) -> RowTopk:
    """The rows from ``block(slice)``, which returns a fresh float32 ``[c, V]`` logits block (overwritten here)."""
    if temperature <= 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    out = RowTopk.empty(n, top_k, targets is not None, want_tail)
    step = row_chunk or chunk_rows(vocab_size)
    for lo in range(0, n, step):
        sl = slice(lo, min(lo + step, n))
        _fill_block(block(sl), out, sl, top_k, None if targets is None else targets[sl], temperature)
    return out


LogitTransform = Callable[[torch.Tensor], torch.Tensor]


def _softcap(cap: float) -> LogitTransform:
    def apply(x: torch.Tensor) -> torch.Tensor:
        return x.div_(cap).tanh_().mul_(cap)

    return apply


def _scale(factor: float) -> LogitTransform:
    def apply(x: torch.Tensor) -> torch.Tensor:
        return x.mul_(factor)

    return apply


LOGIT_TRANSFORMS: dict[str, Callable[[float], LogitTransform]] = {
    "logit_scale": _scale,  # Cohere, Cohere2: logits * logit_scale
    "logits_scaling": lambda s: _scale(1.0 / s),  # Granite, GraniteMoe: logits / logits_scaling
    "final_logit_softcapping": _softcap,  # Gemma 2 and 3: cap * tanh(logits / cap)
}
"""Config field -> what the model's forward does to the head's output, in the order the forward applies them."""


class UnsupportedHeadError(ValueError):
    """The model's output layer is not one this engine reproduces from hidden states."""


@dataclass
class OutputHead:
    """The model's output layer (tied or not) and the logit transforms its config names."""

    linear: torch.nn.Module
    vocab_size: int
    transforms: list[tuple[str, LogitTransform]]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[c, V]`` of hidden states ``[c, D]``, as the model's forward computes them."""
        out = self.linear(hidden).float()
        for _, transform in self.transforms:
            out = transform(out)
        return out

    def describe(self) -> str:
        names = ", ".join(name for name, _ in self.transforms) or "none"
        return f"vocab {self.vocab_size}, logit transforms: {names}"


def _config_value(config: object, key: str) -> object | None:
    """A config field, looking into ``text_config`` of composite (multimodal) configs as well."""
    value = getattr(config, key, None)
    if value is None and hasattr(config, "text_config"):
        value = getattr(config.text_config, key, None)
    return value


def output_head(model: torch.nn.Module) -> OutputHead:
    """The head of ``model`` as :class:`OutputHead`, or :class:`UnsupportedHeadError` saying why not."""
    name = type(model).__name__
    linear = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if linear is None or getattr(linear, "weight", None) is None:
        raise UnsupportedHeadError(f"{name} has no output embedding layer to score hidden states with")
    config = model.config
    for key in UNSUPPORTED_HEAD_KEYS:
        if _config_value(config, key) not in (None, 1, 1.0):
            raise UnsupportedHeadError(
                f"{name}: config.{key}={_config_value(config, key)} scales the logits in a way this engine does not "
                "reproduce; it cannot be served by the transformers engine"
            )
    transforms: list[tuple[str, LogitTransform]] = []
    for key, make in LOGIT_TRANSFORMS.items():
        value = _config_value(config, key)
        identity = 0.0 if key == "final_logit_softcapping" else 1.0  # a cap of 0 (or None) means no cap
        if value is not None and float(value) != identity:
            transforms.append((key, make(float(value))))
    return OutputHead(linear, int(linear.weight.shape[0]), transforms)


def model_body(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack without the head, whose ``last_hidden_state`` feeds the output layer."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None or body is model:
        body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise UnsupportedHeadError(f"{type(model).__name__} exposes no decoder body (get_decoder / base_model)")
    return body


def check_head(model: torch.nn.Module, body: torch.nn.Module, head: OutputHead, probe: torch.Tensor) -> None:
    """Refuse (:class:`UnsupportedHeadError`) when body + head do not give the model's own log-probs on ``probe``.

    The tolerance allows the rounding of half-precision weights, not a missing scale or cap.
    """
    with torch.inference_mode():
        mask = torch.ones_like(probe)
        ref = torch.log_softmax(model(input_ids=probe, attention_mask=mask).logits.float(), dim=-1)
        hidden = body(input_ids=probe, attention_mask=mask, use_cache=False).last_hidden_state
        ours = torch.log_softmax(head.logits(hidden.reshape(-1, hidden.shape[-1])), dim=-1).reshape(ref.shape)
    dtype = head.linear.weight.dtype
    atol, rtol = (1e-3, 1e-4) if dtype == torch.float32 else (0.1, 0.02)
    err = (ours - ref).abs()
    bound = atol + rtol * ref.abs()
    if not bool((err <= bound).all()):
        raise UnsupportedHeadError(
            f"{type(model).__name__}: scoring from hidden states does not reproduce the model's own log-probs "
            f"(largest difference {float(err.max()):.3g} with {head.describe()}); its output layer does something "
            "this engine does not know, so it refuses to serve it rather than score it wrongly"
        )
