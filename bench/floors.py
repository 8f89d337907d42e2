"""Teacher throughput against its floors: in-process floor, engine, HTTP, a null engine, and the seed's pattern.

Everything is timed on the same micro-batches (``--batch-size`` random sequences of ``--seq-len`` tokens, all
rows asked for), as rows per second, with two requests in flight on the HTTP paths as the trainer sends them.
Parts (``--part``):

- ``hf``: the transformers engine. *floor*: the model's own forward (``model(ids).logits``, the full
  ``[B, T, V]`` logits) + top-k + logsumexp, nothing else; *engine*: ``HFEngine.score_sync`` in-process, with
  and without the exact tail; *HTTP*: ``python -m teacher_service`` + the trainer's client (binary frame).
- ``ceiling``: an infinitely fast engine. This service with an engine that returns precomputed rows, and the
  seed's pattern (one ``/v1/completions`` request per sequence, 8 threads, JSON ``prompt_logprobs`` parsed and
  sorted per position) against a minimal server answering precomputed vLLM-shaped JSON: what each path costs
  per row on its own.
- ``vllm``: the vLLM engine (run with ``.venv-vllm/bin/python``): vLLM's offline ``LLM`` scoring the same
  prompts (``prompt_logprobs``) against ``VLLMEngine.score`` in-process, split into the engine's time and the
  conversion to the frame (this engine behind HTTP is timed by ``e2e``).
- ``e2e``: end to end against the seed (``.venv-vllm/bin/python``): the seed's pattern on stock vLLM
  (``python -m vllm.entrypoints.openai.api_server``) against the trainer's client on this service with the
  vLLM engine and with the transformers engine.

The teacher is a random Llama (``--layers``, ``--hidden``, ``--vocab``) saved with the tiny tokenizer, in
float32. Examples (each a few minutes on 2 cores):

    python -m bench.floors --part hf --vocab 32000 --k 20 64
    python -m bench.floors --part hf --vocab 128256 --batch-size 4 --seq-len 512 --k 20 64
    python -m bench.floors --part ceiling --k 20 64
    .venv-vllm/bin/python -m bench.floors --part vllm --k 20 64
    .venv-vllm/bin/python -m bench.floors --part e2e --k 20 64
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import torch
from fastapi import FastAPI, Request, Response

from bench.common import machine
from demo.tiny import build_assets
from shared.codec import TopkFrame
from shared.vllm_logprobs import prompt_logprobs_entries
from student_trainer.teacher import TeacherClient
from teacher_service.engines.base import ScoreJob, TeacherEngine
from teacher_service.process import TeacherProcess, free_port

logger = logging.getLogger("bench.floors")
IN_FLIGHT = 2
"""Requests the trainer keeps in flight (prefetch depth 2)."""
SEED_THREADS = 8
"""The seed's client: a thread pool of up to 8 per-sequence requests."""


# --- the teacher and the batches


def make_teacher(root: Path, vocab: int, hidden: int, layers: int, tokenizer_dir: Path) -> Path:
    """A random float32 Llama saved with the tiny tokenizer (its fingerprint only feeds the handshake)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = root / f"llama-v{vocab}-h{hidden}-l{layers}"
    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out


def make_batches(n: int, batch_size: int, seq_len: int, vocab: int) -> list[list[list[int]]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (batch_size, seq_len), generator=gen).tolist() for _ in range(n)]


def rows_of(batches: list[list[list[int]]]) -> int:
    return sum(len(s) - 1 for b in batches for s in b)


def best(fn: Callable[[], float], rounds: int) -> float:
    return min(fn() for _ in range(rounds))


# --- HTTP clients: the trainer's and the seed's pattern


async def trainer_client(url: str, batches: list[list[list[int]]], k: int, tail: bool) -> float:
    """The trainer's client, ``IN_FLIGHT`` micro-batches in flight; seconds for all batches."""
    async with TeacherClient(url, timeout=600) as client:
        await client.info()
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def one(b: list[list[int]]) -> TopkFrame:
            async with gate:
                return await client.topk_logprobs(b, k, return_tail_logmass=tail)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(b) for b in batches))
        return time.perf_counter() - t0


