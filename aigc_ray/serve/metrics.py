"""Prometheus metrics through Ray's metrics API (`ray.serve.metrics`), exported by every node's
metrics agent with Ray's `ray_` prefix (e.g. `ray_aigc_ray_requests_total`). Serve adds the
deployment, replica and application tags."""

from __future__ import annotations

LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


class RouterMetrics:
    """Requests and errors by status code, per model and route (recorded by the ingress)."""

    def __init__(self):
        from ray.serve import metrics

        tags = ("model", "route", "status")
        self.requests = metrics.Counter(
            "aigc_ray_requests",
            description="HTTP requests by model, route and status code.",
            tag_keys=tags,
        )
        self.errors = metrics.Counter(
            "aigc_ray_request_errors",
            description="Failed requests by status code and type.",
            tag_keys=(*tags, "type"),
        )

    def record(self, model: str, route: str, status: int, error_type: str | None = None) -> None:
        tags = {"model": model or "-", "route": route, "status": str(status)}
        self.requests.inc(1, tags)
        if status >= 400:
            self.errors.inc(1, {**tags, "type": error_type or "error"})


class ModelMetrics:
    """Token-level latency and throughput of one model's replica (recorded by the model server)."""

    def __init__(self, model: str):
        from ray.serve import metrics

        def histogram(name, description):
            h = metrics.Histogram(
                name, description=description, boundaries=LATENCY_BOUNDARIES, tag_keys=("model",)
            )
            h.set_default_tags({"model": model})
            return h

        def tagged(kind, name, description):
            m = kind(name, description=description, tag_keys=("model",))
            m.set_default_tags({"model": model})
            return m

        self.ttft = histogram(
            "aigc_ray_time_to_first_token_seconds",
            "Submit to first generated token, queueing included.",
        )
        self.itl = histogram(
            "aigc_ray_inter_token_latency_seconds",
            "Mean time between consecutive generated tokens, per request.",
        )
        self.generated = tagged(metrics.Counter, "aigc_ray_generated_tokens", "Tokens generated.")
        self.prompt = tagged(metrics.Counter, "aigc_ray_prompt_tokens", "Prompt tokens prefilled.")
        self.running = tagged(
            metrics.Gauge, "aigc_ray_running_requests", "Requests in the replica's running batch."
        )
        self.queued = tagged(
            metrics.Gauge,
            "aigc_ray_queued_requests",
            "Requests waiting for a slot in the running batch.",
        )
        self.kv_cache = tagged(
            metrics.Gauge,
            "aigc_ray_kv_cache_usage",
            "Fraction of the engine's KV cache in use (0-1).",
        )

    def observe_request(self, req) -> None:
        """Record one finished engine request (an aigc_ray.engine.EngineRequest)."""
        if req.first_token_at is not None:
            self.ttft.observe(req.first_token_at - req.submitted_at)
        times = req.token_times
        if len(times) > 1:  # one observation per request: per token costs the replica CPU
            self.itl.observe((times[-1] - times[0]) / (len(times) - 1))
        if times:
            self.generated.inc(len(times))
        self.prompt.inc(len(req.prompt_ids))

    def update(self, stats: dict) -> None:
        self.running.set(stats["running"])
        self.queued.set(stats["waiting"])
        if "kv_cache_usage" in stats:
            self.kv_cache.set(stats["kv_cache_usage"])


class ImageMetrics:
    """Image generation on one model's replica: latency per request, images made, batch sizes."""

    def __init__(self, model: str):
        from ray.serve import metrics

        self.latency = metrics.Histogram(
            "aigc_ray_image_request_seconds",
            description="Image request latency in the model replica, queueing included.",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("model",),
        )
        self.latency.set_default_tags({"model": model})
        self.images = metrics.Counter(
            "aigc_ray_generated_images", description="Images generated.", tag_keys=("model",)
        )
        self.images.set_default_tags({"model": model})
        self.batch = metrics.Histogram(
            "aigc_ray_image_batch_size",
            description="Images per pipeline call (batched across requests).",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
            tag_keys=("model",),
        )
        self.batch.set_default_tags({"model": model})


class KeyUsageMetrics:
    """Usage per API key (recorded by the ingress): requests by status and tokens by kind
    (prompt, completion), labelled by the key's fingerprint (security.key_fingerprint), never by
    the key."""

    def __init__(self):
        from ray.serve import metrics

        self.requests = metrics.Counter(
            "aigc_ray_key_requests",
            description="Requests per API key fingerprint, model and status code.",
            tag_keys=("key_fingerprint", "model", "status"),
        )
        self.tokens = metrics.Counter(
            "aigc_ray_key_tokens",
            description="Prompt and completion tokens per API key fingerprint and model.",
            tag_keys=("key_fingerprint", "model", "kind"),
        )

    def record(self, fingerprint: str, model: str, status: int) -> None:
        tags = {"key_fingerprint": fingerprint, "model": model or "-", "status": str(status)}
        self.requests.inc(1, tags)

    def add_tokens(self, fingerprint: str, model: str, prompt: int, completion: int) -> None:
        for kind, n in (("prompt", prompt), ("completion", completion)):
            if n:
                self.tokens.inc(n, {"key_fingerprint": fingerprint, "model": model, "kind": kind})
