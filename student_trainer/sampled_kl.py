"""``--loss sampled_kl``: on-policy distillation from the teacher's log-prob of each token the student sampled.

The objective of the Thinking Machines / Tinker on-policy distillation recipe (also ms-swift, TRL's
MiniLLM, verl, slime): the per-token reverse KL, KL(S||T) = E_{x~S}[log S(x) - log T(x)], estimated on
the student's own samples x_t (one teacher number per token: k = 1 rows with ``target_logprobs``).

Estimator: the advantage of token t is A_t = -(log S(x_t) - log T(x_t)), held constant (no gradient),
and the loss is the policy-gradient surrogate -A_t * log S(x_t), whose gradient
(log S - log T) * grad log S is an unbiased estimate of grad KL(S||T) per token (E_S[grad log S] = 0;
no reward-to-go across tokens: Tinker's discount 0). The value returned is that of the k1 estimate
log S(x_t) - log T(x_t) itself, so the logged loss is the sampled reverse KL, while the gradient is the
surrogate's. It is only unbiased on samples of the student at temperature 1, which the trainer enforces
(``--lmbda 1``, ``--generation_temperature 1``); ``--async_rollouts`` makes them one step old.
"""

from __future__ import annotations

import torch

from student_trainer.logprobs import chosen_logprobs


def sampled_kl_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-row loss [N]: value log S(x) - log T(x), gradient (log S(x) - log T(x)) * grad log S(x).

    ``student_logits`` [N, V] at the rows, ``labels`` [N] the sampled tokens, ``teacher_logprobs`` [N]
    the teacher's log-probs of them.
    """
    if labels.shape != student_logits.shape[:1] or teacher_logprobs.shape != labels.shape:
        raise ValueError(
            f"expected labels and teacher log-probs [{student_logits.shape[0]}], "
            f"got {tuple(labels.shape)} and {tuple(teacher_logprobs.shape)}"
        )
    s = chosen_logprobs(student_logits, labels.unsqueeze(-1))[:, 0]
    kl = (s - teacher_logprobs.to(s.dtype)).detach()
    return kl * (s - s.detach()) + kl