def seed_pattern(url: str, model: str, batches: list[list[list[int]]], k: int) -> float:
    """The seed's pattern (written here from its description, not its code): per micro-batch, one
    ``/v1/completions`` request per sequence from a pool of ``SEED_THREADS`` threads; each answer's
    ``prompt_logprobs`` parsed as JSON and, per position, its entries sorted by log-prob and written one by
    one into ``[B, L-1, k]`` tensors. ``IN_FLIGHT`` micro-batches at once, as the trainer would."""

    def fetch(client: httpx.Client, seq: list[int], ids: torch.Tensor, lps: torch.Tensor) -> None:
        body = {"model": model, "prompt": seq, "max_tokens": 1, "temperature": 0, "prompt_logprobs": k}
        resp = client.post(f"{url}/v1/completions", json=body, timeout=600)
        resp.raise_for_status()
        entries = resp.json()["choices"][0]["prompt_logprobs"]
        for pos in range(1, len(entries)):
            ranked = sorted(entries[pos].items(), key=lambda item: -item[1]["logprob"])[:k]
            for j, (token, info) in enumerate(ranked):
                ids[pos - 1, j] = int(token)
                lps[pos - 1, j] = info["logprob"]

    def batch(client: httpx.Client, pool: ThreadPoolExecutor, b: list[list[int]]) -> None:
        ids = [torch.zeros(len(s) - 1, k, dtype=torch.long) for s in b]
        lps = [torch.full((len(s) - 1, k), float("-inf")) for s in b]
        list(pool.map(fetch, [client] * len(b), b, ids, lps))

    limits = httpx.Limits(max_connections=SEED_THREADS * IN_FLIGHT)
    with (
        httpx.Client(limits=limits) as client,
        ThreadPoolExecutor(SEED_THREADS * IN_FLIGHT) as pool,
        ThreadPoolExecutor(IN_FLIGHT) as outer,
    ):
        t0 = time.perf_counter()
        list(outer.map(lambda b: batch(client, pool, b), batches))
        return time.perf_counter() - t0


# --- servers in their own processes


@contextmanager
def subprocess_server(
    args: list[str], port: int, timeout: float = 600, env: dict[str, str] | None = None
) -> Iterator[str]:
    """A server started as ``args``, ready when ``/health`` answers 200; its output goes to a log file."""
    url = f"http://127.0.0.1:{port}"
    log = Path("runs/bench") / f"server-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{args[:4]} exited with {proc.returncode}; see {log}")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{args[:4]} not ready in {timeout:.0f}s; see {log}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class NullEngine(TeacherEngine):
    """An infinitely fast engine: every job is answered with precomputed rows (the HTTP layer's ceiling)."""

    engine_name = "null"
    applies_temperature = True

    def __init__(self, vocab: int, max_rows: int, max_k: int, fingerprint: str) -> None:
        super().__init__("null-teacher")
        self._vocab, self._fingerprint = vocab, fingerprint
        gen = torch.Generator().manual_seed(0)
        self._ids = torch.randint(0, vocab, (max_rows, max_k), generator=gen, dtype=torch.int32)
        self._lps = torch.sort(torch.randn(max_rows, max_k, generator=gen) - 5, dim=-1, descending=True).values
        self._extra = torch.randn(max_rows, generator=gen) - 5

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def tokenizer_fingerprint(self) -> str:
        return self._fingerprint

    @property
    def max_model_len(self) -> int:
        return 1 << 20

    async def score(self, job: ScoreJob) -> TopkFrame:
        n = sum(e - s for spans in job.row_spans for s, e in spans)
        if n > self._ids.shape[0]:
            raise ValueError(f"{n} rows asked of a null engine holding {self._ids.shape[0]}: raise --max-rows")
        k = job.top_k
        return TopkFrame.from_spans(
            self._ids[:n, :k],
            self._lps[:n, :k],
            job.row_spans,
            job.seq_lens,
            target_logprobs=self._extra[:n] if job.want_target_logprobs else None,
            target_ranks=torch.ones(n, dtype=torch.int32) if job.want_target_logprobs else None,
            tail_logmass=self._extra[:n] if job.want_tail_logmass else None,
        )


