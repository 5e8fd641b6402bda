"""Training throughput: aigc_ray's TorchTrainer run vs plain `torchrun` DDP, same model, same data.

One run, on this machine, one after the other (never both at once):

1. preprocess a small corpus once (the stdlib source, first `--max-docs` documents, seq_len 128)
   with `aigc_ray.data.run_preprocess` on a local Ray instance;
2. ours: `aigc_ray.train.fit(cfg.train, cfg.model, data_dir)` with 2 workers (gloo), `--steps`
   steps, evaluation and checkpoint only at the end. Steady-state tokens/s comes from
   `metrics.jsonl` without the first 10-step window (worker start, data pipeline warmup);
   startup seconds = wall time of fit() - (all tokens / steady tokens/s), so it also holds the
   initial and final evaluation, the final checkpoint and the export;
3. reference: `torchrun --standalone --nproc_per_node=2 benchmarks/torchrun_ddp.py`: the same
   `build_model` / seed / tokenizer, the same `build_optimizer`, `build_scheduler` and step
   function (`accumulate_step`, which `train_step` wraps: same grad_accum and precision), the same
   batch size per worker and seq_len, rows r::world of the same train shards in order, timed
   after 10 warmup steps; like ours it evaluates before the first step and after the last, and
   saves the final model (so startup compares the frameworks, not different work). Threads
   per process: the OMP_NUM_THREADS that Ray gives our
   workers (Ray sets it to floor(num_cpus) >= 1; probed with a task of the workers' num_cpus),
   unless `--ref-threads` says otherwise.

Then a table, the achieved FLOP/s = 6 x params x tokens/s and MFU = FLOP/s / peak FLOP/s, and last
one JSON line {"bench": "train", "ratio": median of ours/ref, ...}. Targets: ratio >= 0.97,
startup at most 15 s over torchrun's. `--repeat` runs (default 3) of each side alternate; the
table holds medians and min-max spreads, and ours' startup phases.

Peak FLOP/s: `--peak-flops`, or on CPU a rough measured figure: the fp32 FLOP/s of a
1024x1024 @ 1024x1024 torch matmul loop on one thread, times the cores of this machine. That is
an achievable peak, not the vendor's: MFU against it is an upper estimate of the real MFU.

    python benchmarks/bench_train.py [--steps 60] [--max-docs 400] [--set model.num_layers=8 ...]

GPU cluster (written, NOT run here: this machine has no GPU), one node with G GPUs:

    python benchmarks/bench_train.py --gpu [--gpus G] --peak-flops 125e12 [--ray-address auto]

`--gpu` sets train.use_gpu=true and train.num_workers=G for ours, and runs torchrun with
`--nproc_per_node=G`, NCCL, one GPU per process; both autocast per train.precision (bf16 by
default; `--set train.precision=fp32` for fp32).
`--peak-flops` is the per-GPU dense peak (e.g. 125e12 for an A10G in bf16), multiplied by G.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench_train")

HERE = Path(__file__).resolve().parent
WARMUP_STEPS = 10  # metrics.jsonl rows are written every 10 steps: the first window is warmup


# ---------------------------------------------------------------- setup


def build_config(args, work: Path):
    """The pipeline config of both runs: defaults + the benchmark's overrides + `--set` items."""
    from aigc_ray.config import load_config

    n = args.steps
    overrides = [
        f"data.output_dir={work / 'data'}",
        f"data.seq_len={args.seq_len}",
        f"train.seq_len={args.seq_len}",
        f"data.max_docs={args.max_docs}",
        "data.near_dedup=false",
        "data.tokenizer_train_mb=2",
        f"train.max_steps={n}",
        f"train.eval_every={n}",
        f"train.checkpoint_every={n}",
        f"train.num_workers={args.workers}",
        f"train.run_dir={work / 'run'}",
        "train.name=bench",
        "train.max_failures=0",
        f"train.use_gpu={str(args.gpu).lower()}",
    ]
    if args.batch_size:
        overrides.append(f"train.batch_size={args.batch_size}")
    return load_config(args.config, overrides + args.set)


