"""Prometheus metrics, one registry per app (several apps in one process stay apart, as in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gkd_teacher_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.errors = Counter("gkd_teacher_errors", "Error answers by error type", ["type"], registry=r)
        self.latency = Histogram(
            "gkd_teacher_request_latency_seconds",
            "Request latency by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rows = Counter("gkd_teacher_rows", "Top-k rows served (rate() gives rows per second)", registry=r)
        self.tokens = Counter("gkd_teacher_tokens", "Input tokens scored (rate() gives tokens per second)", registry=r)
        self.inflight = Gauge("gkd_teacher_inflight_requests", "Scoring requests admitted and not finished", registry=r)
        self.queue_depth = Gauge("gkd_teacher_queue_depth", "Requests waiting for the micro-batcher", registry=r)
        self.batch_requests = Histogram(
            "gkd_teacher_batch_requests", "Requests merged into one engine call", buckets=_SIZE_BUCKETS, registry=r
        )
        self.batch_sequences = Histogram(
            "gkd_teacher_batch_sequences", "Sequences per engine call", buckets=_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "gkd_teacher_batch_tokens", "Tokens per engine call", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.ready = Gauge("gkd_teacher_ready", "1 once the engine is loaded and warmed up", registry=r)
        self.cancelled_requests = Counter(
            "gkd_teacher_cancelled_requests",
            "Requests whose client disconnected or timed out before the answer (their work was cancelled)",
            ["route"],
            registry=r,
        )
        self.cancelled_jobs = Counter(
            "gkd_teacher_cancelled_jobs",
            "Scoring jobs of departed clients by stage: queued (dropped before any engine work), running (its "
            "transformers batch ran on, its rows were dropped), engine (its vLLM requests were aborted)",
            ["stage"],
            registry=r,
        )

    def observe_batch(self, requests: int, sequences: int, tokens: int) -> None:
        self.batch_requests.observe(requests)
        self.batch_sequences.observe(sequences)
        self.batch_tokens.observe(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
