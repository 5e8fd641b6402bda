"""Batch generation throughput: `aigc-ray generate` (Ray Data + the engine in an actor pool) vs
in-process static-batch `model.generate`, same model, same prompts, this machine, one run.

Model: the guide's tiny Llama (benchmarks/tiny_model.py). --prompts distinct stdlib prompts of
32 tokens, exactly --output-tokens new tokens each (greedy; `min_new_tokens` for the reference,
`ignore_eos` rows for ours). Reference: `model.generate` on static left-padded batches of 32 in
this process (2 torch threads). Ours: `run_generate` on a local Ray instance, one actor with 2
CPUs, timed end to end (reading the jsonl, actor start and model load, generation, parquet
write), so it carries a fixed cost of several seconds (a new worker process importing torch and
transformers) that the in-process reference does not pay. Two dataset sizes show it: the small
one is dominated by that cost, the larger one is closer to what a batch job over a dataset sees.
Target: ratio >= 0.8 on the largest size. Last line: one JSON object with the ratios.

    python benchmarks/bench_generate.py [--prompts 256 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from tiny_model import bench_prompts, make_model_dir  # noqa: E402


def static_generate(model_dir: str, prompts: list[str], out_tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), 32):
            enc = tok(prompts[i : i + 32], return_tensors="pt", padding=True)
            model.generate(**enc, max_new_tokens=out_tokens, min_new_tokens=out_tokens,
                           do_sample=False, pad_token_id=tok.pad_token_id)  # fmt: skip
    return time.perf_counter() - start


def ours(model_dir: str, prompts: list[str], out_tokens: int, work: Path) -> dict:
    import ray

    from aigc_ray.config import GenerateConfig
    from aigc_ray.generate import run_generate

    src = work / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "ignore_eos": True}) + "\n" for p in prompts))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # 3 logical CPUs on 2 cores: the 2-CPU actor plus the read tasks (0.25 CPU) that feed it
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        cfg = GenerateConfig(inputs=[str(src)], output_dir=str(work / "out"), num_cpus=2,
                             max_tokens=out_tokens, batch_size=32, max_batch_size=32)  # fmt: skip
        return run_generate(cfg, model_dir)
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "aigc_bench_tiny"))
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    model_dir = make_model_dir(args.model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows, ratios = [], {}
    for n in args.prompts:
        prompts = bench_prompts(tok, n, 32)
        tokens = n * args.output_tokens
        ref_s = static_generate(model_dir, prompts, args.output_tokens)
        with tempfile.TemporaryDirectory() as work:
            summary = ours(model_dir, prompts, args.output_tokens, Path(work))
        assert summary["completion_tokens"] == tokens and summary["errors"] == 0, summary
        rows.append(("static-batch model.generate (in-process)", n, tokens, ref_s))
        rows.append(("aigc-ray generate (Ray Data + engine actor)", n, tokens, summary["seconds"]))
        ratios[n] = round(ref_s / summary["seconds"], 3)
    print(f"{'run':<44}{'rows':>6}{'tokens':>9}{'seconds':>9}{'tok/s':>8}")
    for name, n, tokens, secs in rows:
        print(f"{name:<44}{n:>6}{tokens:>9}{secs:>9.1f}{tokens / secs:>8.0f}")
    for n, ratio in ratios.items():
        print(f"ratio at {n} prompts: {ratio:.2f}")
    largest = max(ratios)
    print(f"target >= 0.8 at {largest} prompts; ours includes reading, actor start, model load "
          f"and the parquet write")  # fmt: skip
    print(
        json.dumps(
            {
                "bench": "generate",
                "ratio": ratios[largest],
                "prompts": largest,
                "ratios_by_prompts": ratios,
                "targets_met": ratios[largest] >= 0.8,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
