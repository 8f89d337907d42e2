"""Replicas of one teacher behind one client: outages are waited out, load goes where it is lightest.

A teacher pod restarts in minutes, replicas come and go with the autoscaler, and kube-proxy balances
per connection (kept alive for the whole run). So the pool:

- expands every ``--teacher_url`` whose host name resolves to several addresses (a Kubernetes headless
  Service) into one replica per address, and re-resolves it every ``resolve_interval`` seconds;
- sends each request to the admitted replica with the fewest requests in flight (ties: the one used
  longest ago), so replicas share the load evenly and a slow one gets less;
- ejects a replica whose request fails as unavailable (and retries the request elsewhere), probes its
  readiness endpoint with backoff, and re-admits it after a fresh handshake;
- replaces each replica's connections after ``max_age`` seconds (a name that is not expanded, e.g. a
  ClusterIP Service, is then balanced anew);
- when no replica is admitted, holds the request (the step waits, nothing is skipped or filled in), logs
  every ``log_interval`` seconds, and raises :class:`~.errors.TeacherOutageError` after ``wait_timeout``.

The handshake runs against every replica, and a replica that serves another model, vocabulary or
tokenizer than the first is refused: one name, one teacher.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from shared.codec import TopkFrame
from shared.protocol import LogprobDtype
from student_trainer.teacher.base import AsyncTeacherClient, ServedModel
from student_trainer.teacher.errors import TeacherMismatchError, TeacherOutageError, TeacherUnavailableError

logger = logging.getLogger(__name__)

T = TypeVar("T")

ClientFactory = Callable[[str, str | None], AsyncTeacherClient]
"""(replica URL, Host header or None) -> a client of that replica."""

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""(host, port) -> its addresses."""


