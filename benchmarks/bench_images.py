"""Image generation served by aigc_ray against the same pipeline called in-process, one run.

Models: the digits default (configs/digits.yaml: trained here once through `aigc-ray preprocess`
and `aigc-ray train`, cached under the temp dir) and a tiny random text-to-image Stable
Diffusion pipeline (`tests/tiny.py`'s `tiny_text_to_image`: diffusers' own
StableDiffusionPipeline end to end).

Reference: the same pipeline called in-process with batch 8 (for the SD model,
`StableDiffusionPipeline.__call__` itself), in a fresh process with 2 torch threads.
Ours: `aigc-ray serve` (Ray Serve, one replica with 2 CPUs, requests batched up to 8 images),
driven by 8 concurrent clients of one image each, and by one client at a time.
Accuracy: a classifier fit on scikit-learn's real digits labels the served digits (every image
of the concurrency-8 run, classes in turn) as the class asked for, or not.
Median of --rounds rounds (reference and served alternate which goes first), spread shown.

Targets (issue: image generation): served images/s at concurrency 8 >= 0.8x in-process batch 8
and >= 3x one request at a time; >= 80% of 200 generated digits labelled as asked.
Last line: one JSON object with every figure and targets_met.

    python benchmarks/bench_images.py [--rounds 3] [--requests 200] [--train-steps 800]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-key"
STEPS = {"digits": 25, "sd": 25}
GUIDANCE = {"digits": 3.0, "sd": 5.0}
SD_PROMPTS = ["a red cat", "a blue dog", "a green tree", "a house by the sea"]

REFERENCE = r"""
import json, sys, time, torch
torch.set_num_threads(2)
kind, model_dir = sys.argv[1], sys.argv[2]
n, steps, guidance = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
if kind == "digits":
    from aigc_ray.images.model import ImagePipeline
    pipe = ImagePipeline(model_dir)
    def batch(prompts, seeds):
        pipe.generate(prompts, seeds, steps, guidance)
    labels = pipe.labels
else:
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    def batch(prompts, seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance,
             generator=gens, output_type="np")
    labels = ["a red cat", "a blue dog", "a green tree", "a house by the sea"]
batch([labels[0]] * 8, list(range(8)))  # warm-up
t = time.perf_counter()
for i in range(0, n, 8):
    prompts = [labels[(i + j) % len(labels)] for j in range(8)]
    batch(prompts, list(range(i, i + 8)))
