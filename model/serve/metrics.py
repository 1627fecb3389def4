"""Prometheus metrics of one server (its own registry: two servers in one process do not mix).

Counters (frames by fate, questions, refusals, errors) are counted as things happen, from any
thread; gauges that describe the present (sessions, queued frames, memory) are read from the
registry when scraped. Frames per second is ``rate(vsq_frames_ingested_total[1m])``.
"""
from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.frames = Counter("vsq_frames_total", "Frames by what became of them: received (arrived), skipped (by the "
                              "session's fps), ingested (in the engine), dropped (queue full), rejected (a bad "
                              "message), failed (the engine refused the chunk)", ["fate"], registry=r)
        self.chunk_seconds = Histogram("vsq_chunk_seconds", "Time to ingest one chunk (append_frames)",
                                       buckets=TTFT_BUCKETS, registry=r)
        self.questions = Counter("vsq_questions_total", "Questions answered, by kind (text, choice)", ["kind"],
                                 registry=r)
        self.ttft = Histogram("vsq_question_ttft_seconds", "Question arrival to its first token sent (server side)",
                              ["kind"], buckets=TTFT_BUCKETS, registry=r)
        self.engine_ttft = Histogram("vsq_engine_ttft_seconds", "The library's own TTFT (ask_stream call to token 1)",
                                     buckets=TTFT_BUCKETS, registry=r)
        self.refusals = Counter("vsq_admission_refusals_total", "Sessions refused (503)", registry=r)
        self.errors = Counter("vsq_errors_total", "Errors sent to clients, by code", ["code"], registry=r)
        self.sessions_total = Counter("vsq_sessions_created_total", "Sessions created", registry=r)

    def watch(self, sessions) -> None:
        """Read the present from ``sessions`` (a ``SessionRegistry``) at every scrape."""
        self.registry.register(_Present(sessions))

    # hooks called by the runner (any thread)
    def frames_ingested(self, n: int, seconds: float) -> None:
        self.frames.labels("ingested").inc(n)
        self.chunk_seconds.observe(seconds)

    def frames_dropped(self, n: int) -> None:
        self.frames.labels("dropped").inc(n)

    def frames_failed(self, n: int) -> None:
        self.frames.labels("failed").inc(n)

    def question_answered(self, kind: str, ttft_s: float, engine_ttft_s: Optional[float]) -> None:
        self.questions.labels(kind).inc()
        self.ttft.labels(kind).observe(ttft_s)
        if engine_ttft_s is not None:
            self.engine_ttft.observe(engine_ttft_s)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Present:
    """Gauges read at scrape time."""

    def __init__(self, sessions):
        self.sessions = sessions

    def describe(self):
        return []

    def collect(self):
        reg = self.sessions
        live = reg.sessions()
        yield GaugeMetricFamily("vsq_sessions", "Live sessions", value=len(live))
        yield GaugeMetricFamily("vsq_sessions_connected", "Sessions with a WebSocket attached",
                                value=sum(s.connection is not None for s in live))
        queued = pending = 0
        for s in live:
            st = s.runner.status()
            queued += st["queued_frames"]
            pending += st["questions_pending"]
        yield GaugeMetricFamily("vsq_ingest_queue_frames", "Frames waiting to be ingested, all sessions", value=queued)
        yield GaugeMetricFamily("vsq_questions_pending", "Questions waiting or being answered", value=pending)
        yield GaugeMetricFamily("vsq_memory_budget_bytes", "Memory budget for sessions",
                                value=reg.admission.budget_bytes)
        yield GaugeMetricFamily("vsq_memory_reserved_bytes", "Memory held by admitted sessions (estimate)",
                                value=reg.admission.reserved_bytes)
        pool = reg.pool
        if pool is not None:  # the shared K/V pool and the scheduler that batches the sessions' forwards
            st = pool.stats()
            yield GaugeMetricFamily("vsq_pool_tokens", "K/V slots of the sessions' shared pool", value=st["pool_tokens"])
            yield GaugeMetricFamily("vsq_pool_free_tokens", "K/V slots of the pool no session owns",
                                    value=st["pool_free_pages"] * st["pool_page"])
            yield GaugeMetricFamily("vsq_scheduler_queue", "Forwards waiting for the scheduler's next batch",
                                    value=pool.scheduler.pending())
            for key, help_ in (("lm_batches", "Batched language-model forwards run"),
                               ("lm_segments", "Sessions' segments run in them"),
                               ("vision_batches", "Batched vision-tower forwards run"),
                               ("vision_grids", "Frame-pair grids encoded in them"),
                               ("graph_batches", "Batches of questions and decode steps replayed from CUDA graphs")):
                yield CounterMetricFamily(f"vsq_pool_{key}", help_, value=st[key])
        device = reg.model.device
        if device.type == "cuda":
            import torch

            yield GaugeMetricFamily("vsq_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated",
                                    value=torch.cuda.memory_allocated(device))
            yield GaugeMetricFamily("vsq_gpu_memory_reserved_bytes", "torch.cuda.memory_reserved",
                                    value=torch.cuda.memory_reserved(device))
            free, total = torch.cuda.mem_get_info(device)
            yield GaugeMetricFamily("vsq_gpu_memory_used_bytes", "Device memory in use (all processes)",
                                    value=total - free)
