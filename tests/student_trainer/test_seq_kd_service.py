"""``--seq_kd`` with ``--teacher_url``: the teacher service writes the completions the student trains on."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest
from support import REPO, failure_output, launch, read_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from demo.tiny import TinyAssets
from student_trainer.generation import generate_completions
from student_trainer.teacher.errors import TeacherProtocolError, TeacherRequestError
from student_trainer.teacher.generate import ServiceGenerator
from teacher_service.process import TeacherProcess

PROMPTS = [[57, 301, 122, 498, 33], [5, 9, 14]]


def metric(url: str, name: str, label: str = "") -> float:
    """A counter from the service's /metrics (0 when it has no sample yet)."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name) and label in line and not line.startswith("#"):
            return float(line.split()[-1])
    return 0.0


def test_service_completions_equal_the_in_process_teachers(
    tiny_assets: TinyAssets, teacher_server: TeacherProcess
) -> None:
    """Greedy, the service's completions are the in-process teacher's (what --seq_kd trained on before)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.teacher)
    model = AutoModelForCausalLM.from_pretrained(tiny_assets.teacher)
    task = tokenizer("copy: apple river =>").input_ids
    sampling = {"max_new_tokens": 10, "temperature": 0.0, "eos_id": tokenizer.eos_token_id, "pad_id": 0, "seed": 3}
    generator = ServiceGenerator(teacher_server.url)
    try:
        remote = generator.generate([*PROMPTS, task], **sampling)
        local = [generate_completions(model, [p], **sampling)[0] for p in [*PROMPTS, task]]
        assert remote == local
        assert remote[-1][-1] == tokenizer.eos_token_id  # the task prompt's completion ends at EOS, kept
        sampled = {**sampling, "temperature": 1.0}
        assert generator.generate(PROMPTS, **sampled) == generator.generate(PROMPTS, **sampled)  # seeded
        with pytest.raises(TeacherRequestError, match="max_tokens") as refused:
            generator.generate(PROMPTS, **{**sampling, "max_new_tokens": 1000})
        assert refused.value.status == 400 and refused.value.param == "max_tokens"
    finally:
        generator.close()


def test_answer_without_token_ids_is_refused() -> None:
    """A server that leaves out token ids (vLLM before return_token_ids) fails loudly, never re-tokenized text."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "t"}]})
        return httpx.Response(200, json={"choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}]})

    generator = ServiceGenerator("http://teacher", transport=httpx.MockTransport(handler))
    with pytest.raises(TeacherProtocolError, match="token_ids"):
        generator.generate([[1, 2]], max_new_tokens=4, temperature=1.0, eos_id=2, pad_id=0, seed=0)


@pytest.mark.slow
def test_seq_kd_trains_on_service_generated_completions(
    tiny_assets: TinyAssets, teacher_server: TeacherProcess, tmp_path: Path
) -> None:
    """Every step sequence-level KD (--lmbda 0): each micro-batch's completions come from /v1/completions and the
    teacher scores exactly those tokens (one top-k row per generated token)."""
    url = teacher_server.url
    ok = 'route="/v1/completions",status="200"'
    before = (metric(url, "gkd_teacher_requests_total", ok), metric(url, "gkd_teacher_generated_tokens_total"))
    rows_before = metric(url, "gkd_teacher_rows_total")
    steps, ranks = 3, 2
    proc = launch(
        tiny_assets, tmp_path, "--teacher_url", url, "--seq_kd", "--max_new_tokens", "8", "--max_steps", str(steps),
        "--logging_steps", "1", "--deepspeed", str(REPO / "deploy" / "ds_zero0.json"), "--no_export", ranks=ranks,
    )  # fmt: skip
    assert proc.returncode == 0, failure_output(proc)
    log = read_jsonl(tmp_path / "train_log.jsonl")
    assert len(log) == steps and all(math.isfinite(r["loss"]) and r["on_policy_steps"] == 0 for r in log)
    requests = metric(url, "gkd_teacher_requests_total", ok) - before[0]
    generated = metric(url, "gkd_teacher_generated_tokens_total") - before[1]
    assert requests == steps * ranks  # one generation request per micro-batch (ds_zero0: one per step and rank)
    assert generated > 0
    assert metric(url, "gkd_teacher_rows_total") - rows_before == generated
