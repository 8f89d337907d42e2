"""`/v1/topk_logprobs`: the request checked against the served model and limits, scored, and encoded."""

from __future__ import annotations

import orjson
from fastapi import Response

from shared.codec import LOGPROB_DTYPES, TopkFrame, encode_frame
from shared.protocol import TOPK_MEDIA_TYPE, SequenceTopk, TopkJsonResponse, TopkRequest
from shared.vllm_logprobs import json_floats
from teacher_service.api.serving_base import ServingBase
from teacher_service.engines.base import ScoreJob


def frame_to_json(frame: TopkFrame, model: str, vocab_size: int) -> TopkJsonResponse:
    """The frame as JSON, for humans and curl (-inf written as -9999.0, as vLLM does); each sequence's spans
    where the frame carries them."""
    spans = frame.spans() if frame.has_spans else None
    seqs = []
    for b in range(frame.num_sequences):
        rows = frame.rows(b)
        seqs.append(
            SequenceTopk(
                first_row=int(frame.first_rows[b]),
                row_spans=None if spans is None else [[start, end] for start, end in spans[b]],
                token_ids=frame.token_ids[rows].tolist(),
                logprobs=json_floats(frame.logprobs[rows]),
                target_logprobs=None if frame.target_logprobs is None else json_floats(frame.target_logprobs[rows]),
                tail_logmass=None if frame.tail_logmass is None else json_floats(frame.tail_logmass[rows]),
            )
        )
    return TopkJsonResponse(
        model=model, top_k=frame.top_k, vocab_size=vocab_size, format_version=frame.format_version, sequences=seqs
    )


class TopkServing(ServingBase):
    """This service's own scoring endpoint: ragged top-k rows for a micro-batch of sequences."""

    def validate(self, req: TopkRequest) -> None:
        """Checks that need the served model or the service limits (the schema checks the rest)."""
        self.check_model_name(req.model)
        self.check_top_k(req.top_k, "top_k")
        self.check_temperature(req.resolved_temperature())
        self.validate_sequences(req.sequences)

    async def create_topk(self, req: TopkRequest, as_json: bool) -> Response:
        """Top-k rows of every requested row of every sequence: a binary frame, or JSON when asked for.

        A request by ``row_spans`` is answered with its spans (format 2); one by ``first_rows`` (or neither)
        exactly as before spans existed (format 1), so clients that read only format 1 keep working.
        """
        self.validate(req)
        job = ScoreJob(
            sequences=req.sequences,
            row_spans=req.resolved_row_spans(),
            top_k=req.top_k,
            want_target_logprobs=req.return_target_logprobs,
            want_tail_logmass=req.return_tail_logmass,
            temperature=req.resolved_temperature(),
        )
        frame = await self.score(job)
        frame = frame.with_spans() if req.row_spans is not None else frame.without_spans()
        engine = self.engine
        if as_json:
            body = frame_to_json(frame, engine.served_model_name, engine.vocab_size)
            body.temperature = job.temperature
            return Response(orjson.dumps(body.model_dump(exclude_none=True)), media_type="application/json")
        frame.target_ranks = None  # used by the vLLM-compatible JSON answer only
        q8 = req.logprobs_dtype == "q8"
        frame.logprobs = frame.logprobs.float() if q8 else frame.logprobs.to(LOGPROB_DTYPES[req.logprobs_dtype])
        frame.metadata = {
            "model": engine.served_model_name,
            "vocab_size": str(engine.vocab_size),
            "top_k": str(req.top_k),
            "temperature": repr(job.temperature),
        }  # encode_frame adds the format_version (3 for packed ids or q8 log-probs)
        data = encode_frame(frame, ids_encoding=req.ids_encoding, vocab_size=engine.vocab_size, logprobs_q8=q8)
        return Response(data, media_type=TOPK_MEDIA_TYPE)
