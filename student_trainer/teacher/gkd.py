"""The client of this project's teacher service: ``/v1/info`` handshake, ``/v1/topk_logprobs`` binary frames."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from shared.alignment import span_rows
from shared.codec import FrameError, TopkFrame, decode_frame
from shared.protocol import TOPK_MEDIA_TYPE, LogprobDtype, TeacherInfo, TopkRequest
from student_trainer.teacher.base import HttpTeacher
from student_trainer.teacher.errors import TeacherMismatchError, TeacherProtocolError

logger = logging.getLogger(__name__)


IDS_ENCODINGS = ("auto", "int32", "packed")
"""``--teacher_ids_encoding``: auto asks for packed ids where the teacher's handshake offers them."""


class TeacherClient(HttpTeacher):
    """Talks to one teacher service of this project. Create one per trainer; use from a single event loop."""

    def __init__(self, base_url: str, *, ids_encoding: str = "auto", **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        if ids_encoding not in IDS_ENCODINGS:
            raise ValueError(f"ids_encoding {ids_encoding!r}; expected one of {IDS_ENCODINGS}")
        self.ids_encoding = ids_encoding
        self._info: TeacherInfo | None = None

    def _wire_ids(self, info: TeacherInfo) -> str:
        """The ids encoding to ask for: packed where offered (auto) or demanded; never one the teacher lacks."""
        if self.ids_encoding == "auto":
            return "packed" if "packed" in info.ids_encodings else "int32"
        if self.ids_encoding not in info.ids_encodings:
            raise TeacherMismatchError(
                f"teacher {info.model!r} answers ids_encoding {info.ids_encodings}, not {self.ids_encoding!r}; "
                "use --teacher_ids_encoding auto or upgrade the teacher service"
            )
        return self.ids_encoding

    async def info(self) -> TeacherInfo:
        """The teacher's handshake, fetched once per client instance."""
        if self._info is None:
            resp = await self._request("GET", "/v1/info")
            try:
                self._info = TeacherInfo.model_validate_json(resp.content)
            except ValueError as exc:
                raise TeacherProtocolError(f"/v1/info answer is not a teacher handshake: {exc}") from exc
            logger.info(
                "teacher %s serves %r (vocab %d, max k %d, engine %s)",
                self.base_url,
                self._info.model,
                self._info.vocab_size,
                self._info.max_top_k,
                self._info.engine,
            )
        return self._info

    async def model_name(self) -> str:
        return (await self.info()).model

    async def check_compatible(
        self, vocab_size: int, tokenizer_fingerprint: str, top_k: int, probe: tuple[str, list[int]] | None = None
    ) -> TeacherInfo:
        """Refuse to train against a teacher that would teach the wrong tokens (``probe`` is for other APIs)."""
        info = await self.info()
        if info.tokenizer_fingerprint != tokenizer_fingerprint:
            hint = ""
            if info.format_version < 2:  # its fingerprint left out the chat template and the added tokens
                hint = " (this teacher predates format 2, whose fingerprint also covers the chat template: upgrade it)"
            raise TeacherMismatchError(
                f"tokenizer mismatch: teacher {info.model!r} has {info.tokenizer_fingerprint}, "
                f"student has {tokenizer_fingerprint}; teacher and student must share a tokenizer{hint}"
            )
        if info.vocab_size != vocab_size:
            raise TeacherMismatchError(
                f"vocabulary size mismatch: teacher {info.model!r} has {info.vocab_size}, student has {vocab_size}"
            )
        if top_k > info.max_top_k:
            raise TeacherMismatchError(f"--top_k {top_k} exceeds the teacher's maximum of {info.max_top_k}")
        self._wire_ids(info)
        return info

    async def topk_logprobs(
        self,
        sequences: Sequence[Sequence[int]],
        top_k: int,
        first_rows: Sequence[int] | None = None,
        *,
        row_spans: Sequence[Sequence[tuple[int, int]]] | None = None,
        logprobs_dtype: LogprobDtype = "float16",
        return_target_logprobs: bool = False,
        return_tail_logmass: bool = False,
        temperature: float = 1.0,
    ) -> TopkFrame:
        """Top-k rows of a whole micro-batch in one request, checked against what was asked.

        At ``temperature`` != 1 the rows are log_softmax(logits / temperature) with the tail exact at it, which
        only a teacher whose handshake says ``applies_temperature`` computes; any other is refused here.

        ``row_spans`` is sent as such (the answer is a format 2 frame carrying the spans), which a teacher
        older than format 2 cannot take: that is refused here, naming the teacher's format.
        """
        info = await self.info()
        model = info.model
        if row_spans is not None and info.format_version < 2:
            raise TeacherMismatchError(
                f"teacher {model!r} writes frame format {info.format_version}, which has no row spans "
                "(format 2 and above); upgrade the teacher service"
            )
        if logprobs_dtype not in info.logprobs_dtypes:
            raise TeacherMismatchError(
                f"teacher {model!r} answers logprobs_dtype {info.logprobs_dtypes}, not {logprobs_dtype!r}"
            )
        if temperature != 1.0 and not info.applies_temperature:
            raise TeacherMismatchError(
                f"teacher {model!r} ({info.engine} engine) computes log-probs at temperature 1 only; "
                f"rows at temperature {temperature} need a teacher that applies it (the transformers engine)"
            )
        req = TopkRequest(
            model=model,
            sequences=[list(map(int, s)) for s in sequences],
            top_k=top_k,
            first_rows=None if first_rows is None else [int(f) for f in first_rows],
            row_spans=None if row_spans is None else [[[int(a), int(b)] for a, b in spans] for spans in row_spans],
            logprobs_dtype=logprobs_dtype,
            ids_encoding=self._wire_ids(info),
            return_target_logprobs=return_target_logprobs,
            return_tail_logmass=return_tail_logmass,
            temperature=None if temperature == 1.0 else temperature,
        )
        resp = await self._request(
            "POST",
            "/v1/topk_logprobs",
            content=req.model_dump_json(
                exclude_none=True, exclude_defaults=True
            ),  # an older teacher knows no newer field
            headers={"content-type": "application/json", "accept": TOPK_MEDIA_TYPE},
        )
        try:
            frame = decode_frame(resp.content)
        except FrameError as exc:
            raise TeacherProtocolError(f"teacher sent an unreadable frame: {exc}") from exc
        self._check_frame(frame, req, model)
        return frame

    @staticmethod
    def _check_frame(frame: TopkFrame, req: TopkRequest, model: str) -> None:
        """Rows per sequence, spans, first rows, k and model as asked: a mismatch is never papered over."""
        spans = req.resolved_row_spans()
        expected = [span_rows(s) for s in spans]
        got = (frame.row_offsets[1:] - frame.row_offsets[:-1]).tolist()
        if got != expected:
            raise TeacherProtocolError(f"teacher returned rows per sequence {got}, expected {expected}")
        if req.row_spans is not None and not frame.has_spans:
            raise TeacherProtocolError("teacher answered row_spans with a frame that carries no spans")
        answered = frame.spans()
        if answered != spans:
            wrong = next(b for b, (a, s) in enumerate(zip(answered, spans, strict=True)) if a != s)
            raise TeacherProtocolError(
                f"teacher returned rows {answered[wrong]} of sequence {wrong}, asked for {spans[wrong]}"
            )
        if frame.top_k != req.top_k:
            raise TeacherProtocolError(f"teacher returned k={frame.top_k}, asked for {req.top_k}")
        if frame.first_rows.tolist() != req.resolved_first_rows():
            raise TeacherProtocolError("teacher returned different first rows than requested")
        if frame.metadata.get("model") not in (None, model):
            raise TeacherProtocolError(f"frame is from model {frame.metadata.get('model')!r}, expected {model!r}")
        if float(frame.metadata.get("temperature", "1.0")) != req.resolved_temperature():
            raise TeacherProtocolError(
                f"frame is at temperature {frame.metadata.get('temperature')}, asked for {req.resolved_temperature()}"
            )
