"""The wire contract between the teacher service and the student trainer."""

from shared.alignment import (
    next_token_labels,
    num_rows,
    pad_sequences,
    padded_positions,
    row_offsets,
    vllm_entry_for_row,
)
from shared.codec import LOGPROB_DTYPES, FrameError, TopkFrame, decode_frame, encode_frame
from shared.fingerprint import tokenizer_fingerprint
from shared.protocol import (
    FORMAT_VERSION,
    TOPK_MEDIA_TYPE,
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    RequestLimits,
    SequenceTopk,
    TeacherInfo,
    TopkJsonResponse,
    TopkRequest,
)

__all__ = [
    "FORMAT_VERSION",
    "LOGPROB_DTYPES",
    "TOPK_MEDIA_TYPE",
    "ErrorDetail",
    "ErrorResponse",
    "FrameError",
    "ModelCard",
    "ModelList",
    "RequestLimits",
    "SequenceTopk",
    "TeacherInfo",
    "TopkFrame",
    "TopkJsonResponse",
    "TopkRequest",
    "decode_frame",
    "encode_frame",
    "next_token_labels",
    "num_rows",
    "pad_sequences",
    "padded_positions",
    "row_offsets",
    "tokenizer_fingerprint",
    "vllm_entry_for_row",
]
