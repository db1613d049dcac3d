"""Prometheus metrics of one server: requests, tokens, queue depth, latency."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ServerMetrics:
    def __init__(self, engine=None):
        self.registry = CollectorRegistry()
        self.requests = Counter("polymodal_requests", "HTTP API requests", ["endpoint", "status"],
                                registry=self.registry)
        self.prompt_tokens = Counter("polymodal_prompt_tokens", "prompt tokens read", registry=self.registry)
        self.completion_tokens = Counter("polymodal_completion_tokens", "tokens generated", registry=self.registry)
        self.latency = Histogram("polymodal_request_seconds", "time from request to last token",
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=self.registry)
        self.queue = Gauge("polymodal_queue_depth", "requests waiting for a slot", registry=self.registry)
        self.running = Gauge("polymodal_running", "requests in the running batch", registry=self.registry)
        if engine is not None:
            self.queue.set_function(lambda: engine.queue_depth)
            self.running.set_function(lambda: engine.running)

    def text(self) -> bytes:
        return generate_latest(self.registry)
