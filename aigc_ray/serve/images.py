"""OpenAI's Images API (``POST /v1/images/generations``) on the same Router: the request model,
and ``ImageServer``, one deployment per image model.

Concurrent requests to a replica are batched into one pipeline call of up to ``max_batch_size``
images (Ray Serve's ``@serve.batch``); images of different step counts or guidance run as
separate calls of the same batch. Image i of a request gets ``seed + i`` (a random seed when the
request names none), so a seed reproduces an image whatever it was batched with.
"""

# No `from __future__ import annotations`: FastAPI/pydantic resolve annotations at runtime.
import asyncio
import base64
import functools
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from aigc_ray.config import ServedModel
from aigc_ray.serve.protocol import ApiError

log = logging.getLogger(__name__)

DEFAULT_IMAGE_BATCH = 8


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # quality, style, user...: accepted, unused

    model: str = Field(description="Served image model name.")
    prompt: str = Field(min_length=1, max_length=4000, description="Text, or a class name.")
    n: int = Field(1, ge=1, description="Images to generate.")
    size: str | None = Field(None, description="'WIDTHxHEIGHT'; default: the model's own.")
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="b64_json only (no file hosting); omitted means b64_json."
    )
    seed: int | None = Field(None, description="Image i gets seed + i (an extension).")
    num_inference_steps: int | None = Field(None, ge=1, le=500, description="Extension.")
    guidance_scale: float | None = Field(None, ge=0, le=50, description="Extension.")


def image_job(req: ImageGenerationRequest, max_images: int) -> dict:
    """Checks the router can make without the model; a plain dict for the replica."""
    if req.n > max_images:
        raise ApiError(400, f"n must be <= {max_images}, got {req.n}", param="n")
    if req.response_format == "url":
        raise ApiError(
            400,
            "response_format 'url' is not supported (no image hosting): use 'b64_json'",
            param="response_format",
        )
    seed = req.seed if req.seed is not None else random.randrange(2**31)
    return {
        "prompt": req.prompt,
        "n": req.n,
        "size": req.size,
        "seed": seed,
        "steps": req.num_inference_steps,
        "guidance": req.guidance_scale,
    }


@serve.deployment(health_check_period_s=5)
class ImageServer:
    """One image model (ours or any diffusers pipeline) shared by all requests to this replica."""

    def __init__(self, model: dict):
        import torch

        from aigc_ray.engine.loader import cpu_threads, placed_device
        from aigc_ray.images.model import ImagePipeline
        from aigc_ray.serve.metrics import ImageMetrics

        cfg = ServedModel(**model)
        threads = cpu_threads(cfg.num_cpus, cfg.num_gpus)
        self.name = cfg.name
        device = placed_device(cfg.device, cfg.num_gpus)

        def load():
            if threads:
                torch.set_num_threads(threads)
            pipe = ImagePipeline(cfg.model_dir, device, cfg.dtype)
            pipe.generate([pipe.labels[0] if pipe.labels else "warm-up"], [0], 2, 1.0)
            return pipe

        # Every torch call of this replica on one thread of its own, warmed up here: OpenMP's
        # first user thread in a process runs its parallel regions fastest (measured ~1.7x on
        # the text engine), and the event loop stays free for health checks and new requests.
        self._torch = ThreadPoolExecutor(1, thread_name_prefix="pipeline")
        self.pipe = self._torch.submit(load).result()
        self.steps, self.guidance = cfg.num_inference_steps, cfg.guidance_scale
        self.metrics = ImageMetrics(cfg.name)
        self.made = self.calls = 0
        self._batched.set_max_batch_size(cfg.max_batch_size or DEFAULT_IMAGE_BATCH)
        self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        log.info("image model %s ready from %s (%s)", cfg.name, cfg.model_dir, self.pipe.kind)

    async def generate(self, job: dict) -> dict:
        """{"images": [png bytes...]} or {"error": ...} (an ApiError as a dict)."""
        from aigc_ray.images.model import ImageRequestError

        t0 = time.monotonic()
        try:
            self.pipe.check(job["prompt"], job["size"])
        except ImageRequestError as e:
            return {"error": ApiError(400, str(e), param=e.param).to_dict()}
        steps = job["steps"] or self.steps
        guidance = self.guidance if job["guidance"] is None else job["guidance"]
        items = [(job["prompt"], job["seed"] + i, steps, guidance) for i in range(job["n"])]
        try:
            images = await asyncio.gather(*(self._batched(item) for item in items))
        except Exception as e:  # noqa: BLE001 - a failed pipeline call fails its requests only
            log.exception("image generation failed")
            return {"error": ApiError(500, f"generation failed: {e}", "server_error").to_dict()}
        self.metrics.latency.observe(time.monotonic() - t0)
        self.metrics.images.inc(len(images))
        return {"images": images, "kind": self.pipe.kind}

    @serve.batch(max_batch_size=DEFAULT_IMAGE_BATCH, batch_wait_timeout_s=0.05)
    async def _batched(self, items: list[tuple]) -> list[bytes]:
        """One pipeline call per (steps, guidance) group of the batch, off the event loop."""
        from aigc_ray.images.model import png_bytes

        groups: dict[tuple, list[int]] = {}
        for i, (_, _, steps, guidance) in enumerate(items):
            groups.setdefault((steps, guidance), []).append(i)
        out: list[bytes] = [b""] * len(items)
        for (steps, guidance), idx in groups.items():
            prompts = [items[i][0] for i in idx]
            seeds = [items[i][1] for i in idx]
            call = functools.partial(self.pipe.generate, prompts, seeds, steps, guidance)
            arrays = await asyncio.get_running_loop().run_in_executor(self._torch, call)
            self.calls += 1
            self.metrics.batch.observe(len(idx))
            for i, arr in zip(idx, arrays, strict=True):
                out[i] = png_bytes(arr)
        self.made += len(items)
        return out

    async def info(self) -> dict:
        return {
            "model": self.name,
            "engine": "diffusers",
            "engine_version": _diffusers_version(),
            "engine_reason": f"image model ({self.pipe.kind}-conditioned)",
            "sizes": self.pipe.sizes,
            "labels": self.pipe.labels,
        }

    async def stats(self) -> dict:
        return {"pid": os.getpid(), "model": self.name, "images": self.made, "calls": self.calls}


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def images_response(out: dict) -> dict:
    return {
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(png).decode()} for png in out["images"]],
    }
