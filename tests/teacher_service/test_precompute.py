"""`gkd-teacher precompute`: the keys it writes are the keys the trainer's data pipeline asks for, it resumes
from what the cache holds, and its rows are the service's; then a run trains from the cache with the
teacher down, to the losses of a run against the live teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import REPO, failure_output, launch, read_jsonl
from transformers import AutoTokenizer

from demo.tiny import TinyAssets
from shared.dataset_formats import DataSource, DataSpec
from shared.fingerprint import tokenizer_fingerprint
from shared.teacher_cache import TeacherCache, cached_contexts
from student_trainer.data import load_examples
from student_trainer.teacher import TeacherClient
from teacher_service.cli import main as gkd_teacher
from teacher_service.process import TeacherProcess, free_port

K = 8


@pytest.fixture(scope="module")
def subset(tiny_assets: TinyAssets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 conversations of the chat data and one row the trainer drops as invalid."""
    path = tmp_path_factory.mktemp("precompute") / "chat32.jsonl"
    lines = tiny_assets.chat_train_file.read_text().splitlines()[:32]
    path.write_text("\n".join([*lines, json.dumps({"messages": [{"role": "user", "content": "no answer"}]})]) + "\n")
    return path


@pytest.fixture(scope="module")
def filled(tiny_assets: TinyAssets, subset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cache")
    argv = ["precompute", "--model", str(tiny_assets.teacher), "--served-model-name", "teacher", "--dataset",
            str(subset), "--out", str(out), "--top-k", str(K), "--max-length", "256",
            "--batch-sequences", "12"]  # fmt: skip
    from teacher_service.precompute import main as precompute

    counts = precompute(argv[1:])
    gkd_teacher(argv)  # the command line: everything is cached now, nothing is scored again
    return out, counts


def test_precompute_writes_the_keys_the_trainer_asks_for_and_resumes(
    tiny_assets: TinyAssets, subset: Path, filled: tuple[Path, dict], teacher_server: TeacherProcess
) -> None:
    out, counts = filled
    assert counts["rows"] == 33 and counts["scored"] == 32 and counts["invalid"] == 1
    (context,) = cached_contexts(out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.student)
    assert context.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer) and context.top_k == K and context.tail
    examples, _ = load_examples(DataSource(str(subset)), tokenizer, DataSpec(max_length=256), drop_invalid=True)
    keys = [context.key(e.input_ids, e.row_spans) for e in examples]
    cache = TeacherCache(out, context, writable=False)
    assert len(cache.locate(keys)) == len(examples) == 32
    assert len(list(out.glob("*.idx"))) == 1  # the second run wrote no shard: nothing was missing

    async def live() -> object:
        async with TeacherClient(teacher_server.url) as client:
            assert (await client.info()).model_revision == context.model_revision  # the same weights
            seqs = [e.input_ids for e in examples[:4]]
            return await client.topk_logprobs(seqs, K, row_spans=[list(e.row_spans) for e in examples[:4]])

    import asyncio

    want = asyncio.run(live())
    got = [cache.get([k])[0] for k in keys[:4]]
    assert all(g is not None for g in got)
    got_ids = torch.cat([g.token_ids for g in got])  # type: ignore[union-attr]
    got_lps = torch.cat([g.logprobs for g in got])  # type: ignore[union-attr]
    assert torch.equal(got_ids[:, 0], want.token_ids[:, 0])  # type: ignore[attr-defined]
    torch.testing.assert_close(got_lps.float(), want.logprobs.float(), rtol=0, atol=2e-2)  # type: ignore[attr-defined]


@pytest.mark.slow
def test_training_with_the_teacher_down_uses_only_the_cache(
    tiny_assets: TinyAssets, subset: Path, filled: tuple[Path, dict], teacher_server: TeacherProcess, tmp_path: Path
) -> None:
    out, _ = filled
    common = ["--top_k", str(K), "--deepspeed", str(REPO / "deploy" / "ds_zero0.json"), "--max_length", "256",
              "--logging_steps", "1", "--no_export", "--max_steps", "4", "--drop_invalid_rows"]  # fmt: skip
    live = launch(tiny_assets, tmp_path / "live", *common, "--teacher_url", teacher_server.url, ranks=1, dataset=subset)
    assert live.returncode == 0, failure_output(live)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    offline = launch(
        tiny_assets, tmp_path / "offline", *common, "--teacher_url", dead, "--teacher_cache", str(out),
        "--teacher_cache_offline", ranks=1, dataset=subset,
    )  # fmt: skip
    assert offline.returncode == 0, failure_output(offline)
    want = [r["loss"] for r in read_jsonl(tmp_path / "live" / "train_log.jsonl")]
    got = [r["loss"] for r in read_jsonl(tmp_path / "offline" / "train_log.jsonl")]
    assert len(got) == len(want) == 4
    assert got == pytest.approx(want, rel=1e-3)