def serve_null_service(port: int, vocab: int, max_rows: int, max_k: int) -> None:
    import uvicorn

    from teacher_service.app import create_app
    from teacher_service.config import ServiceConfig

    config = ServiceConfig(model="null", max_top_k=max_k, max_body_bytes=1 << 30, max_tokens=1 << 22)
    uvicorn.run(
        create_app(config, engine=NullEngine(vocab, max_rows, max_k, "sha256:null")), port=port, log_level="warning"
    )


def serve_null_vllm(port: int, vocab: int, max_k: int) -> None:
    """A minimal server answering ``/v1/completions`` in vLLM's JSON shape with precomputed prompt log-probs
    (the body is built once per prompt length and reused): only the client's cost remains."""
    import uvicorn

    app = FastAPI()
    bodies: dict[tuple[int, int], bytes] = {}
    gen = torch.Generator().manual_seed(0)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = orjson.loads(await request.body())
        prompt, k = req["prompt"], int(req["prompt_logprobs"])
        key = (len(prompt), k)
        if key not in bodies:
            n = len(prompt) - 1
            ids = torch.randint(0, vocab, (n, k), generator=gen)
            lps = torch.sort(torch.randn(n, k, generator=gen) - 5, dim=-1, descending=True).values
            targets = torch.randn(n, generator=gen) - 8
            entries = prompt_logprobs_entries(prompt, ids, lps, targets, None, lambda t: f"<{t}>")
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": "length", "prompt_logprobs": entries}
            bodies[key] = orjson.dumps({"id": "cmpl-null", "object": "text_completion", "choices": [choice]})
        return Response(bodies[key], media_type="application/json")

    uvicorn.run(app, port=port, log_level="warning")


# --- parts


