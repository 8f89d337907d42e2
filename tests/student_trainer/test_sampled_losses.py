"""Losses on the student's own samples: the sampled token as its own class, and ``--loss sampled_kl``,
against float64 transcriptions; both on the live teacher service's rows."""

from __future__ import annotations

import math

import pytest
import torch

from shared.alignment import next_token_labels
from student_trainer.data import Example, collate
from student_trainer.loss import gkd_topk_loss
from student_trainer.sampled_kl import sampled_kl_loss
from student_trainer.sampled_support import with_sampled_token
from student_trainer.teacher import TeacherClient, TeacherPrefetcher, TeacherRouter
from student_trainer.teacher.service import ServiceTeacher
from teacher_service.process import TeacherProcess

V, K = 40, 4


def _distribution(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(n, V, generator=gen, dtype=torch.float64) * 3, -1)


def _labels_at_every_rank(t_log: torch.Tensor) -> torch.Tensor:
    """Row r's label is the teacher's rank-(r mod V) token: inside the top-k, the (k+1)-th, and far outside."""
    order = t_log.argsort(dim=-1, descending=True)
    return order[torch.arange(len(t_log)), torch.arange(len(t_log)) % V]


def test_sampled_token_class_against_float64() -> None:
    """Support = top-k plus the label (or the (k+1)-th when the label is among the k+1), tail = the rest, exactly."""
    t_log = _distribution(2 * V)
    labels = _labels_at_every_rank(t_log)
    lp1, ids1 = torch.topk(t_log, K + 1)
    tail1 = torch.log1p(-lp1.exp().sum(-1))
    target = t_log.gather(-1, labels.unsqueeze(-1))[:, 0]
    # the tail from the service with float32 log-probs; derived from fp16 wire log-probs (the vLLM API)
    for wire, sent_tail, tol in ((lp1.float(), tail1.float(), 1e-5), (lp1.half(), None, 1e-2)):
        ids, lp, tail = with_sampled_token(ids1.int(), wire, labels, target.float(), sent_tail)
        assert ids.shape == lp.shape == (2 * V, K + 1)
        for r in range(2 * V):
            rank = r % V
            want = ids1[r].tolist() if rank <= K else [*ids1[r, :K].tolist(), int(labels[r])]
            assert ids[r].tolist() == want
            assert len(set(want)) == K + 1 and int(labels[r]) in want
            mass = t_log[r, want].exp().sum().item()
            torch.testing.assert_close(lp[r].double(), t_log[r, want], atol=tol, rtol=0)
            assert tail[r].item() == pytest.approx(math.log1p(-mass), abs=tol)