print("RESULT " + json.dumps({"images_per_s": n / (time.perf_counter() - t)}))
"""


def train_digits(work: Path, steps: int) -> str:
    """The digits model of configs/digits.yaml (cached by step count)."""
    model = work / f"digits-{steps}" / "train" / "model"
    if (model / "model_index.json").exists():
        return str(model)
    base = work / f"digits-{steps}"
    over = [
        f"images.data.output_dir={base}/data",
        f"images.train.run_dir={base}/train",
        f"images.train.max_steps={steps}",
        f"images.train.storage_path={base}/ray",
    ]
    exe = Path(sys.executable).with_name("aigc-ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    for cmd in ("preprocess", "train"):
        subprocess.run(
            [str(exe), cmd, "--config", str(ROOT / "configs/digits.yaml"), *over],
            check=True,
            env=env,
        )
    return str(model)


def reference(kind: str, model_dir: str, n: int) -> float:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            REFERENCE,
            kind,
            model_dir,
            str(n),
            str(STEPS[kind]),
            str(GUIDANCE[kind]),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[7:])["images_per_s"]


def load(url: str, model: str, prompts: list[str], n: int, concurrency: int) -> dict:
    """n one-image requests from `concurrency` closed-loop clients; images/s and the images."""
    import httpx

    from aigc_ray.images.model import decode_png

    lock, nxt = threading.Lock(), [0]
    results: list = [None] * n
    errors = [0]

    def client():
        with httpx.Client(timeout=300) as http:
            while True:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= n:
                    return
                body = {"model": model, "prompt": prompts[i % len(prompts)], "seed": 10_000 + i}
                r = http.post(
                    f"{url}/v1/images/generations",
                    json=body,
                    headers={"Authorization": f"Bearer {KEY}"},
                )
                if r.status_code != 200:
                    errors[0] += 1
                    continue
                results[i] = decode_png(base64.b64decode(r.json()["data"][0]["b64_json"]))

    t = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    done = [(i, img) for i, img in enumerate(results) if img is not None]
    return {"images_per_s": len(done) / wall, "errors": errors[0], "images": done}


def served(dirs: dict, args) -> dict:
    import ray
    from ray import serve

    from aigc_ray.config import ServeConfig
    from aigc_ray.images.model import digits_accuracy
    from aigc_ray.serve import run_serve

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"AIGC_RAY_API_KEYS": KEY}},
    )
    out = {}
    try:
        for kind in ("digits", "sd"):
            cfg = ServeConfig(
                model_name=kind,
                model_dir=dirs[kind],
                port=args.port,
                num_cpus=2,
                max_batch_size=8,
                batch_wait_timeout_s=0.05,
                num_inference_steps=STEPS[kind],
                guidance_scale=GUIDANCE[kind],
                max_ongoing_requests=64,
            )
            url = run_serve(cfg)
            labels = [str(i) for i in range(10)] if kind == "digits" else SD_PROMPTS
            load(url, kind, labels, 16, 8)  # warm-up
            c8 = load(url, kind, labels, args.requests, 8)
            c1 = load(url, kind, labels, args.requests_c1, 1)
            row = {"c8": c8["images_per_s"], "c1": c1["images_per_s"]}
            row["errors"] = c8["errors"] + c1["errors"]
            if kind == "digits":
                asked = [labels[i % len(labels)] for i, _ in c8["images"]]
                row["accuracy"] = digits_accuracy([img for _, img in c8["images"]], asked)
            out[kind] = row
            serve.delete("aigc")
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def spread(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=200, help="images at concurrency 8")
    p.add_argument("--requests-c1", type=int, default=40, help="images one at a time")
    p.add_argument("--train-steps", type=int, default=800)
    p.add_argument("--model-dir", help="a trained digits pipeline dir (skips training)")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "aigc_bench_images"))
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import tiny_text_to_image  # the tests' tiny random-init pipeline

    digits = args.model_dir or train_digits(work, args.train_steps)
    dirs = {"digits": digits, "sd": str(work / "sd")}
    if not (work / "sd" / "model_index.json").exists():
        tiny_text_to_image(work / "sd")
    rounds: list[dict] = []
    for r in range(args.rounds):
        row: dict = {}
        order = ["ref", "ours"] if r % 2 == 0 else ["ours", "ref"]
        for side in order:
            if side == "ref":
                for kind in ("digits", "sd"):
                    row[f"{kind}_ref"] = reference(kind, dirs[kind], args.requests)
            else:
                row["served"] = served(dirs, args)
        print(f"round {r + 1}: {json.dumps(row)}", flush=True)
        rounds.append(row)

    def med(get) -> list[float]:
        return [get(x) for x in rounds]

    figures: dict = {}
    print(f"\n| model | setup | images/s (median of {args.rounds}) | spread |")
    print("| --- | --- | ---: | ---: |")
    for kind in ("digits", "sd"):
        ref = med(lambda x, k=kind: x[f"{k}_ref"])
        c8 = med(lambda x, k=kind: x["served"][k]["c8"])
        c1 = med(lambda x, k=kind: x["served"][k]["c1"])
        name = "in-process batch 8" if kind == "digits" else "StableDiffusionPipeline batch 8"
        for label, vals in (
            (name, ref),
            ("aigc-ray serve, 8 clients", c8),
            ("aigc-ray serve, 1 client", c1),
        ):
            print(f"| {kind} | {label} | {statistics.median(vals):.2f} | {spread(vals)} |")
        figures[kind] = {
            "reference_images_per_s": round(statistics.median(ref), 2),
            "served_c8_images_per_s": round(statistics.median(c8), 2),
            "served_c1_images_per_s": round(statistics.median(c1), 2),
            "c8_vs_reference": round(statistics.median(c8) / statistics.median(ref), 3),
            "c8_vs_c1": round(statistics.median(c8) / statistics.median(c1), 2),
            "errors": sum(x["served"][kind]["errors"] for x in rounds),
        }
    acc = statistics.median(med(lambda x: x["served"]["digits"]["accuracy"]))
    d = figures["digits"]
    print(
        f"\ndigits: served c=8 {d['c8_vs_reference']:.2f}x in-process batch 8 (target 0.8), "
        f"{d['c8_vs_c1']:.1f}x one at a time (target 3); classifier accuracy "
        f"{acc:.1%} of {args.requests} served digits (target 80%)"
    )
    met = d["c8_vs_reference"] >= 0.8 and d["c8_vs_c1"] >= 3 and acc >= 0.8
    result = {
        "bench": "images",
        "ratio": d["c8_vs_reference"],
        "ratio_vs_one_at_a_time": d["c8_vs_c1"],
        "accuracy": round(acc, 3),
        "figures": figures,
        "rounds": args.rounds,
        "targets_met": met,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