def part_hf(args: argparse.Namespace, teacher: Path) -> None:
    from teacher_service.engines.hf import HFEngine

    engine = HFEngine(teacher, dtype="float32")
    engine.load()
    model = engine._model
    assert model is not None
    batches = make_batches(args.batches, args.batch_size, args.seq_len, args.vocab)
    rows = rows_of(batches)
    print(f"\n### transformers engine, V={args.vocab}: rows/s ({len(batches)} x {args.batch_size} x {args.seq_len})\n")
    print("| k | floor: forward + top-k + logsumexp | engine, no tail | engine, tail | HTTP, no tail | HTTP, tail |")
    print("|---|---|---|---|---|---|")

    def floor(k: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                logits = model(input_ids=torch.tensor(b)).logits[:, :-1].reshape(-1, args.vocab)
                torch.topk(logits, k, dim=-1)
                torch.logsumexp(logits, dim=-1)
                del logits
        return time.perf_counter() - t0

    def direct(k: int, tail: bool) -> float:
        t0 = time.perf_counter()
        for b in batches:
            engine.score_sync(ScoreJob.from_first_rows(b, [0] * len(b), k, want_tail_logmass=tail))
        return time.perf_counter() - t0

    extra = ["--dtype", "float32", "--max-top-k", str(max(args.k)), "--max-body-bytes", str(1 << 30)]
    with TeacherProcess(teacher, extra_args=extra, log_path=Path("runs/bench/teacher-hf.log")) as proc:
        asyncio.run(trainer_client(proc.url, batches[:1], 1, False))  # warm-up
        for k in args.k:
            f = best(lambda k=k: floor(k), args.rounds)
            e0 = best(lambda k=k: direct(k, False), args.rounds)
            e1 = best(lambda k=k: direct(k, True), args.rounds)
            h0 = best(lambda k=k: asyncio.run(trainer_client(proc.url, batches, k, False)), args.rounds)
            h1 = best(lambda k=k: asyncio.run(trainer_client(proc.url, batches, k, True)), args.rounds)
            print(
                f"| {k} | {rows / f:,.0f} | {rows / e0:,.0f} ({f / e0:.2f}x floor) | {rows / e1:,.0f} "
                f"({f / e1:.2f}x) | {rows / h0:,.0f} ({e0 / h0:.2f}x engine) | {rows / h1:,.0f} ({e1 / h1:.2f}x) |",
                flush=True,
            )


def part_ceiling(args: argparse.Namespace) -> None:
    batches = make_batches(args.batches, args.batch_size, args.seq_len, args.vocab)
    rows = rows_of(batches)
    max_rows = 4 * args.batch_size * args.seq_len  # the service may merge the requests in flight
    print(f"\n### null engine (precomputed rows), V={args.vocab}: rows/s and microseconds per row\n")
    print("| k | this service + trainer client, tail | seed pattern + minimal vLLM-shaped server | ratio |")
    print("|---|---|---|---|")
    me = [sys.executable, "-m", "bench.floors", "--vocab", str(args.vocab)]
    p1, p2 = free_port(), free_port()
    null_service = [*me, "--serve", "null-service", "--port", str(p1), "--max-rows", str(max_rows)]
    null_vllm = [*me, "--serve", "null-vllm", "--port", str(p2)]
    with subprocess_server(null_service, p1) as ours, subprocess_server(null_vllm, p2) as seed:
        asyncio.run(trainer_client(ours, batches[:1], 1, True))
        seed_pattern(seed, "null", batches[:1], 1)
        for k in args.k:
            a = best(lambda k=k: asyncio.run(trainer_client(ours, batches, k, True)), args.rounds)
            b = best(lambda k=k: seed_pattern(seed, "null", batches, k), args.rounds)
            print(
                f"| {k} | {rows / a:,.0f} ({1e6 * a / rows:.1f} us/row) "
                f"| {rows / b:,.0f} ({1e6 * b / rows:.1f} us/row) "
                f"| {b / a:.1f}x |",
                flush=True,
            )


VLLM_SETTINGS = {"dtype": "float32", "enforce_eager": True, "kv_cache_memory_bytes": 1 << 30}


def part_vllm(args: argparse.Namespace, teacher: Path) -> None:
    """vLLM's offline LLM against the engine in-process (engine time and conversion apart); HTTP is in e2e."""
    from vllm import LLM, SamplingParams, TokensPrompt

    from teacher_service.engines.vllm import VLLMEngine, frame_from_prompt_logprobs

    batches = make_batches(args.batches, args.batch_size, args.seq_len, args.vocab)
    rows = rows_of(batches)
    max_len = args.seq_len + 8
    print(f"\n### vLLM engine, V={args.vocab}: rows/s ({len(batches)} x {args.batch_size} x {args.seq_len})\n")
    llm = LLM(str(teacher), max_model_len=max_len, max_logprobs=max(args.k), **VLLM_SETTINGS)
    offline: dict[int, float] = {}
    for k in args.k:
        params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False, flat_logprobs=True)
        prompts = [[TokensPrompt(prompt_token_ids=s) for s in b] for b in batches]
        llm.generate(prompts[0][:1], params, use_tqdm=False)

        def run(prompts: list = prompts, params: SamplingParams = params, llm: LLM = llm) -> float:
            t0 = time.perf_counter()
            for p in prompts:
                llm.generate(p, params, use_tqdm=False)
            return time.perf_counter() - t0

        offline[k] = best(run, args.rounds)
    del llm
    import gc

    gc.collect()

    engine = VLLMEngine(teacher, max_top_k=max(args.k), max_model_len=max_len, **VLLM_SETTINGS)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(engine.start())
    print(
        "| k | vLLM offline LLM (prompt_logprobs) | VLLMEngine.score, tail | of which vLLM "
        "| of which frame conversion |"
    )
    print("|---|---|---|---|---|")
    try:
        for k in args.k:
            jobs = [ScoreJob.from_first_rows(b, [0] * len(b), k, want_tail_logmass=True) for b in batches]

            def score_all(jobs: list[ScoreJob] = jobs) -> float:
                t0 = time.perf_counter()
                for j in jobs:
                    loop.run_until_complete(engine.score(j))
                return time.perf_counter() - t0

            total = best(score_all, args.rounds)
            # the conversion alone, on answers kept from one more pass
            params = engine._sampling_params(k)

            async def answers(job: ScoreJob, k: int = k, params: Any = params) -> list[Any]:
                assert engine._engine is not None
                return list(
                    await asyncio.gather(
                        *(
                            engine._prompt_logprobs(engine._engine, f"bench-{k}-{i}-{time.time_ns()}", s, params)
                            for i, s in enumerate(job.sequences)
                        )
                    )
                )

            kept = [loop.run_until_complete(answers(j)) for j in jobs]
            t0 = time.perf_counter()
            for j, a in zip(jobs, kept, strict=True):
                frame_from_prompt_logprobs(a, j)
            conv = time.perf_counter() - t0
            print(
                f"| {k} | {rows / offline[k]:,.0f} | {rows / total:,.0f} ({offline[k] / total:.2f}x offline) "
                f"| {total - conv:.2f} s | {conv:.2f} s ({100 * conv / total:.0f}%) |",
                flush=True,
            )
    finally:
        loop.run_until_complete(engine.close())
        loop.close()