def init_ray(args) -> float:
    """A local Ray instance (or `--ray-address`); returns the seconds ray.init took."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    t = time.perf_counter()
    if args.ray_address:
        ray.init(address=args.ray_address, log_to_driver=False, logging_level="ERROR")
    else:
        ray.init(
            "local",
            num_cpus=os.cpu_count() or 2,
            include_dashboard=False,
            object_store_memory=1024**3,
            log_to_driver=False,
            logging_level="ERROR",
        )
    return time.perf_counter() - t


def preprocess(cfg) -> tuple[dict, float]:
    from aigc_ray.data import run_preprocess

    t = time.perf_counter()
    manifest = run_preprocess(cfg.data)
    blocks = manifest["splits"]["train"]["blocks"]
    need = cfg.train.max_steps * cfg.train.batch_size * cfg.train.num_workers
    log.info(
        "preprocessed %d train blocks (%d needed) in %.1f s", blocks, need, time.perf_counter() - t
    )
    if blocks < need:
        log.warning("fewer train blocks than the run needs: raise --max-docs")
    return manifest, time.perf_counter() - t


def _threads_probe() -> tuple[str | None, int]:
    import torch

    return os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()


def probe_worker_threads(cfg) -> int:
    """torch threads in a Ray task holding the CPUs a training worker gets (a proxy for it)."""
    import ray

    from aigc_ray.train import worker_cpus

    cpus = worker_cpus(cfg.train, ray.cluster_resources().get("CPU", 0))
    omp, threads = ray.get(ray.remote(num_cpus=cpus)(_threads_probe).remote())
    log.info(
        "a Ray task with num_cpus=%g gets OMP_NUM_THREADS=%s, torch threads %d", cpus, omp, threads
    )
    return threads


# ---------------------------------------------------------------- ours


def steady_rate(rows: list[dict], warmup: int = WARMUP_STEPS) -> tuple[float, int]:
    """(tokens/s, tokens) over the metric rows after step `warmup`.

    Rows hold cumulative `tokens` and `tokens_per_s` over the window since the previous row;
    with timestamps (`time`) the rate is tokens over elapsed time, else each window's seconds
    are its tokens / tokens_per_s (a time-weighted mean, not a mean of rates).
    """
    rows = [r for r in rows if "tokens_per_s" in r and "tokens" in r]
    base = [r for r in rows if r["step"] <= warmup]
    after = [r for r in rows if r["step"] > warmup]
    if not base or not after:
        raise SystemExit(f"need metric rows at and after step {warmup}: run more --steps")
    tokens = after[-1]["tokens"] - base[-1]["tokens"]
    if "time" in base[-1] and "time" in after[-1]:
        return tokens / (after[-1]["time"] - base[-1]["time"]), tokens
    prev, secs = base[-1]["tokens"], 0.0
    for r in after:
        secs += (r["tokens"] - prev) / r["tokens_per_s"]
        prev = r["tokens"]
    return tokens / secs, tokens


def startup_phases(rows: list[dict], fit_start: float, fit_end: float, export_s: float) -> dict:
    """Where ours spends the time that is not steady steps, from rank 0's step-0 row: Ray Train
    up to the worker loop, the loop's own phases, then from the last step's row to
    trainer.fit()'s return (final evaluation, checkpoint, Ray Train's teardown) and the driver's
    export."""
    phases = dict(rows[0].get("startup", {}))
    entered = phases.pop("entered", None)
    if entered is None:
        return {}
    last = max(r["time"] for r in rows if "time" in r)
    return {
        "ray_train_start": entered - fit_start,
        **phases,
        "last_step_to_fit_return": fit_end - export_s - last,
        "export": export_s,
    }


def run_ours(cfg, data_dir: str, threads: int) -> dict:
    from aigc_ray.train import fit

    shutil.rmtree(Path(cfg.train.run_dir), ignore_errors=True)  # a leftover run would resume
    t, start = time.perf_counter(), time.time()
    result = fit(cfg.train, cfg.model, data_dir)
    wall = time.perf_counter() - t
    lines = (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    rate, _ = steady_rate(rows)
    return {
        "tokens_per_s": rate,
        "startup_s": wall - result.tokens / rate,
        "wall_s": wall,
        "steps": result.steps,
        "threads": threads,
        "params": result.params,
        "last_loss": result.last_loss,
        "phases": startup_phases(rows, start, start + wall, result.export_s),
    }


# ---------------------------------------------------------------- reference


def run_torchrun(script: str, cfg, data_dir: str, steps: int, threads: int, work: Path, *extra):
    """torchrun `script` (a reference of benchmarks/) on cfg's workers with `threads` torch
    threads each; returns (rank 0's JSON result, wall seconds)."""
    key = Path(script).stem
    conf = work / f"{key}_config.json"
    conf.write_text(json.dumps({"train": cfg.train.model_dump(), "model": cfg.model.model_dump()}))
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        f"--nproc_per_node={cfg.train.num_workers}",
        str(HERE / script),
        "--data-dir",
        data_dir,
        "--config",
        str(conf),
        "--steps",
        str(steps),
        "--warmup",
        str(WARMUP_STEPS),
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    lines = [x for x in proc.stdout.splitlines() if x.startswith(f'{{"{key}"')]
    if proc.returncode or not lines:
        raise SystemExit(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])[key], wall


