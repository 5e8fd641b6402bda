"""Batch generation throughput: `aigc-ray generate` (Ray Data + the engine in an actor pool) vs
in-process static-batch `model.generate`, same model, same prompts, this machine, one run.

Model: the guide's tiny Llama (benchmarks/tiny_model.py). --prompts distinct stdlib prompts of
32 tokens, exactly --output-tokens new tokens each (greedy; `min_new_tokens` for the reference,
`ignore_eos` rows for ours). Reference: `model.generate` on static left-padded batches of 32 in
this process (2 torch threads). Ours: `run_generate` on a local Ray instance, one actor with 2
CPUs, timed end to end (reading the jsonl, actor start and model load, generation, parquet
write). Target: ratio >= 0.8. Last line: one JSON object with the ratio.

    python benchmarks/bench_generate.py [--prompts 256]
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
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "aigc_bench_tiny"))
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    model_dir = make_model_dir(args.model_dir)
    prompts = bench_prompts(AutoTokenizer.from_pretrained(model_dir), args.prompts, 32)
    tokens = args.prompts * args.output_tokens
    ref_s = static_generate(model_dir, prompts, args.output_tokens)
    with tempfile.TemporaryDirectory() as work:
        summary = ours(model_dir, prompts, args.output_tokens, Path(work))
    assert summary["completion_tokens"] == tokens and summary["errors"] == 0, summary
    ref_tps, our_tps = tokens / ref_s, tokens / summary["seconds"]
    print(f"{'run':<44}{'rows':>6}{'tokens':>9}{'seconds':>9}{'tok/s':>8}")
    print(f"{'static-batch model.generate (in-process)':<44}{args.prompts:>6}{tokens:>9}"
          f"{ref_s:>9.1f}{ref_tps:>8.0f}")  # fmt: skip
    print(f"{'aigc-ray generate (Ray Data + engine actor)':<44}{summary['rows']:>6}{tokens:>9}"
          f"{summary['seconds']:>9.1f}{our_tps:>8.0f}")  # fmt: skip
    ratio = our_tps / ref_tps
    print(f"ratio {ratio:.2f} (target >= 0.8); ours includes reading, actor start, model load "
          f"and the parquet write")  # fmt: skip
    print(json.dumps({"bench": "generate", "ratio": round(ratio, 3), "ours_tok_per_s":
                      round(our_tps), "static_tok_per_s": round(ref_tps), "tokens": tokens,
                      "ours_s": summary["seconds"], "static_s": round(ref_s, 2)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
