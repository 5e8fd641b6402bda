"""`aigc-ray pipeline` for ``task: image``: data -> train -> serve -> sample requests over HTTP,
a sample grid PNG and (for the digits default) a classifier's score of the samples."""

from __future__ import annotations

import base64
import time
from pathlib import Path

from aigc_ray.config import PipelineConfig


def http_images(
    base_url: str,
    model: str,
    prompt: str,
    n: int,
    seed: int,
    timeout: float = 300,
    cafile: str | None = None,
) -> list:
    """POST /v1/images/generations; the images as decoded HxWxC uint8 arrays."""
    from aigc_ray.client import http_post
    from aigc_ray.images.model import decode_png

    body = {"model": model, "prompt": prompt, "n": n, "seed": seed, "response_format": "b64_json"}
    data = http_post(base_url, "/v1/images/generations", body, timeout, cafile)["data"]
    return [decode_png(base64.b64decode(d["b64_json"])) for d in data]


def sample_served(
    url: str, model: str, labels: list[str], count: int, out: Path, cafile: str | None = None
) -> dict:
    """`count` images over HTTP, spread over the classes (concurrent requests, so the replica
    batches them); a grid PNG with a column per class; the digits classifier's accuracy."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from aigc_ray.images.model import digits_accuracy, image_grid

    per_class = max(1, count // len(labels))
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(
                lambda lab: http_images(url, model, lab, per_class, seed=1000, cafile=cafile),
                labels,
            )
        )
    asked = [lab for lab in labels for _ in range(per_class)]
    images = [img for batch in results for img in batch]
    columns = [results[c][r] for r in range(min(per_class, 8)) for c in range(len(labels))]
    grid = image_grid(columns, len(labels), scale=max(1, 64 // images[0].shape[0]))
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(out)
    digits = labels == [str(i) for i in range(10)]
    return {
        "images": len(images),
        "grid": str(out),
        "accuracy": digits_accuracy(images, asked) if digits else None,
    }


def run_image_pipeline(cfg: PipelineConfig) -> tuple[str, str]:
    """Every stage of the image flow; prints the summary; returns (URL, summary)."""
    from aigc_ray.images.data import format_image_report, run_image_preprocess
    from aigc_ray.images.train import fit_images
    from aigc_ray.serve import engine_report, run_serve

    t0 = time.time()
    im = cfg.images
    print("[1/3] image data (Ray Data) ...", flush=True)
    m = run_image_preprocess(im.data)
    print(f"preprocess ({m['seconds']} s) -> {im.data.output_dir}\n{format_image_report(m)}")
    print("[2/3] train diffusion (Ray Train TorchTrainer) ...", flush=True)
    r = fit_images(im.train, im.model, im.data.output_dir)
    print(r.summary(), flush=True)
    print("[3/3] serve (Ray Serve) + sample requests ...", flush=True)
    served = cfg.serve.model_dir or r.model_dir
    url = run_serve(cfg.serve, served)
    for name, info in engine_report().items():
        print(f"serve: {name} on {info['engine']} {info['engine_version']}", flush=True)
    t1 = time.time()
    s = sample_served(
        url,
        cfg.serve.model_name,
        m["labels"],
        im.sample_images,
        Path(im.train.run_dir) / "served_samples.png",
        cafile=cfg.serve.tls_ca_file,
    )
    acc = f"{s['accuracy']:.1%} of {s['images']}" if s["accuracy"] is not None else "n/a"
    summary = "\n".join(
        [
            "",
            "=" * 72,
            "aigc_ray image pipeline summary",
            "=" * 72,
            f"images         {m['read']} read, {m['splits']['train']['images']} train / "
            f"{m['splits']['val']['images']} val, {m['quarantined']} quarantined, "
            f"{len(m['labels'])} classes",
            f"training       {r.steps} steps, {r.params / 1e6:.2f}M params, {r.seconds} s",
            f"loss           {r.first_loss:.4f} -> {r.last_loss:.4f} (val "
            f"{r.val_loss_initial:.4f} -> {r.val_loss_final:.4f})"
            if r.val_loss_final is not None
            else f"loss           {r.first_loss:.4f} -> {r.last_loss:.4f}",
            f"model dir      {r.model_dir} (diffusers pipeline)",
            f"endpoint       {url}/v1/images/generations (OpenAI Images API)",
            f"samples        {s['images']} over HTTP in {time.time() - t1:.1f} s -> {s['grid']}",
            f"classifier     {acc} generated digits labelled as the class asked for",
            f"training grids {r.grids[-1] if r.grids else '-'}",
            f"wall time      {time.time() - t0:.0f} s",
            "=" * 72,
        ]
    )
    print(summary, flush=True)
    return url, summary
