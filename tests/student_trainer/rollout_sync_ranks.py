"""Run by test_rollouts_vllm.py under ``deepspeed --num_gpus 2``: train, push the weights into each rank's
colocated vLLM engine, and record how its greedy samples compare with the DeepSpeed student's own forward.

Writes ``OUT/rank-R.json``; the test asserts on it (this script asserts nothing, so a failure shows as
numbers, not as a crashed launch).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, GenerationConfig

from shared.alignment import pad_sequences
from student_trainer.modeling import RowLogitsLM
from student_trainer.rollouts import Sampling, open_rollout_engine

STEPS = 3


def student_forward(engine: object, prompts: list[list[int]], completions: list[list[int]]) -> dict[str, list]:
    """Greedy choices and log-probs of the completions under the DeepSpeed module (a collective under ZeRO-3)."""
    model = engine.module.model
    ids, mask = pad_sequences([p + c for p, c in zip(prompts, completions, strict=True)], 0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    argmax, logprobs, margins = [], [], []
    for b, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        lp = torch.log_softmax(logits[b, len(p) - 1 : len(p) - 1 + len(c)], dim=-1)
        top2 = lp.topk(2, dim=-1).values
        argmax.append(lp.argmax(-1).tolist())
        logprobs.append(lp.gather(-1, torch.tensor(c).unsqueeze(-1))[:, 0].tolist())
        margins.append((top2[:, 0] - top2[:, 1]).tolist())
    return {"argmax": argmax, "logprobs": logprobs, "margins": margins}


def train_steps(engine: object, n: int, gen: torch.Generator) -> None:
    for _ in range(n):
        ids = torch.randint(5, 600, (4, 24), generator=gen)
        b_idx, t_idx = torch.meshgrid(torch.arange(4), torch.arange(23), indexing="ij")
        logits = engine(ids, torch.ones_like(ids), b_idx.reshape(-1), t_idx.reshape(-1))
        loss = torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--student", required=True)
    parser.add_argument("--ds_config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    student = RowLogitsLM(AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32))
    engine, *_ = deepspeed.initialize(
        model=student, model_parameters=student.parameters(), config=json.loads(Path(args.ds_config).read_text())
    )
    rollouts = open_rollout_engine(
        "vllm", engine, args.student, max_model_len=256, seed=0, kv_cache_bytes=64 * 2**20, bucket_bytes=2**16
    )
    hf = open_rollout_engine("hf", engine, args.student)
    eos = GenerationConfig.from_pretrained(args.student).eos_token_id
    stops = tuple(eos if isinstance(eos, list) else [eos])
    sampling = Sampling(max_new_tokens=12, temperature=0.0, stop_ids=stops, pad_id=0)
    gen = torch.Generator().manual_seed(rank)
    prompts = [torch.randint(5, 600, (n,), generator=gen).tolist() for n in (3, 9, 17, 30)]
    record: dict[str, object] = {"rank": rank}

    train_steps(engine, STEPS, torch.Generator().manual_seed(100))
    record["sync_s"] = rollouts.sync(engine, STEPS)
    first = rollouts.generate(prompts, sampling, seed=1, with_logprobs=True)
    record["first"] = {"tokens": first.completions, "logprobs": first.logprobs, "version": first.version}
    record["first_student"] = student_forward(engine, prompts, first.completions)
    record["hf"] = hf.generate(prompts, sampling, seed=1, with_logprobs=True).__dict__

    train_steps(engine, 1, torch.Generator().manual_seed(200))
    stale = rollouts.generate(prompts, sampling, seed=1, with_logprobs=True)
    record["stale_logprobs"] = stale.logprobs
    rollouts.sync(engine, STEPS + 1)
    second = rollouts.generate(prompts, sampling, seed=1, with_logprobs=True)
    record["second"] = {"tokens": second.completions, "logprobs": second.logprobs, "version": second.version}
    record["second_student"] = student_forward(engine, prompts, second.completions)
    Path(args.out, f"rank-{rank}.json").write_text(json.dumps(record))
    dist.barrier()


if __name__ == "__main__":
    main()
