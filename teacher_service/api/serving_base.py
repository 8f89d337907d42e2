"""What every scoring endpoint shares: the served model's checks, the service limits, and scoring with metrics."""

from __future__ import annotations

from typing import TypeVar

from shared.codec import TopkFrame
from teacher_service.config import ServiceConfig
from teacher_service.deps import Config, Engine, Metrics, ScorerDep
from teacher_service.engines.base import ScoreJob, TeacherEngine
from teacher_service.errors import ServiceError
from teacher_service.metrics import ServiceMetrics
from teacher_service.scheduling import Scorer

S = TypeVar("S", bound="ServingBase")


class ServingBase:
    """Checks that need the served model or the service limits (the schemas check the rest), then scoring.

    Built per request by :meth:`dependency`, so a route only ever sees a loaded engine (503 before).
    """

    def __init__(self, engine: TeacherEngine, scorer: Scorer, config: ServiceConfig, metrics: ServiceMetrics) -> None:
        self.engine, self.scorer, self.config, self.metrics = engine, scorer, config, metrics

    @classmethod
    def dependency(cls: type[S], engine: Engine, scorer: ScorerDep, config: Config, metrics: Metrics) -> S:
        """FastAPI dependency: ``Annotated[TopkServing, Depends(TopkServing.dependency)]``."""
        return cls(engine, scorer, config, metrics)

    def check_model_name(self, requested: str | None) -> None:
        served = self.engine.served_model_name
        if requested is not None and requested != served:
            raise ServiceError(404, f"The model `{requested}` does not exist; this teacher serves `{served}`.", "model")

    def check_top_k(self, k: int, param: str) -> None:
        if k > self.config.max_top_k:
            raise ServiceError(400, f"{param}={k} exceeds this teacher's maximum of {self.config.max_top_k}", param)
        if k > self.engine.vocab_size:
            raise ServiceError(400, f"{param}={k} exceeds the vocabulary size {self.engine.vocab_size}", param)

    def check_temperature(self, temperature: float, param: str = "temperature") -> None:
        if temperature != 1.0 and not self.engine.applies_temperature:
            raise ServiceError(
                400,
                f"{param}={temperature}: the {self.engine.engine_name} engine computes log-probs at temperature 1 "
                "only (vLLM's prompt log-probs skip temperature); ask for temperature 1 and temper on the client, "
                "or serve the teacher with the transformers engine",
                param,
            )

    def validate_sequences(self, sequences: list[list[int]], param: str = "sequences", min_len: int = 2) -> None:
        """Count, size and token-id checks shared by every scoring route."""
        config = self.config
        if len(sequences) > config.max_sequences:
            raise ServiceError(413, f"{len(sequences)} sequences exceed the limit of {config.max_sequences}", param)
        total = sum(len(s) for s in sequences)
        if total > config.max_tokens:
            raise ServiceError(413, f"{total} tokens exceed the limit of {config.max_tokens}", param)
        vocab, max_len = self.engine.vocab_size, self.engine.max_model_len
        for i, seq in enumerate(sequences):
            if len(seq) < min_len:
                raise ServiceError(
                    400, f"{param}[{i}] has {len(seq)} tokens; at least {min_len} are needed", f"{param}[{i}]"
                )
            if max_len and len(seq) > max_len:
                raise ServiceError(
                    400, f"{param}[{i}] has {len(seq)} tokens, more than the model's {max_len}", f"{param}[{i}]"
                )
            lo, hi = min(seq), max(seq)
            if lo < 0 or hi >= vocab:
                bad = lo if lo < 0 else hi
                raise ServiceError(400, f"{param}[{i}] holds token id {bad} outside [0, {vocab})", f"{param}[{i}]")

    async def score(self, job: ScoreJob) -> TopkFrame:
        """The job's rows from the scorer (micro-batcher or engine), counted in the throughput metrics."""
        frame = await self.scorer.score(job)
        self.metrics.rows.inc(int(frame.token_ids.shape[0]))
        self.metrics.tokens.inc(job.num_tokens)
        return frame
