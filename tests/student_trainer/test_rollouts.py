"""On-policy rollouts: the engine's weights follow the optimizer steps, async samples are one step old and
tagged with their policy version, older ones are dropped and sampled again; the flags that refuse what
cannot work; and a ``--loss sampled_kl`` run that lowers the held-out KL."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from support import ds_config, failure_output, launch, read_jsonl

from demo.tiny import TinyAssets
from student_trainer.config import TrainerConfig, parse_args
from student_trainer.data import Batch, Example, collate
from student_trainer.rollout import OnPolicy
from student_trainer.rollouts import Rollouts, Sampling
from student_trainer.rollouts.base import trim_at_stop
from student_trainer.teacher.rows import Deferred
from teacher_service.process import TeacherProcess

ASYNC = ["--lmbda", "1", "--max_new_tokens", "4", "--rollout_engine", "vllm", "--async_rollouts"]
BASE = ["--model_name_or_path", "m", "--dataset", "d", "--output_dir", "o", "--max_steps", "9", "--deepspeed", "c"]


def config(*flags: str) -> TrainerConfig:
    return parse_args([*BASE, "--max_length", "32", *flags], check_files=False)


class FakeEngine:
    """A rollout engine that remembers its syncs and the threads it sampled on."""

    name = "fake"
    shares_weights = False

    def __init__(self) -> None:
        self.version = -1
        self.syncs: list[int] = []
        self.threads: list[str] = []

    def sync(self, engine: object, version: int) -> float:
        self.syncs.append(version)
        self.version = version
        return 0.0

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: Sampling, seed: int, with_logprobs: bool = False
    ) -> Rollouts:
        self.threads.append(threading.current_thread().name)
        sample = trim_at_stop([7, 8, sampling.stop_ids[0], 9][: sampling.max_new_tokens], sampling.stop_ids)
        return Rollouts([sample for _ in prompts], self.version)

    def close(self) -> None:
        pass


class EchoTeacher:
    can_generate = False

    def __init__(self) -> None:
        self.on_policy: list[bool] = []

    def request(self, batch: Batch, on_policy: bool = False) -> Deferred:
        self.on_policy.append(on_policy)
        return Deferred(lambda: batch)  # type: ignore[arg-type, return-value]

    def close(self) -> None:
        pass


def batches() -> list[Batch]:
    return [collate([Example.completion([1, 5, 6, 10, 11], 3), Example.completion([1, 5, 12], 2)], 0) for _ in "ab"]


@pytest.fixture
def one_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("student_trainer.rollout.dist.get_rank", lambda: 0)


def test_synchronous_rollouts_sample_from_the_weights_of_the_step_before(one_rank: None) -> None:
    engine, teacher = FakeEngine(), EchoTeacher()
    cfg = config("--lmbda", "1", "--max_new_tokens", "4")
    on_policy = OnPolicy(cfg, object(), engine, teacher, Sampling(4, 1.0, (2,), 0))  # type: ignore[arg-type]
    items = on_policy.items(5, batches())
    on_policy.items(6, batches())
    assert engine.syncs == [4, 5]
    assert teacher.on_policy == [True] * 4
    batch = items[0][0]
    assert batch.sequences == [[1, 5, 6, 7, 8, 2], [1, 5, 7, 8, 2]]  # each prompt, then its completion
    assert batch.row_spans == [[(2, 5)], [(1, 4)]]  # trained on the completion only
    assert on_policy.stats.record()["staleness_max"] == 0


def test_async_rollouts_are_one_step_old_and_older_ones_are_sampled_again(one_rank: None) -> None:
    engine, teacher = FakeEngine(), EchoTeacher()
    cfg = config("--lmbda", "1", "--max_new_tokens", "4", "--rollout_engine", "vllm", "--async_rollouts")
    on_policy = OnPolicy(cfg, object(), engine, teacher, Sampling(4, 1.0, (2,), 0))  # type: ignore[arg-type]
    try:
        on_policy.launch(6, batches(), version=4)  # step 5 trains meanwhile
        items = on_policy.items(6, batches())
        assert len(items) == 2 and engine.syncs == [4]
        assert all(t.startswith("rollouts") for t in engine.threads)
        record = on_policy.stats.record()
        assert record["staleness_mean"] == record["staleness_max"] == 1 and record["rollouts_dropped"] == 0

        on_policy.stats.reset()
        on_policy.launch(9, batches(), version=6)  # two steps older than step 9's weights (8): dropped
        on_policy.items(9, batches())
        assert engine.syncs == [4, 6, 8]
        assert engine.threads[-2:] == [threading.current_thread().name] * 2  # sampled again, now
        record = on_policy.stats.record()
        assert record["rollouts_dropped"] == 2 and record["staleness_max"] == 0
    finally:
        on_policy.close()


def test_trim_at_stop() -> None:
    assert trim_at_stop([5, 4, 9, 2], (2, 4)) == [5, 4]
    assert trim_at_stop([5, 6], (2,)) == [5, 6]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rollout_engine", "vllm"], "--lmbda above 0"),
        (["--lmbda", "0.5", "--max_new_tokens", "4", "--async_rollouts"], "needs --rollout_engine vllm"),
        ([*ASYNC, "--max_staleness", "0"], "--max_staleness >= 1"),
        (["--loss", "sampled_kl", "--lmbda", "0.5", "--max_new_tokens", "4"], "--lmbda 1"),
        (
            ["--loss", "sampled_kl", "--lmbda", "1", "--max_new_tokens", "4", "--generation_temperature", "0.7"],
            "--generation_temperature 1",
        ),
        (["--lmbda", "1", "--max_new_tokens", "4", "--rollout_kv_cache_gib", "0"], "--rollout_kv_cache_gib"),
    ],
)
def test_refused_combinations_name_the_flags(flags: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        config(*flags)
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_sampled_kl_run_lowers_the_held_out_kl(
    tiny_assets: TinyAssets, teacher_server: TeacherProcess, tmp_path: Path
) -> None:
    """--loss sampled_kl, every step on-policy (HF rollouts, ZeRO-2): one teacher log-prob per sampled token
    lowers the held-out top-k KL."""
    optimizer = {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "torch_adam": True}}
    config = ds_config(tmp_path, drop=("scheduler",), optimizer=optimizer)  # no warm-up in so few steps
    proc = launch(
        tiny_assets, tmp_path / "run", "--teacher_url", teacher_server.url, "--top_k", "16",
        "--deepspeed", str(config), "--max_steps", "16", "--logging_steps", "4",
        "--lmbda", "1", "--max_new_tokens", "12", "--loss", "sampled_kl", "--eval_file", str(tiny_assets.eval_file),
        "--eval_steps", "4", "--eval_batch_size", "64", "--no_export",
    )  # fmt: skip
    assert proc.returncode == 0, failure_output(proc)
    log = read_jsonl(tmp_path / "run" / "train_log.jsonl")
    assert all(r["on_policy_steps"] == 4 and math.isfinite(r["loss"]) for r in log)
    kl = [e["kl_topk"] for e in read_jsonl(tmp_path / "run" / "eval_log.jsonl")]
    assert len(kl) == 4 and kl[-1] < 0.97 * kl[0], kl  # a noisy estimator of another KL (reverse, sampled)