def run_reference(cfg, data_dir: str, args, threads: int, work: Path) -> dict:
    """torchrun the DDP script; parse rank 0's JSON line."""
    extra = ["--save-dir", str(work / "ref_model"), *(["--gpu"] if args.gpu else [])]
    ref, wall = run_torchrun("torchrun_ddp.py", cfg, data_dir, args.steps, threads, work, *extra)
    rate = ref["tokens_per_s"]
    return {
        "tokens_per_s": rate,
        "startup_s": wall - ref["tokens"] / rate,
        "wall_s": wall,
        "steps": ref["steps"],
        "threads": ref["threads"],
        "params": ref["params"],
        "last_loss": ref["last_loss"],
    }


# ---------------------------------------------------------------- peak FLOP/s


def measured_cpu_peak(n: int = 1024, seconds: float = 2.0) -> float:
    """fp32 matmul FLOP/s on one thread x usable cores: a rough achievable CPU peak."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # noqa: B018 - warm up the BLAS kernels
    iters, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ b  # noqa: B018
        iters += 1
    per_core = 2 * n**3 * iters / (time.perf_counter() - t)
    torch.set_num_threads(before)
    log.info("matmul %dx%d fp32, 1 thread: %.1f GFLOP/s x %d cores", n, n, per_core / 1e9, cores)
    return per_core * cores


def peak_flops(args) -> tuple[float, str]:
    if args.peak_flops:
        devices = args.gpus if args.gpu else 1
        return args.peak_flops * devices, f"--peak-flops {args.peak_flops:g} x {devices} device(s)"
    return measured_cpu_peak(), "measured: 1-thread 1024^3 fp32 matmul FLOP/s x cores"


# ---------------------------------------------------------------- report


def _med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _spread(values: list[float], fmt: str) -> str:
    return f"{format(min(values), fmt)}-{format(max(values), fmt)}"


def print_report(ours: list[dict], ref: list[dict], peak: float, peak_source: str) -> None:
    """Medians of the runs, their spread (min-max), the per-run ratios and ours' startup phases."""
    print(f"\nmedian of {len(ours)} runs each (ours and torchrun alternate); spread = min-max")
    print(
        f"{'run':<24}{'steady tokens/s':>16}{'spread':>14}{'startup s':>11}{'spread':>12}"
        f"{'wall s':>8}{'steps':>7}{'threads/worker':>16}{'last loss':>11}"
    )
    for name, runs in (("aigc_ray TorchTrainer", ours), ("torchrun DDP", ref)):
        tps, st = [r["tokens_per_s"] for r in runs], [r["startup_s"] for r in runs]
        print(
            f"{name:<24}{_med(runs, 'tokens_per_s'):>16,.0f}{_spread(tps, ',.0f'):>14}"
            f"{_med(runs, 'startup_s'):>11.1f}{_spread(st, '.1f'):>12}{_med(runs, 'wall_s'):>8.1f}"
            f"{runs[0]['steps']:>7}{runs[0]['threads']:>16}{_med(runs, 'last_loss'):>11.3f}"
        )
    ratios = [o["tokens_per_s"] / r["tokens_per_s"] for o, r in zip(ours, ref, strict=True)]
    print(
        f"ratio (ours / torchrun, steady tokens/s): median {statistics.median(ratios):.3f}, "
        f"runs {', '.join(f'{x:.3f}' for x in ratios)} (target >= 0.97)"
    )
    extra = _med(ours, "startup_s") - _med(ref, "startup_s")
    print(f"startup over torchrun's: {extra:.1f} s (target <= 15 s)")
    phases = [o["phases"] for o in ours if o["phases"]]
    if phases:
        print(
            "ours' startup phases, median s: "
            + ", ".join(f"{k} {statistics.median(p[k] for p in phases):.2f}" for k in phases[0])
        )
    print(
        f"\nMFU = 6 x params x tokens/s / peak FLOP/s; params = {ours[0]['params']:,}; "
        f"peak = {peak:.3g} FLOP/s ({peak_source})"
    )
    for name, runs in (("aigc_ray TorchTrainer", ours), ("torchrun DDP", ref)):
        flops = 6 * runs[0]["params"] * _med(runs, "tokens_per_s")
        print(f"{name:<24}{flops:.3g} FLOP/s  MFU {flops / peak:.1%}")


