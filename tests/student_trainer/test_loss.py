"""The GKD loss against a float64 transcription of the formula."""

import math

import pytest
import torch

from student_trainer.logprobs import chosen_logprobs
from student_trainer.loss import chunked_logsumexp, completion_cross_entropy, gkd_full_vocab_loss, gkd_topk_loss


def reference_jsd(p: list[float], q: list[float], beta: float) -> float:
    """JSD_beta(teacher p, student q) for normalized probability lists, in plain float64 Python."""

    def kl(a: list[float], b: list[float]) -> float:
        return sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b, strict=True) if x > 0)

    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q, strict=True)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def softmax(xs: list[float]) -> list[float]:
    mx = max(xs)
    e = [math.exp(x - mx) for x in xs]
    return [v / sum(e) for v in e]


def reference_loss(
    s_logits: torch.Tensor, t_full: torch.Tensor, k: int, beta: float, temp: float, tail: str
) -> list[float]:
    out = []
    for s_row, t_row in zip(s_logits.double().tolist(), t_full.double().tolist(), strict=True):
        t_probs = softmax(t_row)
        ids = sorted(range(len(t_row)), key=lambda i: -t_row[i])[:k]
        if tail == "renorm":
            p = softmax([math.log(t_probs[i]) / temp for i in ids])
            q = softmax([s_row[i] / temp for i in ids])
        else:
            s_probs = softmax(s_row)
            p = [t_probs[i] for i in ids]
            q = [s_probs[i] for i in ids]
            p, q = [*p, 1 - sum(p)], [*q, 1 - sum(q)]
        out.append(reference_jsd(p, q, beta))
    return out


def _inputs(n: int = 6, vocab: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=gen) * 2, torch.randn(n, vocab, generator=gen) * 3