async def resolve_addresses(host: str, port: int) -> list[str]:
    """The host's addresses (IPv4 where it has any, else IPv6), deduplicated, in resolver order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    v4 = [str(info[4][0]) for info in infos if info[0] == socket.AF_INET]
    v6 = [str(info[4][0]) for info in infos if info[0] == socket.AF_INET6]
    return list(dict.fromkeys(v4 or v6))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass
class _Conn:
    """One client of a replica (its own connection pool), replaced after ``max_age``."""

    client: AsyncTeacherClient
    born: float
    checked: bool = False
    in_flight: int = 0


@dataclass
class Replica:
    url: str
    host_header: str | None
    origin: str
    """The ``--teacher_url`` it was expanded from."""
    conn: _Conn | None = None
    admitted: bool = False
    retired: bool = False
    served: int = 0
    last_pick: int = 0
    last_error: str = "not probed yet"
    probe: asyncio.Task[None] | None = field(default=None, repr=False)


def _identity(info: ServedModel) -> tuple[Any, ...]:
    """What must agree between replicas: the model, and where the handshake has them, vocabulary and tokenizer."""
    return (info.model, getattr(info, "vocab_size", None), getattr(info, "tokenizer_fingerprint", None))


class TeacherPool:
    """An :class:`~.base.AsyncTeacherClient` over the replicas of one teacher. Use from one event loop."""

    def __init__(
        self,
        urls: Sequence[str],
        factory: ClientFactory,
        *,
        name: str = "teacher",
        wait_timeout: float = 900.0,
        max_age: float = 300.0,
        resolve_interval: float = 30.0,
        probe_backoff: tuple[float, float] = (0.5, 10.0),
        log_interval: float = 30.0,
        resolver: Resolver = resolve_addresses,
        interrupted: Callable[[], bool] = lambda: False,
    ) -> None:
        if not urls:
            raise ValueError(f"teacher {name!r} has no URL")
        self.origins = [u.rstrip("/") for u in urls]
        self.base_url = ",".join(self.origins)
        self.name, self._factory, self._resolver = name, factory, resolver
        self.wait_timeout, self.max_age, self.resolve_interval = wait_timeout, max_age, resolve_interval
        self.probe_backoff, self.log_interval = probe_backoff, log_interval
        self.interrupted = interrupted  # e.g. SIGTERM: a preempted trainer saves its checkpoint instead of waiting
        self.replicas: list[Replica] = []
        self._info: ServedModel | None = None
        self._check: Callable[[AsyncTeacherClient], Awaitable[ServedModel]] | None = None
        self._admitted = asyncio.Event()
        self._picks = itertools.count(1)
        self._last_log = -float("inf")
        self._closed = False
        self._resolving: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    # --- the client contract

    async def info(self) -> ServedModel:
        if self._info is None:
            raise RuntimeError("the teacher pool's handshake (check_compatible) has not run")
        return self._info

    async def check_compatible(
        self, vocab_size: int, tokenizer_fingerprint: str, top_k: int, probe: tuple[str, list[int]] | None = None
    ) -> ServedModel:
        """Expand the URLs, handshake with every replica (waiting, within ``wait_timeout``, for one to be ready),
        refuse a mix of teachers, and start re-resolving."""

        async def check(client: AsyncTeacherClient) -> ServedModel:
            return await client.check_compatible(vocab_size, tokenizer_fingerprint, top_k, probe=probe)

        self._check = check
        started = time.monotonic()
        await self._resolve()
        results = await asyncio.gather(*(self._admit(r) for r in self.replicas), return_exceptions=True)
        for replica, result in zip(list(self.replicas), results, strict=True):
            if isinstance(result, TeacherMismatchError):
                raise result  # a teacher that cannot teach this student: refuse now, not mid-run
            if isinstance(result, BaseException):
                if not isinstance(result, TeacherUnavailableError):
                    raise result
                self._eject(replica, result)
        self._resolving = asyncio.create_task(self._resolve_loop())  # also finds replicas while we wait
        await self._wait_admitted(started)
        assert self._info is not None
        return self._info

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
        **options: Any,
    ) -> TopkFrame:
        """The replica's ``topk_logprobs``; ``options`` (e.g. ``temperature``) are passed on as they are."""
        return await self.call(
            lambda client: client.topk_logprobs(
                sequences,
                top_k,
                first_rows,
                row_spans=row_spans,
                logprobs_dtype=logprobs_dtype,
                return_target_logprobs=return_target_logprobs,
                return_tail_logmass=return_tail_logmass,
                **options,
            )
        )

    async def ready(self) -> bool:
        return any(r.admitted for r in self.replicas)

    async def aclose(self) -> None:
        self._closed = True
        tasks = [t for t in [self._resolving, *(r.probe for r in self.replicas)] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._closing, return_exceptions=True)
        await asyncio.gather(*(r.conn.client.aclose() for r in self.replicas if r.conn), return_exceptions=True)

    # --- requests

    async def call(self, fn: Callable[[AsyncTeacherClient], Awaitable[T]]) -> T:
        """``fn`` on the least-loaded admitted replica; on an unavailable replica, eject it and go on elsewhere,
        waiting (up to ``wait_timeout`` from the first failure) while none is admitted."""
        first_failure: float | None = None
        while True:
            replica = self._pick()
            if replica is None:
                first_failure = first_failure or time.monotonic()
                await self._wait_admitted(first_failure)
                continue
            conn = replica.conn
            assert conn is not None
            conn.in_flight += 1
            try:
                if not conn.checked:  # a recycled connection: the pod behind the address may have changed
                    try:
                        await self._verify(conn.client)
                    except TeacherMismatchError as exc:
                        self._eject(replica, exc)
                        continue
                    conn.checked = True
                result = await fn(conn.client)
            except TeacherUnavailableError as exc:
                first_failure = first_failure or time.monotonic()
                self._eject(replica, exc)
                continue
            finally:
                conn.in_flight -= 1
                if conn is not replica.conn and conn.in_flight == 0:
                    self._close_later(conn)
            replica.served += 1
            return result

    def _pick(self) -> Replica | None:
        """The admitted replica with the fewest requests in flight; among equals, the one used longest ago."""
        candidates = [r for r in self.replicas if r.admitted and r.conn is not None]
        if not candidates:
            return None
        replica = min(candidates, key=lambda r: (r.conn.in_flight if r.conn else 0, r.last_pick))
        replica.last_pick = next(self._picks)
        assert replica.conn is not None
        if time.monotonic() - replica.conn.born > self.max_age:  # recycle: new connections, old closed when idle
            self._replace(replica, _Conn(self._factory(replica.url, replica.host_header), time.monotonic()))
        return replica

    async def _wait_admitted(self, since: float) -> None:
        """Return once a replica is admitted; log every ``log_interval``; give up after ``wait_timeout``."""
        while not any(r.admitted for r in self.replicas):
            waited = time.monotonic() - since
            if self.interrupted():
                raise TeacherOutageError(
                    f"teacher {self.name!r} ({self.base_url}) unavailable for {waited:.0f} s when the trainer was "
                    f"told to stop; {self._errors()}"
                )
            if waited >= self.wait_timeout:
                raise TeacherOutageError(
                    f"teacher {self.name!r} ({self.base_url}) unavailable for {waited:.0f} s, longer than "
                    f"--teacher_wait_timeout {self.wait_timeout:.0f} s; {self._errors()}"
                )
            now = time.monotonic()
            if now - self._last_log >= self.log_interval:
                self._last_log = now
                logger.warning(
                    "teacher %r unavailable for %.0f s, waiting up to %.0f s (%s)",
                    self.name,
                    waited,
                    self.wait_timeout,
                    self._errors(),
                )
            self._admitted.clear()
            with_timeout = min(self.wait_timeout - waited, 1.0)
            with contextlib.suppress(TimeoutError):  # re-check the clock and log
                await asyncio.wait_for(self._admitted.wait(), timeout=with_timeout)

    def _errors(self) -> str:
        if not self.replicas:
            return "its name resolves to no address"
        return "; ".join(f"{r.url}: {r.last_error}" for r in self.replicas)

    # --- admission, ejection, probes

    async def _verify(self, client: AsyncTeacherClient) -> ServedModel:
        """The student's handshake, and the same teacher as the replicas admitted before."""
        assert self._check is not None
        info = await self._check(client)
        if self._info is None:
            self._info = info
        elif _identity(info) != _identity(self._info):
            raise TeacherMismatchError(
                f"teacher {self.name!r}: replica {client.base_url} serves {_identity(info)}, the others "
                f"{_identity(self._info)}; all replicas of one teacher must serve the same model and tokenizer"
            )
        return info

    async def _admit(self, replica: Replica) -> None:
        client = self._factory(replica.url, replica.host_header)
        try:
            await self._verify(client)
        except BaseException:
            await client.aclose()
            raise
        self._replace(replica, _Conn(client, time.monotonic(), checked=True))
        replica.admitted, replica.last_error = True, "admitted"
        self._admitted.set()

    def _eject(self, replica: Replica, exc: BaseException) -> None:
        replica.last_error = str(exc)
        if not replica.admitted and replica.probe is not None and not replica.probe.done():
            return
        replica.admitted = False
        logger.warning("teacher %r: replica %s ejected: %s", self.name, replica.url, exc)
        self._replace(replica, None)
        if not self._closed and not replica.retired:
            replica.probe = asyncio.create_task(self._probe(replica))

    async def _probe(self, replica: Replica) -> None:
        """Poll the replica's readiness with backoff; re-admit it after a fresh handshake."""
        delay, cap = self.probe_backoff
        while not (self._closed or replica.retired):
            await asyncio.sleep(delay)
            delay = min(delay * 2, cap)
            probe = self._factory(replica.url, replica.host_header)
            try:
                ready = await probe.ready()
            finally:
                await probe.aclose()
            if not ready:
                replica.last_error = "not ready"
                continue
            try:
                await self._admit(replica)
            except (TeacherUnavailableError, TeacherMismatchError) as exc:
                replica.last_error = str(exc)
                level = logging.ERROR if isinstance(exc, TeacherMismatchError) else logging.INFO
                logger.log(level, "teacher %r: replica %s not re-admitted: %s", self.name, replica.url, exc)
                continue
            logger.warning("teacher %r: replica %s ready again, re-admitted", self.name, replica.url)
            return

    def _replace(self, replica: Replica, conn: _Conn | None) -> None:
        """Swap the replica's client; the old one is closed now if idle, else by its last request."""
        old, replica.conn = replica.conn, conn
        if old is not None and old.in_flight == 0:
            self._close_later(old)

    def _close_later(self, conn: _Conn) -> None:
        task = asyncio.create_task(conn.client.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # --- name resolution

    async def _expand(self, origin: str) -> list[tuple[str, str | None]] | None:
        """(replica URL, Host header) per address of the origin's host; None where resolution failed."""
        url = httpx.URL(origin)
        if url.scheme != "http" or _is_ip(url.host):  # https keeps its name (certificates name hosts, not IPs)
            return [(origin, None)]
        port = url.port or 80
        try:
            addresses = await self._resolver(url.host, port)
        except OSError as exc:
            logger.warning("teacher %r: cannot resolve %s: %s", self.name, url.host, exc)
            return None
        netloc = url.netloc.decode("ascii")
        return [(str(url.copy_with(host=a)).rstrip("/"), netloc) for a in addresses]

    async def _resolve(self) -> None:
        """Add the replicas of new addresses (probed before admission), retire those of vanished ones."""
        for origin in self.origins:
            expanded = await self._expand(origin)
            if expanded is None:
                continue  # keep what we have through a resolver hiccup
            current = {r.url: r for r in self.replicas if r.origin == origin}
            for url, host in expanded:
                if url not in current:
                    replica = Replica(url, host, origin)
                    self.replicas.append(replica)
                    if self._resolving is not None:  # after the first handshakes: probe, then admit
                        logger.info("teacher %r: new replica %s", self.name, url)
                        replica.probe = asyncio.create_task(self._probe(replica))
            gone = set(current) - {url for url, _ in expanded}
            for replica in [r for r in self.replicas if r.url in gone and r.origin == origin]:
                logger.info("teacher %r: replica %s is gone from %s", self.name, replica.url, origin)
                replica.retired, replica.admitted = True, False
                if replica.probe is not None:
                    replica.probe.cancel()
                self._replace(replica, None)
                self.replicas.remove(replica)

    async def _resolve_loop(self) -> None:
        while not self._closed:
            admitted = any(r.admitted for r in self.replicas)
            await asyncio.sleep(self.resolve_interval if admitted else min(self.resolve_interval, 1.0))
            await self._resolve()
