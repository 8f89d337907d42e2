"""LoRA students through peft: the adapters are the only trainable weights; export merged or as the adapter.

DeepSpeed optimizes only the parameters that require a gradient (the adapters), and checkpoints hold only
those (the frozen base is reloaded from ``--model_name_or_path`` on resume). The export builds the merged
model on rank 0 from a CPU copy of the base and the trained state, with peft's own ``merge_and_unload``, so
it is the same under every ZeRO stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def lora_config(r: int, alpha: float, dropout: float, target_modules: list[str] | str) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")


def with_lora(model: torch.nn.Module, config: Any) -> torch.nn.Module:
    """``model`` with adapters on ``config.target_modules``; everything else frozen. A name matching no module
    fails here (peft's ValueError), before training starts."""
    from peft import get_peft_model

    return get_peft_model(model, config)


def is_peft(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def export_lora(state: dict[str, torch.Tensor], base_path: str, config: Any, out: Path, merged: bool) -> None:
    """Write the trained adapter (``merged=False``: peft's save_pretrained) or the merged plain model.

    ``state`` is the full state dict of the trained PEFT model (gathered from ZeRO-3 shards where needed).
    """
    from peft import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    model = with_lora(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    buffers = {name for name, _ in model.named_buffers()}
    if unexpected or set(missing) - buffers:
        raise RuntimeError(f"the trained state does not fit the LoRA model: missing {missing}, unexpected {unexpected}")
    if merged:
        model.merge_and_unload().save_pretrained(out)
    else:
        model.save_pretrained(out, state_dict=get_peft_model_state_dict(model))