def _teacher_topk(t_full: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    lp, ids = torch.topk(torch.log_softmax(t_full, dim=-1), k)
    return ids.int(), lp


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.1])
@pytest.mark.parametrize("tail,temp", [("renorm", 1.0), ("renorm", 0.7), ("renorm", 2.0), ("tail", 1.0)])
def test_matches_float64_reference(beta: float, tail: str, temp: float) -> None:
    s, t = _inputs()
    ids, lp = _teacher_topk(t, 8)
    got = gkd_topk_loss(s, ids, lp, beta=beta, temperature=temp, tail=tail)
    want = torch.tensor(reference_loss(s, t, 8, beta, temp, tail), dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tail", ["renorm", "tail"])
def test_full_vocabulary_k_equals_full_jsd(beta: float, tail: str) -> None:
    s, t = _inputs(vocab=40)
    ids, lp = _teacher_topk(t, 40)
    no_tail = torch.full((s.shape[0],), float("-inf"))  # what the teacher sends when k covers the vocabulary
    got = gkd_topk_loss(s, ids, lp, beta=beta, tail=tail, teacher_tail_logmass=no_tail)
    p, q = torch.softmax(t.double(), -1).tolist(), torch.softmax(s.double(), -1).tolist()
    want = torch.tensor([reference_jsd(a, b, beta) for a, b in zip(p, q, strict=True)], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


def test_identical_distributions_give_zero_and_gradients_flow() -> None:
    t = torch.randn(4, 30)
    s = t.clone().requires_grad_(True)
    ids, lp = _teacher_topk(t, 10)
    loss = gkd_topk_loss(s, ids, lp, beta=0.5)
    assert float(loss.abs().max()) < 1e-5
    s2 = torch.randn(4, 30, requires_grad=True)
    gkd_topk_loss(s2, ids, lp, beta=0.5).sum().backward()
    assert s2.grad is not None and torch.isfinite(s2.grad).all() and s2.grad.abs().sum() > 0


def test_teacher_zero_probability_is_not_nan() -> None:
    s, t = _inputs(n=2, vocab=10)
    ids, lp = _teacher_topk(t, 4)
    lp[:, -1] = float("-inf")  # a top-k entry with zero teacher mass: 0 * log 0 = 0
    for beta in (0.0, 0.5):
        s_req = s.clone().requires_grad_(True)
        loss = gkd_topk_loss(s_req, ids, lp, beta=beta, tail="renorm")
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(s_req.grad).all()
    # reverse KL is truly infinite when the student puts mass where the teacher has none, but never NaN
    assert not torch.isnan(gkd_topk_loss(s, ids, lp, beta=1.0, tail="renorm")).any()


def test_tail_uses_teacher_supplied_tail_mass() -> None:
    s, t = _inputs()
    ids, lp = _teacher_topk(t, 8)
    exact_tail = torch.log1p(-lp.double().exp().sum(-1)).float()
    a = gkd_topk_loss(s, ids, lp.half(), beta=0.0, teacher_tail_logmass=exact_tail)
    b = gkd_topk_loss(s, ids, lp, beta=0.0)
    torch.testing.assert_close(a, b, atol=5e-3, rtol=0)


def test_chunked_logsumexp_matches_full() -> None:
    x = torch.randn(1000, 77)
    torch.testing.assert_close(chunked_logsumexp(x, row_chunk=64), torch.logsumexp(x, -1))


def test_bad_arguments_are_refused() -> None:
    s, t = _inputs()
    ids, lp = _teacher_topk(t, 4)
    with pytest.raises(ValueError, match="beta"):
        gkd_topk_loss(s, ids, lp, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        gkd_topk_loss(s, ids, lp, temperature=0.5, tail="tail")
    with pytest.raises(ValueError, match="temperature"):
        gkd_topk_loss(s, ids, lp, temperature=0.0, tail="renorm")


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.3])
@pytest.mark.parametrize("temp", [1.0, 0.7])
def test_full_vocabulary_loss_matches_float64_reference(beta: float, temp: float) -> None:
    s, t = _inputs()
    got = gkd_full_vocab_loss(s, t, beta=beta, temperature=temp)
    p = [softmax([x / temp for x in row]) for row in t.double().tolist()]
    q = [softmax([x / temp for x in row]) for row in s.double().tolist()]
    want = torch.tensor([reference_jsd(a, b, beta) for a, b in zip(p, q, strict=True)], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


def test_completion_cross_entropy_matches_float64_reference() -> None:
    s, _ = _inputs()
    labels = torch.tensor([3, 0, 49, 7, 7, 21])
    got = completion_cross_entropy(s, labels)
    want = [-math.log(softmax(row)[y]) for row, y in zip(s.double().tolist(), labels.tolist(), strict=True)]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("with_tail", [False, True])
def test_chosen_logprobs_gradient_is_exact(with_tail: bool) -> None:
    """The hand-written backward (chunked, no saved [N, V] temporaries) against numerical derivatives."""
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(70, 13, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)  # > 2 row chunks
    ids = torch.stack([torch.randperm(13, generator=gen)[:4] for _ in range(70)])
    assert torch.autograd.gradcheck(lambda x: chosen_logprobs(x, ids, with_tail), (logits,))


def test_chosen_logprobs_gradient_with_a_repeated_id() -> None:
    """An id in two columns (a sampled token that is also in the top-k): both columns' gradients count."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 11, generator=gen, dtype=torch.float64).requires_grad_(True)
    ids = torch.stack([torch.randperm(11, generator=gen)[:4] for _ in range(5)])
    ids = torch.cat([ids, ids[:, 1:2]], dim=-1)
    assert torch.autograd.gradcheck(lambda x: chosen_logprobs(x, ids, True), (logits,))


def test_chosen_logprobs_covering_the_vocabulary_has_no_nan_gradient() -> None:
    logits = torch.randn(3, 6, requires_grad=True)
    ids = torch.stack([torch.randperm(6) for _ in range(3)])
    out = chosen_logprobs(logits, ids, with_tail=True)
    assert torch.isneginf(out[:, -1]).all()
    out[:, :-1].sum().backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("tail", ["renorm", "tail"])
def test_topk_loss_gradient_matches_float64_autograd(tail: str) -> None:
    """Gradient of the whole top-k loss against plain float64 autograd of the same formula."""
    s, t = _inputs(n=40)
    ids, lp = _teacher_topk(t, 8)
    s32 = s.clone().requires_grad_(True)
    gkd_topk_loss(s32, ids, lp, beta=0.5, tail=tail).sum().backward()
    s64 = s.double().requires_grad_(True)
    full = torch.log_softmax(s64, -1)
    s_k = full.gather(-1, ids.long())
    if tail == "renorm":
        s_log, t_log = torch.log_softmax(s_k, -1), torch.log_softmax(lp.double(), -1)
    else:
        s_log = torch.cat([s_k, torch.log1p(-s_k.exp().sum(-1, keepdim=True))], -1)
        t_log = torch.cat([lp.double(), torch.log1p(-lp.double().exp().sum(-1, keepdim=True))], -1)
    m = torch.logsumexp(torch.stack([s_log + math.log(0.5), t_log + math.log(0.5)]), 0)
    ref = 0.5 * (t_log.exp() * (t_log - m)).sum(-1) + 0.5 * (s_log.exp() * (s_log - m)).sum(-1)
    ref.sum().backward()
    torch.testing.assert_close(s32.grad.double(), s64.grad, atol=1e-6, rtol=1e-4)


def test_chosen_logprobs_gradient_with_a_vanishing_tail_is_finite_and_right() -> None:
    """Rows whose mass sits on the chosen ids (tail ~ e^-120): no overflow leaks into the gradient."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 50, generator=gen)
    ids = torch.stack([torch.randperm(50, generator=gen)[:5] for _ in range(6)])
    logits.scatter_(-1, ids[:3], 120.0)  # three peaked rows
    weights = torch.randn(6, 6, generator=gen)
    x32 = logits.clone().requires_grad_(True)
    (chosen_logprobs(x32, ids, with_tail=True) * weights).sum().backward()
    x64 = logits.double().requires_grad_(True)
    (chosen_logprobs(x64, ids, with_tail=True) * weights.double()).sum().backward()
    assert torch.isfinite(x32.grad).all()
    torch.testing.assert_close(x32.grad.double(), x64.grad, atol=1e-5, rtol=1e-4)


def test_reverse_kl_is_finite_when_a_derived_teacher_tail_rounds_to_zero() -> None:
    """fp32 top-k of a confident teacher (as vLLM sends them) sum to 1: the derived tail is floored, not -inf."""
    t_full = torch.zeros(2, 50)
    t_full[:, 7] = 30.0
    ids, lp = _teacher_topk(t_full, 4)
    assert float(lp[0, 0]) == 0.0
    s = torch.randn(2, 50)
    for beta in (0.0, 0.5, 1.0):
        assert torch.isfinite(gkd_topk_loss(s, ids, lp, beta=beta, tail="tail")).all()
