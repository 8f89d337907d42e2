"""Two-rank DeepSpeed runs: the fused loss trains exactly as the logits loss (ZeRO-3); a LoRA student trains,
checkpoints, resumes and exports (merged and adapter) under ZeRO 0, 2 and 3."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from support import ds_config, failure_output, launch, read_jsonl
from transformers import AutoModelForCausalLM

from demo.tiny import TinyAssets
from teacher_service.process import TeacherProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # 2 launches each; loaded machines are slow


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(out / "train_log.jsonl")}


def test_fused_and_logits_loss_train_alike_under_zero3(
    tiny_assets: TinyAssets, teacher_server: TeacherProcess, tmp_path: Path
) -> None:
    """SGD (so a wrong gradient shows in the weights, not only in Adam's signs), CE term on, 2 steps: the same
    losses and the same weights, output layer included (gathered by ZeRO-3 for the fused loss)."""
    config = ds_config(
        tmp_path, base="ds_zero3.json", drop=("scheduler",), gradient_clipping=0.0,
        optimizer={"type": "SGD", "params": {"lr": 0.5}}, zero_allow_untested_optimizer=True,
    )  # fmt: skip
    common = ["--teacher_url", teacher_server.url, "--top_k", "16", "--deepspeed", str(config), "--max_steps", "2"]
    common += ["--logging_steps", "1", "--sft_alpha", "0.5"]
    runs = {}
    for name, flags, says in (("fused", [], "loss fused"), ("logits", ["--no_fused_loss"], "loss through the logits")):
        proc = launch(tiny_assets, tmp_path / name, *common, *flags)
        assert proc.returncode == 0, failure_output(proc)
        assert says in proc.stdout + proc.stderr
        runs[name] = tmp_path / name
    fused, logits = _losses(runs["fused"]), _losses(runs["logits"])
    assert fused.keys() == logits.keys() == {1, 2}
    for step in fused:
        assert fused[step] == pytest.approx(logits[step], rel=1e-5)
    a, b = (
        load_file(runs["fused"] / "final" / "model.safetensors"),
        load_file(runs["logits"] / "final" / "model.safetensors"),
    )
    before = load_file(Path(tiny_assets.student) / "model.safetensors")
    assert float((a["lm_head.weight"] - before["lm_head.weight"]).abs().max()) > 1e-4  # the output layer trained
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=2e-6, msg=name)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_lora_student_trains_resumes_and_exports_under_zero(
    stage: int, tiny_assets: TinyAssets, teacher_server: TeacherProcess, tmp_path: Path
) -> None:
    """Adapters on every linear layer but the output layer (the default); 4 steps with a checkpoint at 2 and the
    merged export; then a resume from step 2 exporting the adapter: the same losses, and the adapter merges into
    the same weights. Checkpoints hold the adapters only, under every stage (each has its own file layout: the
    optimizer state in the model file under ZeRO-0, one optimizer shard per rank under ZeRO-2, and the
    parameters partitioned too under ZeRO-3)."""
    config = ds_config(tmp_path, base=f"ds_zero{stage}.json", drop=("scheduler",), optimizer={
        "type": "AdamW", "params": {"lr": 2e-2, "torch_adam": True}})  # fmt: skip
    common = ["--teacher_url", teacher_server.url, "--top_k", "16", "--deepspeed", str(config), "--max_steps", "4"]
    common += ["--logging_steps", "1", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0"]
    first = tmp_path / "first"
    proc = launch(tiny_assets, first, *common, "--save_steps", "2")
    assert proc.returncode == 0, failure_output(proc)
    assert f"ZeRO stage {stage}," in proc.stdout + proc.stderr
    losses = _losses(first)
    model_states = sorted((first / "checkpoints" / "step-2").glob("*model_states.pt"))
    assert model_states
    for path in model_states:  # the frozen base is left out: it is reloaded from --model_name_or_path
        saved = torch.load(path, map_location="cpu", weights_only=False)["module"]
        assert saved and all(".lora_A." in n or ".lora_B." in n for n in saved), (path.name, list(saved))
    assert losses[4] < losses[1], losses
    merged = load_file(first / "final" / "model.safetensors")
    before = load_file(Path(tiny_assets.student) / "model.safetensors")
    assert merged.keys() == before.keys()  # a plain model's weights, no adapter names
    targets = {n for n in merged if "_proj." in n}  # all-linear: attention and MLP, not embeddings or the head
    assert targets and "lm_head.weight" not in targets
    for name in merged:  # the base is frozen: only the targets' weights moved (by the merged adapter)
        if name in targets:
            assert not torch.equal(merged[name], before[name]), name
        else:
            assert torch.equal(merged[name], before[name]), name
    AutoModelForCausalLM.from_pretrained(first / "final")  # loads without peft

    resumed = tmp_path / "resumed"
    resume = ["--resume_from_checkpoint", str(first / "checkpoints" / "step-2"), "--export", "adapter"]
    proc = launch(tiny_assets, resumed, *common, *resume)
    assert proc.returncode == 0, failure_output(proc)
    again = _losses(resumed)
    assert again.keys() == {3, 4}
    for step in again:
        assert again[step] == pytest.approx(losses[step], rel=1e-5, abs=1e-7)
    assert (resumed / "final" / "adapter_config.json").is_file()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_assets.student), resumed / "final")
    remerged = peft.merge_and_unload().state_dict()
    for name in targets:
        torch.testing.assert_close(remerged[name], merged[name], rtol=1e-4, atol=1e-5, msg=name)
