"""Wire cost of top-k rows: this project's binary frame versus vLLM's `prompt_logprobs` JSON for the same data.

For each k, the same N rows (random ids in a 152k vocabulary, sorted log-probs, an actual
next token per row) are encoded both ways; bytes per row and the client's decode time
(bytes -> id and log-prob tensors) are compared. The JSON side is the exact shape the
service's /v1/completions sends and a stock vLLM server sends; it is decoded with orjson
and placed by rank (no per-entry sorting), the fastest honest client.

    python -m bench.wire --rows 4096 --k 8 20 64
"""

from __future__ import annotations

import argparse
import random
import string

import numpy as np
import orjson
import torch

from bench.common import machine, median_time
from shared.codec import TopkFrame, decode_frame, encode_frame

VOCAB = 152_064


def make_rows(n: int, k: int, seed: int = 0) -> tuple[TopkFrame, list[int], list[str]]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(VOCAB, generator=gen)[:k] for _ in range(min(n, 64))]).repeat(n // 64 + 1, 1)[:n]
    lps = (-torch.rand(n, k, generator=gen) * 12).sort(dim=-1, descending=True).values
    frame = TopkFrame(ids.int(), lps.half(), torch.tensor([0, n]), torch.tensor([0]), metadata={"model": "teacher"})
    rng = random.Random(seed)
    actual = [int(ids[i, 0]) if rng.random() < 0.6 else rng.randrange(VOCAB) for i in range(n)]
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 7))) for _ in range(4096)]
    return frame, actual, words


def vllm_json(frame: TopkFrame, actual: list[int], words: list[str]) -> bytes:
    """One choice whose prompt_logprobs hold the frame's rows, as vLLM sends them (actual token first)."""
    plp: list[dict | None] = [None]
    ids, lps = frame.token_ids.tolist(), frame.logprobs.float().tolist()
    for row_ids, row_lps, act in zip(ids, lps, actual, strict=True):
        if act in row_ids:
            a_rank = row_ids.index(act) + 1
            a_lp = row_lps[a_rank - 1]
        else:
            a_rank, a_lp = len(row_ids) + 7, row_lps[-1] - 0.5
        entry = {str(act): {"logprob": a_lp, "rank": a_rank, "decoded_token": words[act % len(words)]}}
        for rank, (tid, lp) in enumerate(zip(row_ids, row_lps, strict=True), start=1):
            entry.setdefault(str(tid), {"logprob": lp, "rank": rank, "decoded_token": words[tid % len(words)]})
        plp.append(entry)
    body = {
        "id": "cmpl-0",
        "object": "text_completion",
        "created": 0,
        "model": "teacher",
        "choices": [
            {
                "index": 0,
                "text": "",
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
                "prompt_logprobs": plp,
            }
        ],
        "usage": {"prompt_tokens": len(actual) + 1, "completion_tokens": 0, "total_tokens": len(actual) + 1},
    }
    return orjson.dumps(body)


def decode_vllm_json(data: bytes, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """JSON -> (ids [N, k], logprobs [N, k]) placing entries by rank, no sorting."""
    plp = orjson.loads(data)["choices"][0]["prompt_logprobs"]
    n = len(plp) - 1
    ids = np.zeros((n, k), dtype=np.int32)
    lps = np.zeros((n, k), dtype=np.float32)
    for i, entry in enumerate(plp[1:]):
        for tid, info in entry.items():
            r = info["rank"]
            if r <= k:
                ids[i, r - 1] = int(tid)
                lps[i, r - 1] = info["logprob"]
    return torch.from_numpy(ids), torch.from_numpy(lps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4096, help="rows (positions) per answer")
    p.add_argument("--k", type=int, nargs="+", default=[8, 20, 64], help="top-k values")
    p.add_argument("--repeat", type=int, default=7, help="timed repetitions (median reported)")
    args = p.parse_args()
    print(f"machine: {machine()}; rows per answer: {args.rows}\n")
    print("| k | binary B/row | vLLM JSON B/row | bytes ratio | binary decode | JSON decode | decode ratio |")
    print("|---|---|---|---|---|---|---|")
    for k in args.k:
        frame, actual, words = make_rows(args.rows, k)
        binary = encode_frame(frame)
        js = vllm_json(frame, actual, words)
        got_ids, got_lps = decode_vllm_json(js, k)
        assert torch.equal(got_ids, frame.token_ids) and torch.allclose(got_lps, frame.logprobs.float())
        t_bin = median_time(lambda b=binary: decode_frame(b), args.repeat)
        t_js = median_time(lambda j=js, kk=k: decode_vllm_json(j, kk), args.repeat)
        print(
            f"| {k} | {len(binary) / args.rows:.1f} | {len(js) / args.rows:.1f} | "
            f"{len(js) / len(binary):.1f}x | {t_bin * 1e6:.0f} µs | {t_js * 1e3:.1f} ms | {t_js / t_bin:.0f}x |"
        )


if __name__ == "__main__":
    main()