def part_e2e(args: argparse.Namespace, teacher: Path) -> None:
    """The seed's pattern on stock vLLM against the trainer's client on this service (vLLM, transformers)."""
    batches = make_batches(args.batches, args.batch_size, args.seq_len, args.vocab)
    rows = rows_of(batches)
    max_len = str(args.seq_len + 8)
    vllm_flags = ["--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", str(1 << 30)]
    vllm_flags += ["--max-model-len", max_len, "--max-logprobs", str(max(args.k))]
    results: dict[str, dict[int, float]] = {}
    port = free_port()
    stock = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(teacher), "--port", str(port)]
    stock += [*vllm_flags, "--served-model-name", "teacher", "--no-enable-prefix-caching"]
    with subprocess_server(stock, port) as url:
        seed_pattern(url, "teacher", batches[:1], 1)
        results["seed client + stock vLLM server"] = {
            k: best(lambda k=k: seed_pattern(url, "teacher", batches, k), args.rounds) for k in args.k
        }
    engines = {
        "trainer client + this service, vLLM engine": [
            "--engine",
            "vllm",
            "--dtype",
            "float32",
            "--enforce-eager",
            "--kv-cache-memory-bytes",
            str(1 << 30),
            "--max-model-len",
            max_len,
            "--max-top-k",
            str(max(args.k)),
            "--max-body-bytes",
            str(1 << 30),
        ],
        "trainer client + this service, transformers engine (default)": [
            "--dtype",
            "float32",
            "--max-top-k",
            str(max(args.k)),
            "--max-body-bytes",
            str(1 << 30),
        ],
    }
    for name, flags in engines.items():
        log = Path("runs/bench") / f"e2e-{len(results)}.log"
        with TeacherProcess(teacher, extra_args=flags, log_path=log, startup_timeout=600) as proc:
            asyncio.run(trainer_client(proc.url, batches[:1], 1, True))
            results[name] = {
                k: best(lambda k=k: asyncio.run(trainer_client(proc.url, batches, k, True)), args.rounds)
                for k in args.k
            }
    seed = results["seed client + stock vLLM server"]
    print(
        f"\n### end to end, V={args.vocab}, tail requested: rows/s "
        f"({len(batches)} x {args.batch_size} x {args.seq_len})\n"
    )
    print("| path | " + " | ".join(f"k={k}" for k in args.k) + " |")
    print("|---|" + "---|" * len(args.k))
    for name, times in results.items():
        cells = [f"{rows / times[k]:,.0f} ({seed[k] / times[k]:.2f}x)" for k in args.k]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["hf", "ceiling", "vllm", "e2e"], default="hf")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--k", type=int, nargs="+", default=[20, 64])
    p.add_argument("--rounds", type=int, default=2, help="best of this many timed passes")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("GKD_TINY_CACHE", "runs/cache")))
    p.add_argument("--serve", choices=["null-service", "null-vllm"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--max-rows", type=int, default=1 << 14, help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.serve == "null-service":
        return serve_null_service(args.port, args.vocab, args.max_rows, 128)
    if args.serve == "null-vllm":
        return serve_null_vllm(args.port, args.vocab, 128)
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at start")
    if args.part == "ceiling":
        return part_ceiling(args)
    assets = build_assets(args.cache)
    teacher = make_teacher(Path("runs/bench/models"), args.vocab, args.hidden, args.layers, assets.tokenizer)
    print(f"teacher: random Llama, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, float32")
    {"hf": part_hf, "vllm": part_vllm, "e2e": part_e2e}[args.part](args, teacher)


if __name__ == "__main__":
    main()
