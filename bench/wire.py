"""Wire cost of top-k rows: this project's binary frame versus vLLM's `prompt_logprobs` JSON for the same data.

For each k, the same N rows (random ids in a 152k vocabulary, sorted log-probs, an actual
next token per row) are encoded both ways; bytes per row and the client's decode time
(bytes -> id and log-prob tensors) are compared. The JSON side is the exact shape the
service's /v1/completions sends and a stock vLLM server sends, built and decoded by
:mod:`shared.vllm_logprobs` as the service and the trainer do (orjson, entries placed by rank
without per-entry sorting, actual tokens checked).

    python -m bench.wire --rows 4096 --k 8 20 64
"""

from __future__ import annotations

import argparse
import random
import string

import orjson
import torch

from bench.common import machine, median_time
from shared.codec import TopkFrame, decode_frame, encode_frame
from shared.vllm_logprobs import parse_completions_json, prompt_logprobs_entries

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
    """One choice whose prompt_logprobs hold the frame's rows, as vLLM sends them (actual token first).

    The entries come from the service's own builder; the actual token's rank and log-prob are its
    top-k ones when it is in the top-k, else made up below them.
    """
    ids, lps = frame.token_ids.tolist(), frame.logprobs.float().tolist()
    a_lps, a_ranks = [], []
    for row_ids, row_lps, act in zip(ids, lps, actual, strict=True):
        rank = row_ids.index(act) + 1 if act in row_ids else len(row_ids) + 7
        a_lps.append(row_lps[rank - 1] if rank <= len(row_ids) else row_lps[-1] - 0.5)
        a_ranks.append(rank)
    plp = prompt_logprobs_entries(
        [0, *actual],
        frame.token_ids,
        frame.logprobs,
        torch.tensor(a_lps),
        torch.tensor(a_ranks),
        lambda tid: words[tid % len(words)],
    )
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


def decode_vllm_json(data: bytes, actual: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """JSON -> (ids [N, k], logprobs [N, k]) with the trainer's reader (entries placed by rank, tokens checked)."""
    frame, _ = parse_completions_json(data, [[0, *actual]], [0], k)
    return frame.token_ids, frame.logprobs


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
        got_ids, got_lps = decode_vllm_json(js, actual, k)
        assert torch.equal(got_ids, frame.token_ids) and torch.allclose(got_lps, frame.logprobs.float())
        t_bin = median_time(lambda b=binary: decode_frame(b), args.repeat)
        t_js = median_time(lambda j=js, a=actual, kk=k: decode_vllm_json(j, a, kk), args.repeat)
        print(
            f"| {k} | {len(binary) / args.rows:.1f} | {len(js) / args.rows:.1f} | "
            f"{len(js) / len(binary):.1f}x | {t_bin * 1e6:.0f} µs | {t_js * 1e3:.1f} ms | {t_js / t_bin:.0f}x |"
        )


if __name__ == "__main__":
    main()
