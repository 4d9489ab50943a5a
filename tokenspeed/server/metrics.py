"""Prometheus metrics of one server: its own counters plus the engine's stats, read from
the snapshot the engine thread takes after every batch it runs (so /metrics never waits
for the engine)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# sessions hold from one request to thousands; sequences from one to many thousands
REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
SEQUENCE_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)
LATENCY_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineStats(Collector):
    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        if not s:
            return  # still loading
        pages = GaugeMetricFamily("tokenspeed_kv_pages", "KV pool pages by state",
                                  labels=["state"])
        for state in ("free", "cached", "owned"):
            pages.add_metric([state], s[f"{state}_pages"])
        yield pages
        yield GaugeMetricFamily("tokenspeed_kv_pages_total", "KV pool size in pages",
                                value=s["total_pages"])
        yield CounterMetricFamily("tokenspeed_prefix_hit_tokens",
                                  "tokens served from the prefix cache instead of recomputed",
                                  value=s["prefix_hit_tokens"])
        yield GaugeMetricFamily("tokenspeed_weight_version",
                                "update_weights calls that wrote weights",
                                value=s["weight_version"])
        running = GaugeMetricFamily("tokenspeed_engine_sequences",
                                    "sequences queued / admitted in the engine's scheduler",
                                    labels=["state"])
        for state in ("waiting", "running"):
            running.add_metric([state], s[state])
        yield running


class Metrics:
    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("tokenspeed_http_requests", "HTTP requests by path and status",
                                ["path", "status"], registry=r)
        self.sequences = Counter("tokenspeed_scored_sequences",
                                 "sequences scored and returned", registry=r)
        self.tokens = Counter("tokenspeed_scored_tokens",
                              "completion tokens scored and returned", registry=r)
        self.queue_depth = Gauge("tokenspeed_queue_depth",
                                 "requests waiting for the engine thread", registry=r)
        self.running = Gauge("tokenspeed_running_requests",
                             "HTTP requests admitted into the engine session and not yet "
                             "scored", registry=r)
        self.admitted = Counter("tokenspeed_admitted_requests",
                                "requests admitted into an engine session: as it opened "
                                "(new) or into one already running batches (running)",
                                ["session"], registry=r)
        self.session_requests = Histogram("tokenspeed_batch_requests",
                                         "HTTP requests scored in one engine session",
                                         buckets=REQUEST_BUCKETS, registry=r)
        self.session_sequences = Histogram("tokenspeed_batch_sequences",
                                          "sequences scored in one engine session",
                                          buckets=SEQUENCE_BUCKETS, registry=r)
        self.latency = Histogram("tokenspeed_score_latency_seconds",
                                 "/v1/score latency, body received to response ready",
                                 buckets=LATENCY_BUCKETS, registry=r)
        r.register(_EngineStats(stats))

    def scored(self, result: dict[str, Any]) -> None:
        self.sequences.inc(len(result["log_probs"]))
        self.tokens.inc(sum(len(lp) for lp in result["log_probs"]))
