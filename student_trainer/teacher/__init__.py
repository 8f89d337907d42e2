"""Teachers of the trainer: clients of the teacher APIs, the prefetcher that overlaps them with training,
and the in-process alternative.

Layout (as httpx's ``_transports``): ``base`` holds the client contract and the HTTP plumbing;
``gkd`` (this project's binary API) and ``vllm`` (``/v1/completions`` with ``prompt_logprobs``)
each import only the base; ``errors`` draws the exception tree. ``pool`` spreads one teacher's
requests over its replicas and waits out outages, ``routing`` sends each row to its named teacher,
``prefetch`` runs them on a background event loop, ``feed`` requests micro-batches ahead of training,
``outage`` lets every rank agree to stop, ``rows`` is what a step receives, ``service`` and ``local``
are the two teachers a run can have.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shared.fingerprint import tokenizer_fingerprint
from student_trainer.teacher.base import TOKENIZER_PROBE, AsyncTeacherClient, HttpTeacher
from student_trainer.teacher.errors import (
    TeacherError,
    TeacherMismatchError,
    TeacherOutageError,
    TeacherProtocolError,
    TeacherRequestError,
    TeacherUnavailableError,
)
from student_trainer.teacher.gkd import TeacherClient
from student_trainer.teacher.local import LocalTeacher
from student_trainer.teacher.pool import TeacherPool
from student_trainer.teacher.prefetch import TeacherPrefetcher
from student_trainer.teacher.routing import TeacherRouter
from student_trainer.teacher.rows import Teacher, TeacherRows
from student_trainer.teacher.service import OnPolicyRows, ServiceTeacher
from student_trainer.teacher.vllm import VllmTeacherClient

if TYPE_CHECKING:
    from student_trainer.config import TrainerConfig

__all__ = [
    "TOKENIZER_PROBE",
    "AsyncTeacherClient",
    "HttpTeacher",
    "LocalTeacher",
    "ServiceTeacher",
    "Teacher",
    "TeacherClient",
    "TeacherError",
    "TeacherMismatchError",
    "TeacherOutageError",
    "TeacherPool",
    "TeacherPrefetcher",
    "TeacherProtocolError",
    "TeacherRequestError",
    "TeacherRouter",
    "TeacherRows",
    "TeacherUnavailableError",
    "VllmTeacherClient",
    "make_client",
    "open_teacher",
]

logger = logging.getLogger(__name__)

CLIENTS: dict[str, type[TeacherClient] | type[VllmTeacherClient]] = {"gkd": TeacherClient, "vllm": VllmTeacherClient}
"""``--teacher_api`` -> client class."""


def make_client(api: str, base_url: str, **kwargs: Any) -> AsyncTeacherClient:
    """The client for ``--teacher_api`` (``gkd`` or ``vllm``)."""
    if api not in CLIENTS:
        raise ValueError(f"unknown teacher API {api!r}; expected one of {sorted(CLIENTS)}")
    return CLIENTS[api](base_url, **kwargs)


def open_teacher(
    config: TrainerConfig, tokenizer: Any, vocab: int, interrupted: Callable[[], bool] = lambda: False
) -> Teacher:
    """The run's teacher, checked against the student's tokenizer before any student weights load."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    if config.teacher_model_name_or_path is not None:
        return LocalTeacher(config.teacher_model_name_or_path, fingerprint, vocab)
    api_key = os.environ.get(config.teacher_api_key_env) or None
    wire = {"ids_encoding": config.teacher_ids_encoding} if config.teacher_api == "gkd" else {}

    def replica(url: str, host_header: str | None) -> AsyncTeacherClient:
        return make_client(
            config.teacher_api,
            url,
            timeout=config.teacher_timeout,
            api_key=api_key,
            max_retries=config.teacher_max_retries,
            connect_retries=1,  # a replica that refuses connections is ejected, not retried for seconds
            host_header=host_header,
            **wire,
        )

    def router() -> TeacherRouter:
        return TeacherRouter(
            {
                name: TeacherPool(
                    urls, replica, name=name, wait_timeout=config.teacher_wait_timeout, interrupted=interrupted
                )
                for name, urls in config.teacher_urls.items()
            }
        )

    prefetcher = TeacherPrefetcher(router, depth=max(config.prefetch_depth, 1))
    on_policy_rows: OnPolicyRows = "topk"
    if config.lmbda > 0 and config.loss_type == "sampled_kl":
        on_policy_rows = "sampled_only"
    elif config.lmbda > 0 and config.sampled_token_class:
        on_policy_rows = "sampled_class"
    top_k = config.top_k + 1 if on_policy_rows == "sampled_class" else config.top_k
    try:
        probe = (TOKENIZER_PROBE, tokenizer(TOKENIZER_PROBE, add_special_tokens=False).input_ids)
        infos = prefetcher.run(prefetcher.client.check_compatible(vocab, fingerprint, top_k, probe=probe))
    except TeacherMismatchError as exc:
        prefetcher.close()
        if top_k == config.top_k:
            raise
        raise TeacherMismatchError(
            f"{exc} (on-policy steps ask for --top_k + 1 = {top_k} rows for --sampled_token_class: "
            "lower --top_k or pass --no_sampled_token_class)"
        ) from exc
    except BaseException:
        prefetcher.close()
        raise
    for name, info in infos.items():
        pool = prefetcher.client.teachers[name]
        assert isinstance(pool, TeacherPool)
        logger.info(
            "teacher %r: %r on %d replica(s) of %s (%s API)",
            name,
            info.model,
            len(pool.replicas),
            pool.base_url,
            config.teacher_api,
        )
    # Rows at the loss temperature from a teacher that computes them (exact tail there); else raw rows the
    # loss tempers itself, over the top-k only (--tail renorm).
    # The teacher cache holds raw rows (its key says temperature 1), so a cached run asks for those.
    # Named teachers: all of them must compute tempered rows, or none is asked for them.
    at_teacher = (
        config.temperature != 1.0
        and all(getattr(i, "applies_temperature", False) for i in infos.values())
        and config.teacher_cache is None
    )
    if config.temperature != 1.0 and config.tail == "tail" and not at_teacher:
        prefetcher.close()
        info = next((i for i in infos.values() if not getattr(i, "applies_temperature", False)), info)
        engine = getattr(info, "engine", "vLLM")
        raise TeacherMismatchError(
            f"--tail tail at --temperature {config.temperature} needs the teacher's tail at that temperature, and "
            f"teacher {info.model!r} ({engine} engine, {config.teacher_api} API) computes temperature 1 rows "
            "only; use --tail renorm, --temperature 1, or a teacher service on the transformers engine"
        )
    return ServiceTeacher(
        prefetcher,
        config.top_k,
        want_tail=config.tail == "tail",
        prefetch=config.prefetch_depth > 0,
        temperature=config.temperature if at_teacher else 1.0,
        on_policy_rows=on_policy_rows,
    )
