"""DP-SGD throughput: aigc_ray's train.privacy run vs Opacus under torchrun, and DP's cost.

Three sides on the same model, shards, batch and seq_len, one after the other (never two at
once), `--repeat` rounds alternating (default 3; medians and min-max spreads reported):

1. ours, DP: `aigc_ray.train.fit` with train.privacy (noise multiplier `--noise`, per-row
   clip 1.0) on 2 Ray Train workers;
2. ours, no DP: the same run without train.privacy (the cost of privacy = 1 / (2) x (1));
3. reference: `torchrun benchmarks/torchrun_dp.py`, what an Opacus user writes: DPDDP,
   PrivacyEngine.make_private with its Poisson DPDataLoader, same noise and clip.

Steady tokens/s leaves out the first 10 steps of each side. The preprocessing, the Ray start and
the worker-thread probe are bench_train.py's. Prints a table and one JSON line
{"bench": "dp", "ratio": median of ours DP / Opacus-torchrun, "dp_cost": ...}.

    python benchmarks/bench_dp.py [--steps 60] [--repeat 3] [--noise 1.0] [--set KEY=VALUE]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_train import (  # noqa: E402 - the benchmarks folder is not a package
    build_config,
    init_ray,
    preprocess,
    probe_worker_threads,
    run_ours,
    run_torchrun,
)

log = logging.getLogger("bench_dp")


def run_reference(cfg, data_dir: str, args, threads: int, work: Path) -> dict:
    ref, wall = run_torchrun("torchrun_dp.py", cfg, data_dir, args.steps, threads, work)
    return {
        "tokens_per_s": ref["tokens_per_s"],
        "wall_s": wall,
        "steps": ref["steps"],
        "threads": ref["threads"],
        "last_loss": ref["last_loss"],
        "epsilon": ref["epsilon"],
    }


def _med(runs, key):
    return statistics.median(r[key] for r in runs)


def _spread(runs, key, fmt):
    vals = [r[key] for r in runs]
    return f"{format(min(vals), fmt)}-{format(max(vals), fmt)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8, help="rows per worker per step")
    ap.add_argument("--max-docs", type=int, default=400)
    ap.add_argument("--noise", type=float, default=1.0, help="noise multiplier (both DP sides)")
    ap.add_argument("--config", help="YAML config to start from (default: built-in defaults)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--work-dir")
    args = ap.parse_args(argv)
    args.workers, args.gpu, args.ray_address = 2, False, None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_dp_")).resolve()
    import ray

    base = build_config(args, work)
    private = base.model_copy(deep=True)
    private.train = private.train.model_copy(
        update={
            "privacy": type(base.train.privacy)(
                enabled=True, noise_multiplier=args.noise, max_grad_norm=1.0
            )
        }
    )
    init_ray(args)
    manifest, _ = preprocess(base)
    threads = probe_worker_threads(base)
    dp, plain, ref = [], [], []
    for i in range(args.repeat):
        if i:
            init_ray(args)
        dp.append(run_ours(private, base.data.output_dir, threads))
        plain.append(run_ours(base, base.data.output_dir, threads))
        ray.shutdown()
        ref.append(run_reference(private, base.data.output_dir, args, threads, work))
        log.info(
            "round %d: ours DP %.0f tokens/s, ours no DP %.0f, Opacus torchrun %.0f",
            i + 1,
            dp[-1]["tokens_per_s"],
            plain[-1]["tokens_per_s"],
            ref[-1]["tokens_per_s"],
        )
    print(f"\nmedian of {args.repeat} rounds; spread = min-max; {threads} threads per worker")
    print(f"{'run':<30}{'steady tokens/s':>16}{'spread':>16}{'wall s':>9}{'last loss':>11}")
    for name, runs in (
        ("aigc_ray, train.privacy", dp),
        ("aigc_ray, no DP", plain),
        ("Opacus + torchrun DDP", ref),
    ):
        print(
            f"{name:<30}{_med(runs, 'tokens_per_s'):>16,.0f}"
            f"{_spread(runs, 'tokens_per_s', ',.0f'):>16}{_med(runs, 'wall_s'):>9.1f}"
            f"{_med(runs, 'last_loss'):>11.3f}"
        )
    ratios = [d["tokens_per_s"] / r["tokens_per_s"] for d, r in zip(dp, ref, strict=True)]
    costs = [d["tokens_per_s"] / p["tokens_per_s"] for d, p in zip(dp, plain, strict=True)]
    print(
        f"ours DP / Opacus torchrun: median {statistics.median(ratios):.3f} "
        f"(runs {', '.join(f'{x:.3f}' for x in ratios)}; target >= 0.97)"
    )
    print(
        f"ours DP / ours no DP (the cost of DP-SGD): median {statistics.median(costs):.3f} "
        f"(runs {', '.join(f'{x:.3f}' for x in costs)})"
    )
    out = {
        "bench": "dp",
        "ratio": round(statistics.median(ratios), 3),
        "ratio_runs": [round(x, 3) for x in ratios],
        "dp_cost": round(statistics.median(costs), 3),
        "dp_cost_runs": [round(x, 3) for x in costs],
        "ours_dp_tokens_per_s": round(_med(dp, "tokens_per_s"), 1),
        "ours_plain_tokens_per_s": round(_med(plain, "tokens_per_s"), 1),
        "opacus_tokens_per_s": round(_med(ref, "tokens_per_s"), 1),
        "noise_multiplier": args.noise,
        "batch_size": base.train.batch_size,
        "seq_len": base.train.seq_len,
        "workers": base.train.num_workers,
        "train_blocks": manifest["splits"]["train"]["blocks"],
        "steps": args.steps,
    }
    print(json.dumps(out))
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
