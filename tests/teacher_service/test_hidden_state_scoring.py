"""The transformers engine scores from hidden states: rows equal to the full-logits computation.

The reference is the model's own forward pass (``model(...).logits``, every position, every transform its
forward applies), turned into log-probs in float64 at the requested temperature. Checked on the pre-trained
tiny teacher and on random models with tied and untied heads and with soft-capped or scaled logits, with
every extra (target log-probs and ranks, the exact tail), at T = 1 and T != 1; and the refusal of heads the
engine cannot reproduce.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from demo.tiny import TinyAssets
from shared.alignment import pad_sequences, span_positions
from teacher_service.engines.base import ScoreJob
from teacher_service.engines.head import UnsupportedHeadError, topk_rows
from teacher_service.engines.hf import HFEngine

K = 8
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2}
SMALL_FF = {**SMALL, "intermediate_size": 128}


def reference(model: torch.nn.Module, job: ScoreJob) -> dict[str, torch.Tensor]:
    """The job's rows from the model's full logits, float64 log-softmax at the job's temperature."""
    input_ids, mask = pad_sequences(job.sequences, pad_id=0)
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=mask).logits.double()
    b_idx, t_idx = span_positions(mask, job.row_spans)
    logp = torch.log_softmax(logits[b_idx, t_idx] / job.temperature, dim=-1)
    vals, ids = logp.topk(job.top_k, dim=-1)
    targets = input_ids[b_idx, t_idx + 1]
    tail = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1)
    target = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ranks = (logp > target.unsqueeze(-1)).sum(-1) + 1
    return {"ids": ids, "logprobs": vals, "tail": tail, "target": target, "ranks": ranks}


def assert_rows_equal(engine: HFEngine, model: torch.nn.Module, job: ScoreJob, atol: float = 2e-5) -> None:
    frame = engine.score_sync(job)
    ref = reference(model, job)
    assert frame.token_ids.shape[0] == ref["ids"].shape[0] > 0
    assert torch.equal(frame.token_ids.long(), ref["ids"])
    torch.testing.assert_close(frame.logprobs.double(), ref["logprobs"], atol=atol, rtol=0)
    assert frame.tail_logmass is not None and frame.target_logprobs is not None and frame.target_ranks is not None
    torch.testing.assert_close(frame.tail_logmass.double(), ref["tail"], atol=atol, rtol=1e-5)
    torch.testing.assert_close(frame.target_logprobs.double(), ref["target"], atol=atol, rtol=0)
    assert torch.equal(frame.target_ranks.long(), ref["ranks"])


