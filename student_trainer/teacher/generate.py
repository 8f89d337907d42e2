"""Teacher-generated completions from a teacher service, for ``--seq_kd`` with ``--teacher_url``.

Speaks vLLM's ``/v1/completions`` (``max_tokens`` > 1, token-id prompts, ``return_token_ids``), so it works
against this project's service (either engine) and against a stock ``vllm serve``. Synchronous and
independent of the scoring clients: one request per micro-batch, made while no scoring request of that
micro-batch can be in flight yet. Transient failures (connection errors, 429, 502-504) are retried with
capped backoff honouring ``Retry-After``; anything else raises a typed :mod:`.errors` exception.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from student_trainer.teacher.errors import TeacherProtocolError
from student_trainer.teacher.retry import RetryPolicy


class ServiceGenerator:
    """``generate`` as :class:`~.local.LocalTeacher` has it, answered by a teacher service. One per trainer rank;
    the served model name is read from ``/v1/models`` once per instance."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 120.0,
        connect_timeout: float = 10.0,
        api_key: str | None = None,
        max_retries: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
            transport=transport,
        )
        self.retry = RetryPolicy(self.base_url, max_retries, backoff_base=backoff_base, backoff_max=backoff_max)
        self._model: str | None = None

    @property
    def model(self) -> str:
        """The served model's name (the first of ``/v1/models``), asked once."""
        if self._model is None:
            body = self._request("GET", "/v1/models").json()
            try:
                self._model = str(body["data"][0]["id"])
            except (KeyError, IndexError, TypeError) as exc:
                raise TeacherProtocolError(f"{self.base_url}/v1/models lists no model: {body!r:.300}") from exc
        return self._model

    def generate(
        self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, eos_id: int, pad_id: int, seed: int
    ) -> list[list[int]]:
        """Per prompt, the teacher's tokens up to and including the first EOS (or ``max_new_tokens`` of them).

        Sampling is the teacher's full distribution at ``temperature`` (top-p 1, no top-k; 0 is greedy),
        seeded, so a resumed run asks for the same completions. ``pad_id`` is unused (no padding on the wire).
        """
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompts,
            "max_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": 1.0,
            "top_k": 0,
            "seed": seed,
            "n": 1,
            "stop_token_ids": [eos_id],
            "return_token_ids": True,
        }
        answer = self._request("POST", "/v1/completions", json=body).json()
        return self._completions(answer, len(prompts), max_new_tokens, eos_id)

    def _completions(self, answer: Any, count: int, max_new_tokens: int, eos_id: int) -> list[list[int]]:
        """The token ids of each choice, in prompt order, checked against the request."""
        try:
            choices = sorted(answer["choices"], key=lambda c: c["index"])
            ids = [c.get("token_ids") for c in choices]
        except (KeyError, TypeError) as exc:
            raise TeacherProtocolError(f"not a completions answer: {answer!r:.300}") from exc
        if len(ids) != count or [c["index"] for c in choices] != list(range(count)):
            raise TeacherProtocolError(f"{len(ids)} completions for {count} prompts")
        out = []
        for i, tokens in enumerate(ids):
            if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                raise TeacherProtocolError(
                    f"choice {i} carries no token_ids: the teacher must return token ids (vLLM's return_token_ids)"
                )
            if not tokens or len(tokens) > max_new_tokens:
                raise TeacherProtocolError(f"choice {i} has {len(tokens)} tokens for max_tokens={max_new_tokens}")
            out.append(tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens)
        return out

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One HTTP call, retrying transient failures only (:class:`~.retry.RetryPolicy`)."""
        attempt = 0
        while True:
            try:
                resp = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                delay = self.retry.after_transport_error(attempt, path, exc)
            else:
                answered = self.retry.after_response(attempt, resp)
                if answered is None:
                    return resp
                delay = answered
            attempt += 1
            self.retry.log_retry(method, path, attempt, delay)
            time.sleep(delay)

    def close(self) -> None:
        self._http.close()
