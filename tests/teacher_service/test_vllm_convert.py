"""vLLM prompt log-probs -> TopkFrame, on synthetic outputs laid out exactly as vLLM lays them out.

No vLLM needed: the fakes below reproduce vLLM's ``append_logprobs_for_next_position`` (flat lists,
or a dict per position whose first key is the actual token), and the frame is compared with the
transformers engine's ``topk_rows`` on the same logits.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from demo.tiny import TinyAssets
from shared.alignment import vllm_entry_for_row
from shared.vllm_logprobs import PromptLogprobsError, rows_from_dicts, rows_from_flat
from teacher_service.app import build_engine
from teacher_service.cli import parse_config
from teacher_service.engines.base import ScoreJob
from teacher_service.engines.hf import topk_rows
from teacher_service.engines.vllm import VLLMEngine, cpu_thread_binding, frame_from_prompt_logprobs, prompt_for_spans

VOCAB = 50
K = 5


def vllm_like(logits: torch.Tensor, seq: list[int], k: int) -> tuple[SimpleNamespace, list[dict | None]]:
    """Both of vLLM's prompt log-prob forms for one sequence; ``logits[j]`` predicts ``seq[j + 1]``."""
    lp = torch.log_softmax(logits.double(), -1).float()
    flat = SimpleNamespace(start_indices=[0], end_indices=[0], token_ids=[], logprobs=[], ranks=[])
    dicts: list[dict | None] = [None]
    for j in range(len(seq) - 1):
        vals, idx = lp[j].topk(k)
        actual = seq[j + 1]
        rank = int((lp[j] > lp[j, actual]).sum()) + 1
        ids = [actual, *idx.tolist()]
        lps = [float(lp[j, actual]), *vals.tolist()]
        ranks = [rank, *range(1, k + 1)]
        flat.start_indices.append(len(flat.token_ids))
        flat.token_ids += ids
        flat.logprobs += lps
        flat.ranks += ranks
        flat.end_indices.append(len(flat.token_ids))
        # vLLM's dict comprehension: a duplicate actual token keeps its first key position, takes the top-k value
        dicts.append({t: SimpleNamespace(logprob=v, rank=r) for t, v, r in zip(ids, lps, ranks, strict=True)})
    return flat, dicts


