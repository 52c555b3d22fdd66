"""Prometheus metrics of one replica, served as text by its GET /metrics, and the speculative-decoding counters
under the names vLLM exports, so dashboards written for vLLM read them unchanged.

GET /metrics answers from the replica Serve routes it to. Across replicas, the same spec-decode counters (and
request counts) are also recorded through Ray Serve's metrics API (`ray.serve.metrics`), which Ray exports from
every node's metrics port with `deployment` and `replica` tags: `sum by (__name__)` over them in Prometheus is the
whole app (README, "Serving"). The `speculation` label is radar, off or tree:D with D <= 16: a bounded label set.

vLLM's names (v1 engine): `vllm:spec_decode_num_drafts` (speculative cycles), `vllm:spec_decode_num_draft_tokens`
(tree tokens verified), `vllm:spec_decode_num_accepted_tokens` (draft tokens accepted, the bonus token not
counted) and `vllm:spec_decode_num_accepted_tokens_per_pos` (accepted at depth `position`, from 0).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from radar.serve.protocol import Speculation


class Metrics:
    """The counters, gauges and histograms of one replica, in a registry of its own."""

    def __init__(self):
        disable_created_metrics()  # the *_created series only double the output
        r = self.registry = CollectorRegistry()
        self.requests = Counter("radar_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("radar_prompt_tokens", "Prompt tokens decoded", ["speculation"], registry=r)
        self.completion_tokens = Counter("radar_completion_tokens", "Tokens generated", ["speculation"], registry=r)
        self.tau = Histogram("radar_tau", "Mean tokens per target call, per request", ["speculation"], registry=r,
                             buckets=(1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 8, 10))
        self.draft_calls = Histogram("radar_draft_calls_per_cycle", "Mean draft calls per cycle, per request",
                                     ["speculation"], registry=r, buckets=(0, 1, 2, 3, 4, 5, 6, 8, 12, 16))
        self.time_per_token = Histogram(
            "radar_time_per_token_seconds", "Decode time per generated token, per request", ["speculation"],
            registry=r, buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1))
        self.latency = Histogram("radar_request_latency_seconds", "Completion latency (queue + decode)", registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.queue_wait = Histogram("radar_queue_wait_seconds", "Wait for the decoder", registry=r,
                                    buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60))
        self.queue_depth = Gauge("radar_queue_depth", "Requests waiting for the decoder", registry=r)
        self.in_flight = Gauge("radar_in_flight", "Completion requests inside this replica (waiting or decoding)",
                               registry=r)
        self.timeouts = Counter("radar_timeouts", "Requests that hit the timeout", registry=r)
        self.abandoned = Counter("radar_abandoned", "Decodes stopped early: timed out or client gone", registry=r)
        self.abandoned_tokens = Counter("radar_abandoned_generated_tokens", "Tokens decoded for abandoned requests",
                                        registry=r)
        self.rejected = Counter("radar_rejected", "Requests refused with 429: batch and queue full", registry=r)
        self.batch_size = Gauge("radar_batch_size", "Requests decoding together now", registry=r)
        self.vllm = {name: Counter(f"vllm:spec_decode_num_{name}", help_, registry=r)
                     for name, help_ in VLLM_COUNTERS.items()}
        self.vllm_per_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted by depth",
                                    ["position"], registry=r)
        self.cluster = _ClusterCounters()

    def count_request(self, route: str, status: int) -> None:
        """One HTTP request answered with `status`."""
        self.requests.labels(route, str(status)).inc()
        self.cluster.request(route, status)

    def record(self, prompt_tokens: int, spec: Speculation, latency_s: float, stats=None) -> None:
        """One finished completion (`stats`: its GenerationStats, for the spec-decode counters)."""
        label = spec.method
        if stats is not None and stats.accept_lengths:
            accepted = [n - 1 for n in stats.accept_lengths]  # the bonus token is not a draft token
            counts = {"drafts": len(accepted), "draft_tokens": sum(stats.tree_tokens_per_cycle),
                      "accepted_tokens": sum(accepted)}
            for name, n in counts.items():
                self.vllm[name].inc(n)
            for depth in range(max(accepted)):
                self.vllm_per_pos.labels(str(depth)).inc(sum(a > depth for a in accepted))
            self.cluster.record(counts)
        self.prompt_tokens.labels(label).inc(prompt_tokens)
        self.completion_tokens.labels(label).inc(spec.generated_tokens)
        self.tau.labels(label).observe(spec.tau)
        if label != "off":
            self.draft_calls.labels(label).observe(spec.draft_calls_per_cycle)
        if spec.generated_tokens:
            self.time_per_token.labels(label).observe(spec.decode_s / spec.generated_tokens)
        self.latency.observe(latency_s)
        self.queue_wait.observe(spec.queue_s)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


VLLM_COUNTERS = {"drafts": "Speculative cycles (one draft tree verified each)",
                 "draft_tokens": "Draft tokens verified",
                 "accepted_tokens": "Draft tokens accepted (bonus tokens not counted)"}


class _ClusterCounters:
    """The same counters through Ray Serve's metrics API, aggregated over replicas by Ray's export; a no-op
    outside a Serve replica."""

    def __init__(self):
        try:
            from ray import serve
            from ray.serve import metrics

            serve.get_replica_context()  # raises outside a replica
        except Exception:  # noqa: BLE001 - unit tests and tools build Metrics outside Serve
            self.counters = None
            return
        self.counters = {name: metrics.Counter(f"vllm:spec_decode_num_{name}", description=help_)
                         for name, help_ in VLLM_COUNTERS.items()}
        self.requests = metrics.Counter("radar_requests", description="HTTP requests by route and status",
                                        tag_keys=("route", "status"))

    def record(self, counts: dict[str, int]) -> None:
        if self.counters is not None:
            for name, n in counts.items():
                if n:
                    self.counters[name].inc(n)

    def request(self, route: str, status: int) -> None:
        if self.counters is not None:
            self.requests.inc(tags={"route": route, "status": str(status)})