def test_reverse_kl_sees_the_sampled_token() -> None:
    """beta = 1 over the transformed rows = float64 reverse KL over {top-k, label, rest}; without the class the
    label's mass hides in the tail and the loss is lower."""
    t_log = _distribution(V, seed=1)
    s_logits = torch.randn(V, V, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    labels = _labels_at_every_rank(t_log)
    lp1, ids1 = torch.topk(t_log, K + 1)
    target = t_log.gather(-1, labels.unsqueeze(-1))[:, 0]
    tail1 = torch.log1p(-lp1.exp().sum(-1))
    ids, lp, tail = with_sampled_token(ids1.int(), lp1.float(), labels, target.float(), tail1.float())
    got = gkd_topk_loss(s_logits.float(), ids, lp, beta=1.0, teacher_tail_logmass=tail)
    s_log = torch.log_softmax(s_logits, -1)
    for r in range(V):
        support = ids[r].long()
        p = [*t_log[r, support].exp().tolist()]
        q = [*s_log[r, support].exp().tolist()]
        p, q = [*p, 1 - sum(p)], [*q, 1 - sum(q)]
        want = sum(b * (math.log(b) - math.log(a)) for a, b in zip(p, q, strict=True))
        assert got[r].item() == pytest.approx(want, rel=1e-4, abs=1e-6)
    plain = gkd_topk_loss(s_logits.float(), ids1[:, :K], lp1[:, :K].float(), beta=1.0)
    outside = torch.arange(V) % V > K
    assert bool((got[outside] > plain[outside]).all())  # the sampled token's own term, no longer pooled


def test_sampled_kl_value_gradient_and_unbiasedness_against_float64() -> None:
    """Value log S(x) - log T(x); gradient (log S - log T) grad log S; and, enumerating every x weighted by
    S(x), the expected gradient is exactly grad KL(S||T)."""
    gen = torch.Generator().manual_seed(3)
    s_logits = torch.randn(6, V, generator=gen, dtype=torch.float64)
    t_log = _distribution(6, seed=4)
    labels = torch.randint(V, (6,), generator=gen)
    z = s_logits.clone().requires_grad_(True)
    loss = sampled_kl_loss(z, labels, t_log.gather(-1, labels.unsqueeze(-1))[:, 0])
    s_log = torch.log_softmax(s_logits, -1)
    kl = s_log.gather(-1, labels.unsqueeze(-1))[:, 0] - t_log.gather(-1, labels.unsqueeze(-1))[:, 0]
    torch.testing.assert_close(loss.detach(), kl, rtol=1e-12, atol=1e-12)
    loss.sum().backward()
    onehot = torch.nn.functional.one_hot(labels, V).double()
    torch.testing.assert_close(z.grad, kl.unsqueeze(-1) * (onehot - s_log.exp()), rtol=1e-10, atol=1e-12)

    row = s_logits[:1].clone().requires_grad_(True)
    every = torch.arange(V)
    per_x = sampled_kl_loss(row.expand(V, V), every, t_log[0])
    weights = torch.log_softmax(row, -1)[0].exp().detach()
    (weights * per_x).sum().backward()
    exact = row.detach().clone().requires_grad_(True)
    p = torch.log_softmax(exact, -1)
    (p.exp() * (p - t_log[:1])).sum().backward()
    torch.testing.assert_close(row.grad, exact.grad, rtol=1e-9, atol=1e-12)


def test_on_policy_rows_from_the_live_service(teacher_server: TeacherProcess) -> None:
    """sampled_class: k+1 columns holding each row's token; sampled_only: the token's log-prob, k = 1; the
    token's log-prob is the same both ways and equals the top-k entry where the token is in the top-k."""
    seqs = [[1, 20, 30, 40, 50, 60, 70], [1, 9, 300, 301, 302]]
    batch = collate([Example.completion(s, 3) for s in seqs], 0)
    labels = next_token_labels(batch.input_ids, *batch.row_index())
    router = lambda: TeacherRouter({"default": TeacherClient(teacher_server.url)})  # noqa: E731
    with TeacherPrefetcher(router, depth=2) as prefetcher:
        plain = ServiceTeacher(prefetcher, K, want_tail=True, prefetch=True).request(batch, on_policy=True).result()
        cls = ServiceTeacher(prefetcher, K, True, True, on_policy_rows="sampled_class").request(batch, on_policy=True)
        only = ServiceTeacher(prefetcher, K, True, True, on_policy_rows="sampled_only").request(batch, on_policy=True)
        off = ServiceTeacher(prefetcher, K, True, True, on_policy_rows="sampled_class").request(batch).result()
        cls_rows, only_rows = cls.result(), only.result()
    assert plain.frame.token_ids.shape[1] == K and off.frame.token_ids.shape[1] == K
    ids = cls_rows.frame.token_ids
    assert ids.shape == (len(labels), K + 1)
    assert bool((ids == labels.unsqueeze(-1)).any(-1).all())
    assert only_rows.frame.token_ids.shape == (len(labels), 1)
    target = only_rows.label_logprobs(labels)
    at = (cls_rows.frame.token_ids == labels.unsqueeze(-1)).float().argmax(-1)
    torch.testing.assert_close(cls_rows.frame.logprobs.gather(-1, at.unsqueeze(-1))[:, 0], target, atol=2e-3, rtol=0)
    # one more class, so no more tail than the top-k's (up to the fp16 rounding of column k's log-prob)
    assert bool((cls_rows.frame.tail_logmass <= plain.frame.tail_logmass + 1e-3).all())