@pytest.fixture
def batch() -> tuple[list[list[int]], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    seqs, logits = [], []
    for n in (2, 6, 11):
        seq = torch.randint(VOCAB, (n,), generator=gen).tolist()
        lg = torch.randn(n - 1, VOCAB, generator=gen) * 3
        # make the actual token the argmax on some rows: the in-top-k (collapsed dict) case
        for j in range(0, n - 1, 2):
            lg[j, seq[j + 1]] += 20
        seqs.append(seq)
        logits.append(lg)
    return seqs, logits


@pytest.mark.parametrize("form", ["flat", "dict"])
def test_frame_matches_topk_of_the_same_logits(batch, form: str) -> None:
    seqs, logits = batch
    first_rows = [0, 2, 7]
    outs = [vllm_like(lg, s, K)[0 if form == "flat" else 1] for lg, s in zip(logits, seqs, strict=True)]
    job = ScoreJob.from_first_rows(seqs, first_rows, K, want_target_logprobs=True, want_tail_logmass=True)
    frame = frame_from_prompt_logprobs(outs, job)
    frame.validate()

    rows = torch.cat([lg[f:] for lg, f in zip(logits, first_rows, strict=True)])
    targets = torch.tensor([t for s, f in zip(seqs, first_rows, strict=True) for t in s[f + 1 :]])
    ref = topk_rows(rows, K, targets, want_tail=True)
    ids, lps, tgt, tail = ref.ids, ref.logprobs, ref.target_logprobs, ref.tail_logmass
    assert frame.row_offsets.tolist() == [0, 1, 4, 7]
    assert frame.first_rows.tolist() == first_rows
    assert frame.token_ids.dtype == torch.int32 and frame.logprobs.dtype == torch.float32
    assert torch.equal(frame.token_ids, ids)
    torch.testing.assert_close(frame.logprobs, lps, atol=1e-5, rtol=0)
    torch.testing.assert_close(frame.target_logprobs, tgt, atol=1e-5, rtol=0)
    assert torch.equal(frame.target_ranks, ref.target_ranks)
    # the tail comes from float32 top-k log-probs: compare in probability, and in log where the tail is not tiny
    torch.testing.assert_close(frame.tail_logmass.exp(), tail.exp(), atol=1e-6, rtol=0)
    big = tail > -8
    torch.testing.assert_close(frame.tail_logmass[big], tail[big], atol=1e-3, rtol=0)


def test_extras_only_when_asked(batch) -> None:
    seqs, logits = batch
    outs = [vllm_like(lg, s, K)[0] for lg, s in zip(logits, seqs, strict=True)]
    frame = frame_from_prompt_logprobs(outs, ScoreJob.from_first_rows(seqs, [0, 0, 0], K))
    assert frame.target_logprobs is None and frame.tail_logmass is None
    assert frame.token_ids.shape == (1 + 5 + 10, K)


def test_flat_and_dict_forms_agree_row_for_row(batch) -> None:
    seqs, logits = batch
    flat, dicts = vllm_like(logits[2], seqs[2], K)
    assert any(len(d) == K for d in dicts[1:]), "fixture must cover the actual token inside the top-k"
    for first in (0, 4, 9):
        a, b = rows_from_flat(flat, seqs[2], first, K), rows_from_dicts(dicts, seqs[2], first, K)
        for x, y in zip(a, b, strict=True):
            assert x.shape[0] == len(seqs[2]) - 1 - first
            assert torch.equal(torch.from_numpy(x), torch.from_numpy(y))
    # our row j is vLLM's entry j + 1
    j = 3
    entry = dicts[vllm_entry_for_row(j)]
    assert next(iter(entry)) == seqs[2][j + 1]


@pytest.mark.parametrize("form", ["flat", "dict"])
def test_span_rows_are_cut_from_prompts_sent_up_to_their_last_span(batch, form: str) -> None:
    """vLLM scores whole prompts: each is sent up to its last span's last label (none without spans), rows are
    read from its first span and the span rows cut out; they equal top-k of the same logits at the spans."""
    seqs, logits = batch
    spans = [[], [(1, 2), (3, 4)], [(0, 1), (4, 6), (8, 9)]]
    job = ScoreJob(seqs, spans, K, want_target_logprobs=True, want_tail_logmass=True)
    sent = [prompt_for_spans(s, sp) for s, sp in zip(seqs, spans, strict=True)]
    assert [len(p) for p in sent] == [0, 5, 10]  # the last rows of sequence 1 and 2 need no more tokens
    outs = [
        vllm_like(lg[: len(p) - 1], p, K)[0 if form == "flat" else 1] if p else None
        for lg, p in zip(logits, sent, strict=True)
    ]
    frame = frame_from_prompt_logprobs(outs, job)
    frame.validate()
    assert frame.spans() == spans and frame.first_rows.tolist() == [1, 1, 0]
    assert frame.row_offsets.tolist() == [0, 0, 2, 6]

    rows = torch.cat([lg[s:e] for lg, sp in zip(logits, spans, strict=True) for s, e in sp])
    targets = torch.tensor(
        [seq[j + 1] for seq, sp in zip(seqs, spans, strict=True) for s, e in sp for j in range(s, e)]
    )
    ref = topk_rows(rows, K, targets, want_tail=True)
    assert torch.equal(frame.token_ids, ref.ids) and torch.equal(frame.target_ranks, ref.target_ranks)
    torch.testing.assert_close(frame.logprobs, ref.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(frame.target_logprobs, ref.target_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(frame.tail_logmass.exp(), ref.tail_logmass.exp(), atol=1e-6, rtol=0)
    with pytest.raises(PromptLogprobsError, match="sequence 1, which has row spans"):
        frame_from_prompt_logprobs([None, None, outs[2]], job)
    nothing = frame_from_prompt_logprobs([None] * 3, ScoreJob(seqs, [[], [], []], K, want_target_logprobs=True))
    assert nothing.token_ids.shape == (0, K) and nothing.target_logprobs.shape == (0,) and nothing.spans() == [[]] * 3


def test_unexpected_layouts_raise_never_fill(batch) -> None:
    seqs, logits = batch
    flat, dicts = vllm_like(logits[1], seqs[1], K)
    with pytest.raises(PromptLogprobsError, match="entries each"):
        rows_from_flat(flat, seqs[1], 0, K - 1)  # asked for another k than vLLM computed
    with pytest.raises(PromptLogprobsError, match="positions"):
        rows_from_flat(flat, seqs[1][:-1], 0, K)  # another sequence length
    shifted = [*seqs[1][:3], (seqs[1][3] + 1) % VOCAB, *seqs[1][4:]]
    with pytest.raises(PromptLogprobsError, match="next tokens"):
        rows_from_flat(flat, shifted, 0, K)
    with pytest.raises(PromptLogprobsError, match="next tokens"):
        rows_from_dicts(dicts, shifted, 0, K)
    with pytest.raises(PromptLogprobsError, match="entries for top_k"):
        rows_from_dicts(dicts, seqs[1], 0, K + 2)
    with pytest.raises(PromptLogprobsError, match="results for"):
        frame_from_prompt_logprobs([flat], ScoreJob.from_first_rows(seqs[:2], [0, 0], K))


def test_vllm_flags_reach_the_engine(tiny_assets: TinyAssets) -> None:
    config = parse_config(
        [
            "--model",
            str(tiny_assets.teacher),
            "--engine",
            "vllm",
            "--max-top-k",
            "32",
            "--dtype",
            "float32",
            "--tensor-parallel-size",
            "2",
            "--data-parallel-size",
            "3",
            "--gpu-memory-utilization",
            "0.3",
            "--max-model-len",
            "200",
            "--max-num-batched-tokens",
            "1024",
            "--enforce-eager",
        ]
    )
    engine = build_engine(config)  # constructs only: vLLM is imported when the engine starts
    assert isinstance(engine, VLLMEngine) and engine.engine_name == "vllm"
    kw = engine.engine_kwargs
    assert kw["max_logprobs"] == 32 and kw["enable_prefix_caching"] is False
    assert kw["logprobs_mode"] == "raw_logprobs"
    assert (kw["tensor_parallel_size"], kw["data_parallel_size"]) == (2, 3)
    assert (kw["gpu_memory_utilization"], kw["max_model_len"], kw["max_num_batched_tokens"]) == (0.3, 200, 1024)
    assert kw["enforce_eager"] is True and kw["dtype"] == "float32"
    defaults = parse_config(["--model", "m"])
    assert defaults.engine == "transformers" and defaults.enforce_eager is False
    assert defaults.max_model_len is None and defaults.max_num_batched_tokens is None
    assert defaults.gpu_memory_utilization == 0.9


def test_parallel_flags_need_the_vllm_engine() -> None:
    with pytest.raises(SystemExit):
        parse_config(["--model", "m", "--tensor-parallel-size", "2"])
    with pytest.raises(SystemExit):
        parse_config(["--model", "m", "--engine", "vllm", "--gpu-memory-utilization", "1.5"])


def test_cpu_binding_gives_each_worker_its_own_cores() -> None:
    assert cpu_thread_binding([0, 1], 2) == "0|1"
    assert cpu_thread_binding([3, 2, 5, 4, 6], 2) == "2,3|4,5,6"  # sorted, the remainder to the last worker
    assert cpu_thread_binding(range(8), 4) == "0,1|2,3|4,5|6,7"  # DP x TP workers, in vLLM's rank order
    with pytest.raises(ValueError, match="need a core each"):
        cpu_thread_binding([0, 1], 4)
