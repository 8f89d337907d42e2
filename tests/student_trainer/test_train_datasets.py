"""Chat data end to end: a messages JSONL, a parquet file and a save_to_disk folder each train against the live
teacher, and a streamed dataset resumes exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import REPO, failure_output, launch, read_jsonl

from demo.tiny import TinyAssets
from teacher_service.process import TeacherProcess

pytestmark = pytest.mark.slow


def flags(teacher: TeacherProcess, *extra: str) -> list[str]:
    return ["--teacher_url", teacher.url, "--top_k", "8", "--deepspeed", str(REPO / "deploy" / "ds_zero0.json"),
            "--max_length", "256", "--logging_steps", "1", "--no_export", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def sources(tiny_assets: TinyAssets, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import datasets

    out = tmp_path_factory.mktemp("sources")
    rows = datasets.load_dataset("json", data_files=str(tiny_assets.chat_train_file), split="train").select(range(64))
    rows.to_parquet(str(out / "chat.parquet"))
    rows.save_to_disk(str(out / "saved"))
    return {"jsonl": tiny_assets.chat_train_file, "parquet": out / "chat.parquet", "save_to_disk": out / "saved"}


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "save_to_disk"])
def test_chat_dataset_trains_end_to_end(
    tiny_assets: TinyAssets, teacher_server: TeacherProcess, sources: dict[str, Path], kind: str, tmp_path: Path
) -> None:
    proc = launch(tiny_assets, tmp_path, *flags(teacher_server, "--max_steps", "3"), ranks=1, dataset=sources[kind])
    assert proc.returncode == 0, failure_output(proc)
    records = read_jsonl(tmp_path / "train_log.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] > 0 for r in records)
    assert "loss tokens" in proc.stderr + proc.stdout  # the start-up data line


def test_streaming_resume_repeats_the_uninterrupted_losses(
    tiny_assets: TinyAssets, teacher_server: TeacherProcess, tmp_path: Path
) -> None:
    common = flags(teacher_server, "--streaming", "--max_steps", "6")
    full = launch(tiny_assets, tmp_path / "full", *common, "--save_steps", "3", dataset=tiny_assets.chat_train_file)
    assert full.returncode == 0, failure_output(full)
    resumed = launch(
        tiny_assets, tmp_path / "resumed", *common, "--resume_from_checkpoint",
        str(tmp_path / "full" / "checkpoints" / "step-3"), dataset=tiny_assets.chat_train_file,
    )  # fmt: skip
    assert resumed.returncode == 0, failure_output(resumed)
    original = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "full" / "train_log.jsonl")}
    again = read_jsonl(tmp_path / "resumed" / "train_log.jsonl")
    assert [r["step"] for r in again] == [4, 5, 6]
    for r in again:
        assert r["loss"] == pytest.approx(original[r["step"]], rel=1e-5, abs=1e-7)
