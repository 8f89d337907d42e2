"""The fused output-layer loss against the logits loss: values and gradients in float64, every mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from student_trainer.fused_loss import fused_gkd_loss, row_chunk
from student_trainer.loss import LossConfig, completion_cross_entropy, gkd_topk_loss
from student_trainer.modeling import FusedTargets, RowLogitsLM

N, H, V, K = 23, 6, 40, 5


def _case(seed: int = 0, bias: bool = False, k: int = K) -> dict[str, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    f64 = {"generator": gen, "dtype": torch.float64}
    t_logits = torch.randn(N, V, **f64) * 3
    lp, ids = torch.topk(torch.log_softmax(t_logits, -1), k)
    return {
        "hidden": torch.randn(N, H, **f64),
        "weight": torch.randn(V, H, **f64),
        "bias": torch.randn(V, **f64) if bias else None,
        "ids": ids,
        "lp": lp,
        "tail": torch.log1p(-lp.exp().sum(-1)),
        "labels": torch.randint(0, V, (N,), generator=gen),
    }


def _unfused(c: dict, loss: LossConfig, alpha: float, with_tail_mass: bool) -> torch.Tensor:
    logits = F.linear(c["hidden"], c["weight"], c["bias"])
    tail = c["tail"] if with_tail_mass else None
    total = gkd_topk_loss(logits, c["ids"], c["lp"], loss.beta, loss.temperature, loss.tail, tail).sum()
    return total + alpha * completion_cross_entropy(logits, c["labels"]).sum() if alpha else total


def _leaves(c: dict) -> list[torch.Tensor]:
    return [c[n].requires_grad_(True) for n in ("hidden", "weight", "bias") if c[n] is not None]


def _compare(c: dict, loss: LossConfig, alpha: float = 0.0, with_tail_mass: bool = True, chunk: int = 4) -> None:
    leaves = _leaves(c)
    want = _unfused(c, loss, alpha, with_tail_mass)
    want_grads = torch.autograd.grad(want, leaves)
    got = fused_gkd_loss(
        c["hidden"], c["weight"], c["bias"], c["ids"], c["lp"], loss,
        teacher_tail_logmass=c["tail"] if with_tail_mass else None,
        labels=c["labels"] if alpha else None, sft_alpha=alpha, chunk=chunk,
    )  # fmt: skip
    got_grads = torch.autograd.grad(got.total * 0.37, leaves)  # a non-unit upstream gradient, as the trainer's scale
    torch.testing.assert_close(got.total, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, 0.37 * w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.1])
@pytest.mark.parametrize("tail,temp", [("tail", 1.0), ("renorm", 1.0), ("renorm", 0.7)])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_fused_equals_logits_loss(beta: float, tail: str, temp: float, alpha: float) -> None:
    _compare(_case(bias=beta == 0.1), LossConfig(beta, temp, tail), alpha)  # type: ignore[arg-type]


def test_tail_derived_from_the_topk_and_extra_columns() -> None:
    """No teacher tail mass (vLLM): derived as in the logits loss; k+1 columns (a sampled token appended)."""
    c = _case(seed=1)
    _compare(c, LossConfig(0.5, 1.0, "tail"), with_tail_mass=False)
    sampled = torch.randint(0, V, (N, 1), generator=torch.Generator().manual_seed(2))
    c = _case(seed=1)
    c["ids"] = torch.cat([c["ids"], sampled], -1)
    c["lp"] = torch.cat([c["lp"], torch.full((N, 1), -9.0, dtype=torch.float64)], -1)
    for tail in ("tail", "renorm"):
        _compare(_case(seed=1) | {"ids": c["ids"], "lp": c["lp"]}, LossConfig(0.3, 1.0, tail), 0.2)  # type: ignore[arg-type]


def test_topk_covering_the_vocabulary_and_zero_teacher_mass() -> None:
    c = _case(seed=3, k=V)
    c["tail"] = torch.full((N,), float("-inf"), dtype=torch.float64)
    for beta in (0.0, 0.5, 1.0):  # the empty tail class: no NaN in either path's gradient
        _compare(_case(seed=3, k=V) | {"tail": c["tail"]}, LossConfig(beta, 1.0, "tail"))
    c = _case(seed=4)
    c["lp"][:, -1] = float("-inf")
    _compare(c, LossConfig(0.5, 1.0, "renorm"))


def test_gradcheck_of_the_fused_function() -> None:
    c = _case(seed=5, bias=True)
    loss = LossConfig(0.4, 1.0, "tail")

    def fn(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return fused_gkd_loss(h, w, b, c["ids"], c["lp"], loss, c["tail"], c["labels"], 0.3, chunk=5).total

    assert torch.autograd.gradcheck(fn, tuple(_leaves(c)), fast_mode=True)


def test_no_gradient_work_without_grad_and_chunk_rule() -> None:
    c = _case(seed=6)
    with torch.no_grad():
        out = fused_gkd_loss(c["hidden"], c["weight"], None, c["ids"], c["lp"], LossConfig())
    assert not out.total.requires_grad
    torch.testing.assert_close(out.total, _unfused(c, LossConfig(), 0.0, False).detach(), rtol=1e-12, atol=0)
    assert row_chunk(8192, 152064) == 220 and row_chunk(8192, 32000) == 256 and row_chunk(100, 32000) == 32


@pytest.mark.parametrize("tied", [True, False])
def test_student_gradients_through_the_model_equal(tied: bool) -> None:
    """A whole (tiny, float64) causal LM, tied or untied output layer: every parameter's gradient matches."""
    config = LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).double()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    rows = RowLogitsLM(model, fused=True)
    ids = torch.randint(0, V, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    b_idx, t_idx = torch.tensor([0, 0, 1, 1, 2, 2, 2]), torch.tensor([1, 2, 3, 4, 5, 6, 7])
    t_lp, t_ids = torch.topk(torch.log_softmax(torch.randn(7, V, dtype=torch.float64) * 3, -1), K)
    labels = ids[b_idx, t_idx + 1]
    loss = LossConfig(0.5, 1.0, "tail")

    logits = rows(ids, mask, b_idx, t_idx)
    want = gkd_topk_loss(logits, t_ids, t_lp, 0.5).sum() + 0.5 * completion_cross_entropy(logits, labels).sum()
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    got = rows(ids, mask, b_idx, t_idx, targets=FusedTargets(t_ids, t_lp, None, labels, loss, 0.5))
    got_grads = torch.autograd.grad(got.total, list(model.parameters()))
    torch.testing.assert_close(got.total, want, rtol=1e-12, atol=1e-12)
    for (name, _), g, w in zip(model.named_parameters(), got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=name)


def test_heads_it_cannot_reproduce_are_refused() -> None:
    config = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="--no_fused_loss"):
        RowLogitsLM(model, fused=True)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_tail_at_a_temperature_the_teacher_applied(beta: float) -> None:
    """Rows a service computed at T (``tempered``): the tail mode at T != 1 equals the logits loss's, values and
    gradients; with the label cross-entropy it is refused (it needs the temperature-1 normalizer too)."""
    c = _case(seed=4, bias=True)
    leaves = _leaves(c)
    loss = LossConfig(beta, 0.7, "tail")
    logits = F.linear(c["hidden"], c["weight"], c["bias"])
    want = gkd_topk_loss(logits, c["ids"], c["lp"], beta, 0.7, "tail", c["tail"], teacher_tempered=True).sum()
    want_grads = torch.autograd.grad(want, leaves)
    got = fused_gkd_loss(
        c["hidden"], c["weight"], c["bias"], c["ids"], c["lp"], loss, c["tail"], chunk=4, tempered=True
    ).total
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(torch.autograd.grad(got, leaves), want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="no_fused_loss"):
        fused_gkd_loss(
            c["hidden"], c["weight"], c["bias"], c["ids"], c["lp"], loss, c["tail"],
            labels=c["labels"], sft_alpha=0.5, tempered=True,
        )  # fmt: skip
    with pytest.raises(ValueError, match="temperature"):  # raw rows: the tail mass is only known at T = 1
        fused_gkd_loss(c["hidden"], c["weight"], c["bias"], c["ids"], c["lp"], loss, c["tail"])