def job_for(vocab: int, temperature: float = 1.0, seed: int = 0) -> ScoreJob:
    """Three sequences of different lengths; spans with gaps, one sequence without rows."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (21, 9, 14)]
    spans = [[(0, 3), (7, 20)], [], [(5, 13)]]
    return ScoreJob(seqs, spans, K, want_target_logprobs=True, want_tail_logmass=True, temperature=temperature)


@pytest.fixture(scope="module")
def tiny_engine(tiny_assets: TinyAssets) -> HFEngine:
    engine = HFEngine(tiny_assets.teacher, dtype="float32")
    engine.load()
    return engine


def serve(tiny_assets: TinyAssets, model: torch.nn.Module, **kwargs: int) -> HFEngine:
    """An engine serving ``model`` (the tiny tokenizer only provides the handshake)."""
    engine = HFEngine(tiny_assets.teacher, dtype="float32", **kwargs)
    engine.use_model(model.eval())
    return engine


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_pretrained_teacher_rows_equal_full_logits(tiny_engine: HFEngine, temperature: float) -> None:
    assert tiny_engine._model is not None
    job = job_for(tiny_engine.vocab_size, temperature)
    assert_rows_equal(tiny_engine, tiny_engine._model, job)


def test_small_chunks_and_batches_give_the_same_rows(tiny_assets: TinyAssets, tiny_engine: HFEngine) -> None:
    """Logits blocks of one row and forward chunks of one sequence: the same rows as the defaults."""
    assert tiny_engine._model is not None
    engine = serve(tiny_assets, tiny_engine._model, logits_chunk_rows=1, max_batch_tokens=1)
    job = job_for(engine.vocab_size, 1.3, seed=1)
    a, b = engine.score_sync(job), tiny_engine.score_sync(job)
    assert torch.equal(a.token_ids, b.token_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    assert a.tail_logmass is not None and b.tail_logmass is not None
    torch.testing.assert_close(a.tail_logmass, b.tail_logmass, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_random_llama_tied_and_untied(tiny_assets: TinyAssets, tied: bool) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, tie_word_embeddings=tied, **SMALL_FF))
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    engine = serve(tiny_assets, model)
    for temperature in (1.0, 0.5):
        assert_rows_equal(engine, model, job_for(300, temperature))


@pytest.mark.parametrize(
    ("model_cls", "config"),
    [
        (Gemma2ForCausalLM, Gemma2Config(vocab_size=256, head_dim=32, final_logit_softcapping=0.5, **SMALL_FF)),
        (CohereForCausalLM, CohereConfig(vocab_size=256, logit_scale=3.0, **SMALL_FF)),
        (GraniteForCausalLM, GraniteConfig(vocab_size=256, logits_scaling=0.25, **SMALL_FF)),
    ],
    ids=["gemma2-softcap", "cohere-logit-scale", "granite-logits-scaling"],
)
def test_heads_that_transform_logits(tiny_assets: TinyAssets, model_cls: type, config: object) -> None:
    """Soft-capped and scaled heads: with these settings the transform changes every row, so a head scored
    without it would fail the comparison."""
    torch.manual_seed(0)
    model = model_cls(config)
    engine = serve(tiny_assets, model)
    assert engine._head is not None and len(engine._head.transforms) == 1
    assert_rows_equal(engine, model, job_for(256, 0.8))


class DoubledLogitsLlama(LlamaForCausalLM):
    """A head this engine does not know: the forward doubles the logits."""

    def forward(self, *args: object, **kwargs: object) -> object:
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_unknown_head_is_refused_at_load(tiny_assets: TinyAssets) -> None:
    torch.manual_seed(0)
    model = DoubledLogitsLlama(LlamaConfig(vocab_size=300, **SMALL_FF))
    with pytest.raises(UnsupportedHeadError, match="does not reproduce the model's own log-probs"):
        serve(tiny_assets, model)


def test_config_scaling_not_reproduced_is_refused(tiny_assets: TinyAssets) -> None:
    config = LlamaConfig(vocab_size=300, **SMALL_FF)
    config.lm_head_multiplier = 0.5
    with pytest.raises(UnsupportedHeadError, match="lm_head_multiplier"):
        serve(tiny_assets, LlamaForCausalLM(config))


def test_topk_rows_leaves_its_input_and_matches_float64() -> None:
    """The logits-in form (used on vLLM's side of the comparison tests): exact tail even when it is tiny."""
    torch.manual_seed(0)
    logits = torch.randn(37, 500) * 4
    logits[0, 3] = 60.0  # a confident row: the tail is about e^-50, far below fp32's 1 - sum(p) resolution
    before = logits.clone()
    targets = torch.randint(0, 500, (37,))
    got = topk_rows(logits, 5, targets, want_tail=True, temperature=1.5, row_chunk=4)
    assert torch.equal(logits, before)
    logp = torch.log_softmax(logits.double() / 1.5, dim=-1)
    vals, ids = logp.topk(5, dim=-1)
    assert torch.equal(got.ids.long(), ids)
    torch.testing.assert_close(got.logprobs.double(), vals, atol=1e-5, rtol=0)
    tail = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1)
    assert got.tail_logmass is not None
    torch.testing.assert_close(got.tail_logmass.double(), tail, atol=1e-4, rtol=1e-5)
    assert float(got.tail_logmass[0]) < -30


def test_whole_vocabulary_has_an_empty_tail() -> None:
    logits = torch.randn(3, 10)
    got = topk_rows(logits, 10, want_tail=True)
    assert got.tail_logmass is not None and torch.isneginf(got.tail_logmass).all()
    torch.testing.assert_close(got.logprobs.exp().sum(-1), torch.ones(3))
