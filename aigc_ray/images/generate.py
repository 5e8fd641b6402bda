"""Batch image generation: Ray Data reads prompt files (the text path's fault-tolerant reader),
an actor pool runs one image pipeline per actor, and out come PNG files plus a parquet index
(prompt, seed, path, error, source, line) in ``images.generate.output_dir``.

Nothing is fatal: an unreadable row is quarantined with its file, line and reason (as for text);
a readable row the model cannot do (an unknown class) gets its error in the index and no file.
Row i without a ``seed`` column gets ``images.generate.seed`` + its line number.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import pyarrow as pa

from aigc_ray.config import ImageGenerateConfig
from aigc_ray.generate import GenerateError, prompt_files, read_prompts, show_generated
from aigc_ray.progress import Progress, Watch, post
from aigc_ray.storage import SSE_ENV, is_uri, portable_location, write_bytes, writer_filesystem

log = logging.getLogger(__name__)

INDEX_SCHEMA = pa.schema(
    [
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("path", pa.string()),
        ("error", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
    ]
)


class ImageGenerateUDF:
    """Ray Data callable: one ImagePipeline per actor; a batch is one pipeline call."""

    def __init__(self, model_dir: str, cfg: dict, progress=None, sse: str = "sse-s3"):
        import torch

        from aigc_ray.engine.loader import cpu_threads, placed_device
        from aigc_ray.engine.params import usable_device
        from aigc_ray.images.model import ImagePipeline

        self.cfg = ImageGenerateConfig(**cfg)
        threads = cpu_threads(self.cfg.num_cpus, self.cfg.num_gpus)
        if threads:
            torch.set_num_threads(threads)
        device = usable_device(placed_device("auto", self.cfg.num_gpus), "image generate actor")
        self.pipe = ImagePipeline(model_dir, device)
        self.out = f"{self.cfg.output_dir.rstrip('/')}/images"
        self.board = progress  # the driver's progress board (aigc_ray.progress)
        os.environ[SSE_ENV] = sse  # the driver's storage.encryption, for the PNGs written here

    def __call__(self, batch: pa.Table) -> pa.Table:
        from aigc_ray.images.model import ImageRequestError, png_bytes

        rows, todo = [], []
        for row in batch.to_pylist():
            params = json.loads(row.get("params") or "{}")
            record = {
                "prompt": row["prompt"],
                "seed": None,
                "path": None,
                "error": None,
                "source": row.get("source"),
                "line": row.get("line"),
            }
            rows.append(record)
            try:
                seed = params.get("seed", self.cfg.seed + (row.get("line") or 0))
                if not isinstance(seed, int) or isinstance(seed, bool):
                    raise ImageRequestError(f"seed must be an integer, got {seed!r}", "seed")
                record["seed"] = seed
                self.pipe.check(row["prompt"], None)
                todo.append(record)
            except ImageRequestError as e:
                record["error"] = str(e)
        if todo:
            try:
                images = self.pipe.generate(
                    [r["prompt"] for r in todo],
                    [r["seed"] for r in todo],
                    self.cfg.num_inference_steps,
                    self.cfg.guidance_scale,
                )
            except Exception as e:  # noqa: BLE001 - a failed call fails its rows, not the job
                for r in todo:
                    r["error"] = f"generation failed: {type(e).__name__}: {e}"
                images = []
            for record, image in zip(todo, images, strict=False):
                key = f"{record['source']}:{record['line']}:{record['seed']}"
                name = hashlib.sha1(key.encode()).hexdigest()[:16]
                record["path"] = f"{self.out}/{name}.png"
                write_bytes(png_bytes(image), record["path"])
        post(self.board, {"rows": len(rows), "errors": sum(r["error"] is not None for r in rows)})
        return pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)


def image_generate_preflight(cfg: ImageGenerateConfig, model_dir: str) -> None:
    from aigc_ray.images.model import check_image_model_dir

    if not cfg.inputs:
        raise GenerateError("images.generate.inputs is empty: give jsonl/parquet prompt files")
    for path in cfg.inputs:
        if not is_uri(path):
            prompt_files([path])
    check_image_model_dir(model_dir)


def run_image_generate(cfg: ImageGenerateConfig, model_dir: str) -> dict:
    """Generate an image per readable prompt row; return a summary."""
    from ray.data import ActorPoolStrategy

    image_generate_preflight(cfg, model_dir)
    t0 = time.perf_counter()
    out_dir = cfg.output_dir.rstrip("/")
    if not is_uri(out_dir):
        import shutil

        shutil.rmtree(out_dir, ignore_errors=True)
    quarantine_dir = f"{out_dir}_quarantine"
    good, quarantined = read_prompts(cfg.inputs, cfg.prompt_column, quarantine_dir)
    resources = {"num_cpus": cfg.num_cpus}
    if cfg.num_gpus:
        resources["num_gpus"] = cfg.num_gpus
    with Watch(Progress("generate", good.count(), "images"), show_generated) as watch:
        index = good.map_batches(
            ImageGenerateUDF,
            fn_constructor_kwargs={
                "model_dir": portable_location(model_dir),
                "cfg": {**cfg.model_dump(), "output_dir": portable_location(out_dir)},
                "progress": watch.board,
                "sse": os.environ.get(SSE_ENV, "sse-s3"),
            },
            compute=ActorPoolStrategy(size=cfg.num_actors),
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            **resources,
        ).materialize()
    index.write_parquet(f"{out_dir}/index", filesystem=writer_filesystem(out_dir))
    rows = errors = 0
    for block in index.iter_batches(batch_format="pyarrow", batch_size=None):
        rows += block.num_rows
        errors += block.num_rows - block.column("error").null_count
    seconds = time.perf_counter() - t0
    return {
        "rows": rows,
        "images": rows - errors,
        "errors": errors,
        "quarantined": quarantined,
        "seconds": round(seconds, 2),
        "images_per_s": round((rows - errors) / max(seconds, 1e-9), 2),
        "output_dir": out_dir,
        "quarantine_dir": quarantine_dir if quarantined else None,
    }
