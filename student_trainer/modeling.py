"""The student as the trainer runs it: logits only at the rows the loss uses, or the fused output-layer loss.

Never a [B, T, V] tensor for the whole batch; with the fused loss not even [rows, V].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from student_trainer.fused_loss import FusedLoss, fused_gkd_loss
from student_trainer.loss import LossConfig

_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
"""Config entries of heads whose logits are not a plain linear map of the hidden state (Gemma 2, Cohere, Granite)."""


@dataclass
class FusedTargets:
    """What the fused loss needs besides the hidden states: the teacher rows, the labels, the settings."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logmass: torch.Tensor | None
    labels: torch.Tensor | None
    loss: LossConfig
    sft_alpha: float = 0.0
    tempered: bool = False
    """The teacher computed the rows at the loss temperature (see :class:`student_trainer.teacher.rows.TopkRows`)."""


def _plain_head_problem(model: torch.nn.Module) -> str | None:
    """Why ``hidden @ W.T + b`` would not be this model's logits, or None if it is."""
    cfg = getattr(model, "config", None)
    for name in _HEAD_TRANSFORMS:
        if getattr(cfg, name, None) not in (None, 1.0):
            return f"config.{name} = {getattr(cfg, name)}"
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"its output layer is a {type(head).__name__}, not a plain torch.nn.Linear"
    return None


class OutputLayerLoss(torch.nn.Module):
    """The fused loss as a module of its own, so DeepSpeed ZeRO-3 gathers the output layer for it.

    The output layer's parameters belong to another module (``lm_head``, or the embedding when tied),
    whose forward never runs here: they are registered as this module's external parameters, so
    ZeRO-3 gathers them before this forward and again before its backward (when their gradients arrive
    and are reduced as usual). Without ZeRO-3 the registration does nothing.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        from deepspeed.runtime.zero import register_external_parameter

        self._model = [model]  # a plain list: not a submodule, so no second copy of its parameters
        head = model.get_output_embeddings()
        for param in (head.weight, head.bias):
            if param is not None:
                register_external_parameter(self, param)

    def forward(
        self,
        hidden: torch.Tensor,
        ids: torch.Tensor,
        logprobs: torch.Tensor,
        tail_logmass: torch.Tensor | None,
        labels: torch.Tensor | None,
        *,
        loss: LossConfig,
        sft_alpha: float,
        tempered: bool = False,
    ) -> FusedLoss:
        head = self._model[0].get_output_embeddings()
        return fused_gkd_loss(
            hidden, head.weight, head.bias, ids, logprobs, loss, tail_logmass, labels, sft_alpha, tempered=tempered
        )


class RowLogitsLM(torch.nn.Module):
    """Wraps a HF causal LM so ``forward`` returns logits [N, V] at (b_idx, t_idx) only, or, given ``targets``,
    the fused loss's row sums (``fused=True``).

    The decoder runs on the padded batch, the hidden states of the wanted rows are
    gathered, and only they go through the output head. Models whose logits are not
    a plain head over the hidden state (final soft-capping, logit scaling) take the
    full forward and are gathered after it, so their numbers stay right; the fused
    loss refuses them. DeepSpeed wraps this module, so ZeRO hooks see every parameter use.
    """

    def __init__(self, model: torch.nn.Module, fused: bool = False) -> None:
        super().__init__()
        self.model = model
        problem = _plain_head_problem(model)
        self._plain_head = problem is None or problem.startswith("its output layer")
        if fused and problem is not None:
            raise ValueError(f"--fused_loss cannot reproduce this model's logits ({problem}); pass --no_fused_loss")
        self.head_loss = OutputLayerLoss(model) if fused else None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        b_idx: torch.Tensor,
        t_idx: torch.Tensor,
        targets: FusedTargets | None = None,
    ) -> torch.Tensor | FusedLoss:
        if targets is not None:
            if self.head_loss is None:
                raise RuntimeError("fused loss targets given to a student built without fused=True")
            hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self.head_loss(
                hidden[b_idx, t_idx], targets.ids, targets.logprobs, targets.tail_logmass, targets.labels,
                loss=targets.loss, sft_alpha=targets.sft_alpha, tempered=targets.tempered,
            )  # fmt: skip
        if self._plain_head:
            hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self.model.get_output_embeddings()(hidden[b_idx, t_idx])
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits[b_idx, t_idx]
