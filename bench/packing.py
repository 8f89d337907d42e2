"""Packed frames: bytes per row against the information floor, and decode time against the zero-copy frame.

For each vocabulary size and k, the same N rows (random ids, sorted fp16 log-probs, as one sequence's
rows in one frame) are encoded as today's frame (int32 ids + fp16), with packed ids (ceil(log2 V) bits, at
least 16, + fp16), and packed with 8-bit log-probs. The floor is ceil(log2 V) bits per id + 16 bits per
log-prob. By default the four decodes are timed in turn, so each ratio compares runs under the same load and
none enjoys caches the loop alone keeps hot (``--timing isolated`` times each in its own loop).
Bytes are the whole frame (header, offsets) divided by N. Decode is ``shared.decode_frame``; "to loss"
adds what the loss does to the decoded rows either way (ids to int64 for the gather, log-probs to fp32).

    python -m bench.packing --rows 4096 --k 8 20 64 --vocab 32000 151936
"""

from __future__ import annotations

import argparse
import math

import torch

from bench.common import machine, median_times
from shared.codec import TopkFrame, decode_frame, encode_frame


def make_rows(n: int, k: int, vocab: int, seed: int = 0) -> TopkFrame:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, k), generator=gen, dtype=torch.int32)
    lps = (-torch.rand(n, k, generator=gen) * 12).sort(dim=-1, descending=True).values.half()
    return TopkFrame(ids, lps, torch.tensor([0, n]), torch.tensor([0]), metadata={"model": "teacher"})


def to_loss(frame: TopkFrame) -> tuple[torch.Tensor, torch.Tensor]:
    return frame.token_ids.long(), frame.logprobs.float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4096, help="rows per frame")
    p.add_argument("--k", type=int, nargs="+", default=[8, 20, 64])
    p.add_argument("--vocab", type=int, nargs="+", default=[32_000, 151_936])
    p.add_argument("--repeat", type=int, default=21, help="timed repetitions (median reported)")
    p.add_argument(
        "--timing",
        choices=("interleaved", "isolated"),
        default="interleaved",
        help="interleaved: the four decodes in turn (each starts from the caches the others left, as in a trainer); "
        "isolated: each in its own loop (hot caches: the frame's header and views stay in L1)",
    )
    args = p.parse_args()
    n = args.rows
    print(f"machine: {machine()}; rows per frame: {n}; timing: {args.timing}\n")
    print("| V | k | floor B/row | int32+fp16 | packed | packed/floor | packed+q8 | decode int32 | decode packed "
          "| ratio | decode+to-loss int32 | packed | ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for vocab in args.vocab:
        for k in args.k:
            frame = make_rows(n, k, vocab)
            floor = k * (math.ceil(math.log2(vocab)) + 16) / 8
            plain = encode_frame(frame)
            packed = encode_frame(frame, ids_encoding="packed", vocab_size=vocab)
            q8 = encode_frame(frame, ids_encoding="packed", vocab_size=vocab, logprobs_q8=True)
            a, b = decode_frame(plain), decode_frame(packed)
            assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.logprobs, b.logprobs)
            decodes = [
                lambda d=plain: decode_frame(d),
                lambda d=packed: decode_frame(d),
                lambda d=plain: to_loss(decode_frame(d)),
                lambda d=packed: to_loss(decode_frame(d)),
            ]
            if args.timing == "interleaved":
                t_plain, t_packed, l_plain, l_packed = median_times(decodes, args.repeat)
            else:
                t_plain, t_packed, l_plain, l_packed = (median_times([f], args.repeat)[0] for f in decodes)
            print(
                f"| {vocab} | {k} | {floor:.1f} | {len(plain) / n:.1f} | {len(packed) / n:.1f} | "
                f"{len(packed) / n / floor:.3f}x | {len(q8) / n:.1f} | {t_plain * 1e9 / n:.0f} ns | "
                f"{t_packed * 1e9 / n:.0f} ns | {t_packed / t_plain:.1f}x | {l_plain * 1e9 / n:.0f} ns | "
                f"{l_packed * 1e9 / n:.0f} ns | {l_packed / l_plain:.2f}x |"
            )


if __name__ == "__main__":
    main()
