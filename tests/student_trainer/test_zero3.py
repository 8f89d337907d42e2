"""ZeRO-3 on 2 CPU ranks: the step's gradient is the single-process full-batch gradient; on-policy generation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import REPO, ds_config, failure_output, launch, read_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from demo.tiny import TinyAssets
from shared.alignment import next_token_labels
from student_trainer.data import ShardedBatches, load_jsonl
from student_trainer.loss import completion_cross_entropy, gkd_full_vocab_loss
from student_trainer.modeling import RowLogitsLM
from teacher_service.process import TeacherProcess

pytestmark = pytest.mark.slow
MICRO, GAS, WORLD, LR, ALPHA, BETA, SEED = 4, 2, 2, 0.5, 0.5, 0.5, 42


def reference_step(assets: TinyAssets) -> dict[str, torch.Tensor]:
    """One SGD step on the token mean over every micro-batch of both ranks, in one process."""
    tok = AutoTokenizer.from_pretrained(assets.student)
    examples = load_jsonl(assets.train_file, tok, max_length=1024)
    batches = []
    for rank in range(WORLD):
        it = iter(ShardedBatches(examples, MICRO, rank, WORLD, SEED, tok.pad_token_id))
        batches += [next(it) for _ in range(GAS)]
    student = AutoModelForCausalLM.from_pretrained(assets.student, dtype=torch.float32)
    teacher = RowLogitsLM(AutoModelForCausalLM.from_pretrained(assets.teacher, dtype=torch.float32).eval())
    rows = RowLogitsLM(student)
    total = sum(b.num_target_tokens for b in batches)
    loss = torch.zeros(())
    for b in batches:
        b_idx, t_idx = b.row_index()
        s = rows(b.input_ids, b.attention_mask, b_idx, t_idx)
        with torch.no_grad():
            t = teacher(b.input_ids, b.attention_mask, b_idx, t_idx)
        labels = next_token_labels(b.input_ids, b_idx, t_idx)
        loss = loss + gkd_full_vocab_loss(s, t, beta=BETA).sum() + ALPHA * completion_cross_entropy(s, labels).sum()
    (loss / total).backward()
    return {n: (p - LR * p.grad).detach() for n, p in student.named_parameters()}


def test_two_rank_zero3_step_equals_full_batch_gradient(tiny_assets: TinyAssets, tmp_path: Path) -> None:
    """Unequal token counts across micro-batches and ranks; in-process full-vocabulary teacher; gathered export."""
    config = ds_config(
        tmp_path,
        base="ds_zero3.json",
        drop=("scheduler",),
        train_micro_batch_size_per_gpu=MICRO,
        gradient_accumulation_steps=GAS,
        gradient_clipping=0.0,
        optimizer={"type": "SGD", "params": {"lr": LR}},
        zero_allow_untested_optimizer=True,
    )
    proc = launch(
        tiny_assets,
        tmp_path / "run",
        "--teacher_model_name_or_path",
        str(tiny_assets.teacher),
        "--deepspeed",
        str(config),
        "--max_steps",
        "1",
        "--beta",
        str(BETA),
        "--sft_alpha",
        str(ALPHA),
        "--seed",
        str(SEED),
    )
    assert proc.returncode == 0, failure_output(proc)
    got = load_file(tmp_path / "run" / "final" / "model.safetensors")
    want = reference_step(tiny_assets)
    before = load_file(Path(tiny_assets.student) / "model.safetensors")
    assert got.keys() == want.keys()
    moved = max(float((want[n] - before[n]).abs().max()) for n in want)
    assert moved > 1e-3  # a real update, so equality below means something
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=2e-6, msg=name)


def test_on_policy_steps_under_zero3_against_the_service(
    tiny_assets: TinyAssets, teacher_server: TeacherProcess, tmp_path: Path
) -> None:
    """lmbda=1: every step trains on student samples (generated with gathered ZeRO-3 shards), scored by the service;
    then the held-out evaluation, sharded over the ranks."""
    proc = launch(
        tiny_assets,
        tmp_path,
        "--teacher_url",
        teacher_server.url,
        "--top_k",
        "16",
        "--deepspeed",
        str(REPO / "deploy" / "ds_zero3.json"),
        "--max_steps",
        "3",
        "--logging_steps",
        "1",
        "--lmbda",
        "1",
        "--max_new_tokens",
        "8",
        "--generation_temperature",
        "1.0",
        "--eval_file",
        str(tiny_assets.eval_file),
        "--eval_batch_size",
        "64",
    )
    assert proc.returncode == 0, failure_output(proc)
    log = read_jsonl(tmp_path / "train_log.jsonl")
    assert [r["on_policy_steps"] for r in log] == [1, 1, 1]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in log)
    (final_eval,) = read_jsonl(tmp_path / "eval_log.jsonl")  # at the end, ZeRO-3 ranks in step
    assert final_eval["step"] == 3 and math.isfinite(final_eval["kl_topk"]) and final_eval["tokens"] > 0
    got = load_file(tmp_path / "final" / "model.safetensors")
    before = load_file(Path(tiny_assets.student) / "model.safetensors")
    assert {n: t.shape for n, t in got.items()} == {n: t.shape for n, t in before.items()}
    assert any(not torch.equal(got[n], before[n]) for n in got)
