"""What a client reads before it sends work: the model card (OpenAI/vLLM) and the handshake."""

from __future__ import annotations

from shared.protocol import ModelCard, ModelList, RequestLimits, TeacherInfo
from teacher_service.config import ServiceConfig
from teacher_service.engines.base import TeacherEngine
from teacher_service.revision import served_revision


def model_list(engine: TeacherEngine, created: int) -> ModelList:
    """The one served model, as `vllm serve` lists it (``root``: its directory, where it has one)."""
    card = ModelCard(
        id=engine.served_model_name,
        created=created,
        root=engine.model_dir,
        max_model_len=engine.max_model_len or None,
    )
    return ModelList(data=[card])


def teacher_info(engine: TeacherEngine, config: ServiceConfig) -> TeacherInfo:
    """The handshake: vocabulary, tokenizer fingerprint and limits a client checks before training."""
    return TeacherInfo(
        model=engine.served_model_name,
        vocab_size=engine.vocab_size,
        tokenizer_fingerprint=engine.tokenizer_fingerprint,
        max_top_k=config.max_top_k,
        limits=RequestLimits(
            max_top_k=config.max_top_k,
            max_sequences=config.max_sequences,
            max_tokens=config.max_tokens,
            max_body_bytes=config.max_body_bytes,
        ),
        engine=engine.engine_name,
        applies_temperature=engine.applies_temperature,
        ids_encodings=["int32", "packed"],
        logprobs_dtypes=["float16", "bfloat16", "float32", "q8"],
        model_revision=served_revision(engine.model_dir, config.model_revision),
    )
