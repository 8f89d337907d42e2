"""Student logits only at the rows the loss uses: never a [B, T, V] tensor for the whole batch."""

from __future__ import annotations

import torch


class RowLogitsLM(torch.nn.Module):
    """Wraps a HF causal LM so ``forward`` returns logits [N, V] at (b_idx, t_idx) only.

    The decoder runs on the padded batch, the hidden states of the wanted rows are
    gathered, and only they go through the output head. Models whose logits are not
    a plain head over the hidden state (final soft-capping, logit scaling) take the
    full forward and are gathered after it, so their numbers stay right.
    DeepSpeed wraps this module, so ZeRO hooks see every parameter use.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        cfg = getattr(model, "config", None)
        self._plain_head = all(
            getattr(cfg, name, None) in (None, 1.0)
            for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")
        )

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, b_idx: torch.Tensor, t_idx: torch.Tensor
    ) -> torch.Tensor:
        if self._plain_head:
            hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self.model.get_output_embeddings()(hidden[b_idx, t_idx])
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits[b_idx, t_idx]