def report_json(ours: list[dict], ref: list[dict], peak: float, extra: dict) -> str:
    ratios = [o["tokens_per_s"] / r["tokens_per_s"] for o, r in zip(ours, ref, strict=True)]
    out = {
        "bench": "train",
        "ratio": round(statistics.median(ratios), 3),
        "ratio_runs": [round(x, 3) for x in ratios],
        "startup_over_ref_s": round(_med(ours, "startup_s") - _med(ref, "startup_s"), 1),
    }
    for tag, runs in (("ours", ours), ("ref", ref)):
        for k in ("tokens_per_s", "startup_s", "wall_s", "last_loss"):
            out[f"{tag}_{k}"] = round(_med(runs, k), 2)
            out[f"{tag}_{k}_runs"] = [round(r[k], 2) for r in runs]
        out[f"{tag}_mfu"] = round(6 * runs[0]["params"] * _med(runs, "tokens_per_s") / peak, 4)
        out[f"{tag}_threads"] = runs[0]["threads"]
    phases = [o["phases"] for o in ours if o["phases"]]
    if phases:
        out["ours_startup_phases_s"] = {
            k: round(statistics.median(p[k] for p in phases), 2) for k in phases[0]
        }
    return json.dumps({**out, "params": ours[0]["params"], "peak_flops": peak, **extra})


# ---------------------------------------------------------------- main


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps of each run")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each side (medians reported)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, help="blocks per worker per step (config default)")
    ap.add_argument("--max-docs", type=int, default=400, help="stdlib documents to preprocess")
    ap.add_argument("--config", help="YAML config to start from (default: built-in defaults)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override, e.g. model.num_layers=8 (repeatable)",
    )
    ap.add_argument("--peak-flops", type=float, help="peak FLOP/s per GPU, or of the CPU machine")
    ap.add_argument("--ref-threads", type=int, help="OMP_NUM_THREADS of torchrun (default: ours)")
    ap.add_argument("--gpu", action="store_true", help="GPU cluster mode (not runnable here)")
    ap.add_argument("--gpus", type=int, help="GPUs (= workers) with --gpu (default: all visible)")
    ap.add_argument("--ray-address", help="connect to this Ray cluster instead of a local one")
    ap.add_argument("--work-dir", help="keep data and runs here (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    if args.steps <= WARMUP_STEPS:
        ap.error(f"--steps must exceed the {WARMUP_STEPS} warmup steps")
    args.workers = 2
    if args.gpu:
        import torch

        args.gpus = args.gpus or torch.cuda.device_count()
        if not args.gpus:
            ap.error("--gpu: no CUDA device visible")
        args.workers = args.gpus
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_train_")).resolve()
    shutil.rmtree(work / "run", ignore_errors=True)  # a leftover run of the same name would resume
    cfg = build_config(args, work)
    import ray

    init_s = init_ray(args)
    manifest, prep_s = preprocess(cfg)
    threads = probe_worker_threads(cfg)
    ours, ref = [], []
    for i in range(args.repeat):  # alternate, so a drift of the machine hits both sides
        if i:
            init_ray(args)
        ours.append(run_ours(cfg, cfg.data.output_dir, threads))
        ray.shutdown()  # the reference runs alone on the machine
        ref.append(run_reference(cfg, cfg.data.output_dir, args, args.ref_threads or threads, work))
        log.info(
            "run %d: ours %.0f tokens/s, torchrun %.0f",
            i + 1,
            ours[-1]["tokens_per_s"],
            ref[-1]["tokens_per_s"],
        )
    peak, source = peak_flops(args)
    print_report(ours, ref, peak, source)
    extra = {
        "workers": cfg.train.num_workers,
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.train.seq_len,
        "gpu": args.gpu,
        "ray_init_s": round(init_s, 1),
        "preprocess_s": round(prep_s, 1),
        "train_blocks": manifest["splits"]["train"]["blocks"],
        "warmup_steps_excluded": WARMUP_STEPS,
        "peak_source": source,
    }
    print(report_json(ours, ref, peak, extra))
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
