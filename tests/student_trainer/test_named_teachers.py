"""Several teachers and replicas on the command line, and the dataset column that routes rows to named teachers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import REPO
from transformers import AutoTokenizer

from demo.tiny import TinyAssets
from student_trainer.config import parse_args
from student_trainer.data import DataError, DataSource, ShardedBatches
from student_trainer.data.sources import load_examples


@pytest.fixture
def base(tmp_path: Path) -> list[str]:
    (tmp_path / "model").mkdir()
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    return [
        "--model_name_or_path", str(tmp_path / "model"), "--train_file", str(tmp_path / "train.jsonl"),
        "--output_dir", str(tmp_path / "out"), "--max_steps", "10",
        "--deepspeed", str(REPO / "deploy" / "ds_zero2.json"),
    ]  # fmt: skip


def test_teacher_flags_name_replicas_and_teachers(base: list[str], tmp_path: Path) -> None:
    replicas = parse_args([*base, "--teacher_url", "http://a:8000, http://b:8000"])
    assert replicas.teacher_urls == {"default": ["http://a:8000", "http://b:8000"]}
    named = parse_args([*base, "--teacher", "math=http://m1:8000,http://m2:8000", "--teacher", "code=http://c:8000"])
    assert named.teacher_urls == {"math": ["http://m1:8000", "http://m2:8000"], "code": ["http://c:8000"]}
    assert named.data_spec.teachers == ("math", "code") and named.data_spec.teacher_column == "teacher"
    config = tmp_path / "run.yaml"
    config.write_text("teacher:\n  - math=http://m:8000\n  - code=http://c:8000\nteacher_column: domain\n")
    from_yaml = parse_args(["--config", str(config), *base])
    assert list(from_yaml.teacher_urls) == ["math", "code"] and from_yaml.data_spec.teacher_column == "domain"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--teacher", "math"], "--teacher 'math': expected NAME=URL"),
        (["--teacher", "a=http://x", "--teacher", "a=http://y"], "--teacher a is given twice"),
        (["--teacher", "a=ftp://x"], "'ftp://x' is not an http:// or https:// URL"),
        (["--teacher_url", "http://x", "--teacher", "a=http://y"], "--teacher_url and --teacher are alternatives"),
        (["--teacher_url", " , "], "--teacher_url names no URL"),
        (["--teacher_wait_timeout", "0"], "--teacher_wait_timeout must be > 0"),
    ],
)
def test_bad_teacher_flags_are_refused_naming_the_flag(
    base: list[str], flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args([*base, *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def _rows(tmp_path: Path, teachers: list[str | None]) -> DataSource:
    path = tmp_path / "routed.jsonl"
    rows = [{"prompt": f"copy: w{i} =>", "completion": f" w{i}", "teacher": t} for i, t in enumerate(teachers)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DataSource(str(path))


def test_rows_are_routed_by_the_teacher_column(tiny_assets: TinyAssets, tmp_path: Path, base: list[str]) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_assets.student)
    spec = parse_args([*base, "--teacher", "math=http://m:8000", "--teacher", "code=http://c:8000"]).data_spec
    examples, _ = load_examples(_rows(tmp_path, ["math", "code", "code", "math"]), tok, spec)
    assert [e.teacher for e in examples] == ["math", "code", "code", "math"]
    batch = next(iter(ShardedBatches(examples, 4, 0, 1, 0, tok.pad_token_id)))
    assert sorted(batch.teachers) == ["code", "code", "math", "math"]  # the batch carries them, in its own order
    assert batch.with_completions(batch.prompts(), [[5]] * 4, tok.pad_token_id).teachers == batch.teachers


def test_an_unknown_or_missing_teacher_fails_before_training_naming_the_row(
    tiny_assets: TinyAssets, tmp_path: Path, base: list[str]
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_assets.student)
    spec = parse_args([*base, "--teacher", "math=http://m:8000", "--teacher", "code=http://c:8000"]).data_spec
    with pytest.raises(DataError, match=r"row 3: teacher 'physics' is not a --teacher name \(known: math, code\)"):
        load_examples(_rows(tmp_path, ["math", "code", "physics"]), tok, spec)
    with pytest.raises(DataError, match=r"row 2: no 'teacher' column value"):
        load_examples(_rows(tmp_path, ["math", None]), tok, spec)
    one = parse_args([*base, "--teacher", "math=http://m:8000"]).data_spec  # one teacher takes unnamed rows
    examples, _ = load_examples(_rows(tmp_path, [None, "math"]), tok, one)
    assert [e.teacher for e in examples] == ["math", "math"]
