"""OpenAI's Images API (``POST /v1/images/generations``) on the same Router: the request model,
and ``ImageServer``, one deployment per image model.

Concurrent requests to a replica are batched into one pipeline call of up to ``max_batch_size``
images (``Batcher``); images of different step counts or guidance run as
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


class Batcher:
    """Dynamic batching whose wait for company starts when the replica is free, not when the
    first request arrived (Ray Serve's ``@serve.batch``): requests that queued during a batch
    would otherwise leave at once as a partial batch while the clients of the finished batch are
    still sending their next requests. Measured with 8 closed-loop clients and batches of 8:
    ``@serve.batch`` made 6.4 images per call, this makes full ones."""

    def __init__(self, run, max_size: int, wait_s: float):
        self.run, self.max_size, self.wait_s = run, max_size, wait_s
        self.pending: list[tuple[object, asyncio.Future]] = []
        self.wake: asyncio.Event | None = None
        self.task: asyncio.Task | None = None

    async def submit(self, item):
        loop = asyncio.get_running_loop()
        if self.task is None:
            self.wake = asyncio.Event()
            self.task = loop.create_task(self._loop())
        entry = (item, loop.create_future())
        self.pending.append(entry)
        self.wake.set()
        try:
            return await entry[1]
        except asyncio.CancelledError:
            if entry in self.pending:  # not started: it leaves the queue
                self.pending.remove(entry)
            raise

    async def _loop(self) -> None:
        while True:
            await self.wake.wait()
            deadline = time.monotonic() + self.wait_s
            while len(self.pending) < self.max_size and time.monotonic() < deadline:
                await asyncio.sleep(0.002)
            batch = [e for e in self.pending[: self.max_size] if not e[1].done()]
            del self.pending[: self.max_size]
            if not self.pending:
                self.wake.clear()
            if not batch:
                continue
            try:
                results = await self.run([item for item, _ in batch])
            except Exception as e:  # noqa: BLE001 - the batch's requests fail, the loop goes on
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)


@serve.deployment(health_check_period_s=5)
class ImageServer:
    """One image model (ours or any diffusers pipeline) shared by all requests to this replica."""

    def __init__(self, model: dict):
        import torch

        from aigc_ray.engine.loader import cpu_threads, placed_device
        from aigc_ray.engine.params import usable_device
        from aigc_ray.images.model import ImagePipeline
        from aigc_ray.serve.metrics import ImageMetrics

        cfg = ServedModel(**model)
        threads = cpu_threads(cfg.num_cpus, cfg.num_gpus)
        self.name = cfg.name
        device = usable_device(placed_device(cfg.device, cfg.num_gpus), f"replica of {cfg.name}")

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
        self.busy_s = 0.0  # time in pipeline calls (utilization = busy_s / wall time)
        self.batcher = Batcher(
            self._run_batch, cfg.max_batch_size or DEFAULT_IMAGE_BATCH, cfg.batch_wait_timeout_s
        )
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
            images = await asyncio.gather(*(self.batcher.submit(item) for item in items))
        except Exception as e:  # noqa: BLE001 - a failed pipeline call fails its requests only
            log.exception("image generation failed")
            return {"error": ApiError(500, f"generation failed: {e}", "server_error").to_dict()}
        self.metrics.latency.observe(time.monotonic() - t0)
        self.metrics.images.inc(len(images))
        return {"images": images, "kind": self.pipe.kind}

    async def _run_batch(self, items: list[tuple]) -> list[bytes]:
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
            started = time.perf_counter()
            arrays = await asyncio.get_running_loop().run_in_executor(self._torch, call)
            self.busy_s += time.perf_counter() - started
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
        return {
            "pid": os.getpid(),
            "model": self.name,
            "images": self.made,
            "calls": self.calls,
            "busy_s": round(self.busy_s, 3),
        }


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def images_response(out: dict) -> dict:
    return {
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(png).decode()} for png in out["images"]],
    }
