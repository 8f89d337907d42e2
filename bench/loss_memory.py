"""Time and peak memory of the top-k GKD loss against the full-vocabulary loss (forward + backward, CPU).

Each case runs in two subprocesses. The memory one lowers glibc's mmap threshold, so
freed tensors return to the OS and the resident-set high-water mark (VmHWM, reset
through /proc/self/clear_refs) is the peak of live memory; reported is the peak above
the inputs minus the one [T, V] gradient of the student logits that every loss needs,
in units of one [T, V] fp32 tensor. The timing one keeps the default allocator (an
mmap per chunk would charge page faults to the chunked code) and reports the median
time of forward + backward.

    python bench/loss_memory.py --vocab 32000 152064 --top-k 20 64 --tokens 2048

With ``--hidden H`` it compares the fused output-layer loss (``student_trainer.fused_loss``) with the
logits path (output layer, then the top-k loss), both from hidden states [T, H]:

    python bench/loss_memory.py --hidden 1024 --vocab 32000 152064 --top-k 20 --tokens 2048
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def run_head_case(
    mode: str, vocab: int, k: int, tokens: int, hidden: int, repeats: int, threads: int
) -> dict[str, float | str | int]:
    """The output layer and the loss together: hidden [T, H] -> loss, backward into hidden and weight.

    Reported: the peak above the inputs minus the two gradients every path produces (hidden [T, H] and
    weight [V, H]), so the logits path is charged its [T, V] logits and their gradient.
    """
    import torch
    import torch.nn.functional as F

    from student_trainer.fused_loss import fused_gkd_loss
    from student_trainer.loss import LossConfig, gkd_topk_loss

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(tokens, hidden, generator=gen)).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5 * 3).requires_grad_(True)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(tokens)])
    lp = torch.log_softmax(torch.randn(tokens, k, generator=gen) * 2, -1) + torch.log(torch.tensor(0.9))
    tail = torch.full((tokens,), float(torch.log(torch.tensor(0.1))))
    path, tail_mode = mode.split("-")
    cfg = LossConfig(beta=0.5, tail=tail_mode)  # type: ignore[arg-type]

    def loss() -> torch.Tensor:
        if path == "fused":
            return fused_gkd_loss(h, w, None, ids, lp.half(), cfg, tail).total
        return gkd_topk_loss(F.linear(h, w), ids, lp.half(), 0.5, 1.0, tail_mode, tail).sum()  # type: ignore[arg-type]

    loss().backward()  # warm-up
    times, extras = [], []
    for _ in range(repeats):
        h.grad = w.grad = None
        _reset_peak()
        base = _status("VmRSS")
        t0 = time.perf_counter()
        loss().backward()
        times.append(time.perf_counter() - t0)
        extras.append(_status("VmHWM") - base - (h.numel() + w.numel()) * 4)
    tv = tokens * vocab * 4
    return {
        "mode": mode, "vocab": vocab, "top_k": k, "tokens": tokens, "hidden": hidden,
        "time_s": statistics.median(times), "extra_bytes": min(extras), "extra_over_TV": min(extras) / tv,
    }  # fmt: skip


def run_case(mode: str, vocab: int, k: int, tokens: int, repeats: int, threads: int) -> dict[str, float | str | int]:
    import torch

    from student_trainer.loss import gkd_full_vocab_loss, gkd_topk_loss

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    student = (torch.randn(tokens, vocab, generator=gen) * 2).requires_grad_(True)
    if mode == "full":
        teacher = torch.randn(tokens, vocab, generator=gen) * 3

        def loss() -> torch.Tensor:
            return gkd_full_vocab_loss(student, teacher, beta=0.5).sum()
    else:
        t_full = torch.randn(tokens, vocab, generator=gen) * 3
        lp, ids = torch.topk(torch.log_softmax(t_full, -1), k)
        tail = torch.log1p(-lp.exp().sum(-1).clamp_max(1 - 1e-7))
        del t_full
        lp = lp.half()
        tail_mode = mode.removeprefix("topk-")

        def loss() -> torch.Tensor:
            return gkd_topk_loss(student, ids, lp, beta=0.5, tail=tail_mode, teacher_tail_logmass=tail).sum()

    loss().backward()  # warm-up
    times, extras = [], []
    for _ in range(repeats):
        student.grad = None
        _reset_peak()
        base = _status("VmRSS")
        t0 = time.perf_counter()
        loss().backward()
        times.append(time.perf_counter() - t0)
        extras.append(_status("VmHWM") - base - student.grad.numel() * 4)
    tv = tokens * vocab * 4
    return {
        "mode": mode,
        "vocab": vocab,
        "top_k": k if mode != "full" else 0,
        "tokens": tokens,
        "time_s": statistics.median(times),
        "extra_bytes": min(extras),
        "extra_over_TV": min(extras) / tv,
    }


def _peak(r: dict) -> str:
    return f"{r['extra_over_TV']:.3f} [T,V] ({r['extra_bytes'] / 2**20:.0f} MiB)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 152064], help="vocabulary sizes")
    p.add_argument("--top-k", type=int, nargs="+", default=[20, 64], help="teacher top-k values")
    p.add_argument("--tokens", type=int, default=2048, help="loss rows T")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per case (median time, min memory)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--case", nargs=3, metavar=("MODE", "VOCAB", "K"), help=argparse.SUPPRESS)
    p.add_argument("--measure", choices=["memory", "time"], help=argparse.SUPPRESS)
    p.add_argument(
        "--hidden",
        type=int,
        help="compare the fused output-layer loss with the logits path instead, at this hidden size",
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.case:
        mode, vocab, k = args.case
        if args.hidden:
            result = run_head_case(mode, int(vocab), int(k), args.tokens, args.hidden, args.repeats, args.threads)
        else:
            result = run_case(mode, int(vocab), int(k), args.tokens, args.repeats, args.threads)
        print(json.dumps(result))
        return
    memory_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    results = []
    for vocab in args.vocab:
        if args.hidden:
            cases = [(f"{path}-{m}", k) for k in args.top_k for m in ("tail", "renorm") for path in ("logits", "fused")]
        else:
            cases = [("full", 0)] + [(m, k) for k in args.top_k for m in ("topk-tail", "topk-renorm")]
        for mode, k in cases:
            cmd = [sys.executable, __file__, "--case", mode, str(vocab), str(k)]
            cmd += ["--tokens", str(args.tokens), "--repeats", str(args.repeats), "--threads", str(args.threads)]
            cmd += ["--hidden", str(args.hidden)] if args.hidden else []
            runs = {}
            for measure, env in (("memory", memory_env), ("time", dict(os.environ))):
                out = subprocess.run([*cmd, "--measure", measure], env=env, capture_output=True, text=True, check=True)
                runs[measure] = json.loads(out.stdout.strip().splitlines()[-1])
            results.append({**runs["memory"], "time_s": runs["time"]["time_s"]})
            print(json.dumps(results[-1]), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.hidden:
        print(f"T={args.tokens}, H={args.hidden}; peak above the inputs and the hidden/weight gradients")
        print("| V | tail | k | logits path (s) | fused (s) | fused / logits | logits path peak | fused peak |")
        print("|---|---|---|---|---|---|---|---|")
        for r in results:
            if r["mode"].startswith("fused"):
                tail = r["mode"].split("-")[1]
                u = next(x for x in results if x["vocab"] == r["vocab"] and x["mode"] == f"logits-{tail}"
                         and x["top_k"] == r["top_k"])  # fmt: skip
                print(
                    f"| {r['vocab']} | {tail} | {r['top_k']} | {u['time_s']:.2f} | {r['time_s']:.2f} | "
                    f"{r['time_s'] / u['time_s']:.2f} | {_peak(u)} | {_peak(r)} |"
                )
        return
    print("| V | loss | k | time (s) | time / full | extra peak ([T,V] fp32 units) | extra peak (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        full = next(x for x in results if x["vocab"] == r["vocab"] and x["mode"] == "full")
        print(
            f"| {r['vocab']} | {r['mode']} | {r['top_k'] or '-'} | {r['time_s']:.3f} | "
            f"{r['time_s'] / full['time_s']:.2f} | {r['extra_over_TV']:.3f} | {r['extra_bytes'] / 2**20:.0f} |"
        )


if __name__ == "__main__":
    main()
