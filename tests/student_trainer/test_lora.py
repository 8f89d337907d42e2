"""LoRA students: only the adapters train, through the fused loss too; both exports load and match the PEFT model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from student_trainer.config import parse_args
from student_trainer.fused_loss import FusedLoss
from student_trainer.lora import export_lora, lora_config, with_lora
from student_trainer.loss import LossConfig
from student_trainer.modeling import FusedTargets, RowLogitsLM

V = 48


@pytest.fixture
def base(tmp_path: Path) -> Path:
    config = LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _lora_student(base: Path, targets: list[str] | str = "all-linear") -> tuple[torch.nn.Module, object]:
    cfg = lora_config(4, 8.0, 0.0, targets)
    model = with_lora(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), cfg)
    return model, cfg


def test_only_adapters_get_gradients_through_the_fused_loss(base: Path) -> None:
    model, _ = _lora_student(base)
    rows = RowLogitsLM(model, fused=True)
    trainable = {n for n, p in rows.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)  # all-linear leaves the output layer alone
    ids = torch.randint(0, V, (2, 7))
    b_idx, t_idx = torch.tensor([0, 0, 1]), torch.tensor([2, 3, 5])
    t_lp, t_ids = torch.topk(torch.log_softmax(torch.randn(3, V), -1), 5)
    out = rows(ids, torch.ones_like(ids), b_idx, t_idx, targets=FusedTargets(t_ids, t_lp, None, None, LossConfig()))
    assert isinstance(out, FusedLoss)
    out.total.backward()
    for name, p in rows.named_parameters():
        if name in trainable:
            assert p.grad is not None, name
            if ".lora_B." in name:  # B starts at zero (so A's gradient is zero too)
                assert p.grad.abs().sum() > 0, name
        if name not in trainable:
            assert p.grad is None, name


@pytest.mark.parametrize("merged", [True, False])
def test_exports_load_and_give_the_peft_models_logits(base: Path, tmp_path: Path, merged: bool) -> None:
    model, cfg = _lora_student(base, ["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.3)  # a trained adapter: the merge must change the outputs
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = tmp_path / "export"
    export_lora(state, str(base), cfg, out, merged=merged)
    if merged:
        assert not (out / "adapter_config.json").exists()
        loaded = AutoModelForCausalLM.from_pretrained(out)  # a plain model: no peft needed
        assert not any("lora" in n for n, _ in loaded.named_parameters())
    else:
        assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    ids = torch.randint(0, V, (2, 9))
    model.eval()
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, loaded.eval()(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base)(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lora_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--model_name_or_path", "m", "--dataset", "d.jsonl", "--output_dir", str(tmp_path), "--max_steps", "1"]
    base += ["--deepspeed", "ds.json"]
    config = parse_args([*base, "--lora_r", "8", "--lora_target_modules", "q_proj, v_proj"], check_files=False)
    assert config.lora_target_modules_list == ["q_proj", "v_proj"] and config.fused_loss
    assert not parse_args([*base, "--no_fused_loss"], check_files=False).fused_loss
    for bad, flag in ((["--export", "adapter"], "--lora_r"), (["--lora_r", "-1"], "--lora_r")):
        with pytest.raises(SystemExit):
            parse_args([*base, *bad], check_files=False)
        assert flag in capsys.readouterr().err
