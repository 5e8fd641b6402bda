"""Many LoRA adapters over one base model: a load that mixes 4 adapters against the base model
alone, on our endpoint (engine builtin and engine vllm, serve.ingress default) and on vLLM's own
OpenAI server with --enable-lora, same adapters, same load generator (bench_serve's), one run.

Adapters: 4 random PEFT LoRA adapters of rank 8 on every projection of the bench model
(benchmarks/tiny_model.py: 8 layers x 512), built once beside it. Every request: a distinct
stdlib prompt of --prompt-tokens tokens, exactly --output-tokens new tokens (greedy,
`ignore_eos`), streamed, 32 at a time (--requests' third count per load). Each round measures
each server twice: requests naming the base model, then requests naming a0..a3 in turn;
--rounds rounds, medians reported with their spread.

  vllm-server+lora: `vllm.entrypoints.openai.api_server --enable-lora --max-loras 4
                     --max-lora-rank 16 --lora-modules a0=DIR ...` (defaults otherwise);
  ours/builtin, ours/vllm: `serve.adapters` {a0..a3}, max_loras 4, max_lora_rank 16.

Target (the serving issue): on each of our engines, the adapter mix at c=32 >= 0.7x that
server's base-model tok/s; vLLM's own ratio and tok/s beside it. Last line: one JSON object
("ratio": the lower of our two engines' mix/base ratios).

    python benchmarks/bench_adapters.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_serve import (  # noqa: E402
    MODEL,
    bench_model,
    load_args,
    median_row,
    run_load,
    run_ours,
    run_vllm_server,
)

ADAPTERS = ("a0", "a1", "a2", "a3")
RANK, MAX_RANK = 8, 16
SERVERS = ("vllm-server+lora", "ours/builtin", "ours/vllm")
CONCURRENCY = 32


def make_adapters(model_dir: str) -> dict[str, str]:
    """ADAPTERS as PEFT directories beside the model (built once): random A and B, rank RANK,
    on every projection."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = Path(f"{model_dir}-adapters")
    paths = {name: str(root / name) for name in ADAPTERS}
    if all((Path(p) / "adapter_model.safetensors").is_file() for p in paths.values()):
        return paths
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for i, path in enumerate(paths.values()):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        peft = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=16, target_modules=targets))
        with torch.no_grad():
            for pname, p in peft.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, 0.02)
        peft.save_pretrained(path)
    return paths


def measure_mix(url: str, prompts, args, label: str) -> dict[str, list[dict]]:
    """--rounds rounds of (base model, adapter mix) at CONCURRENCY; {load: [round results]}."""
    n = args.requests[2]
    loads = {"base": MODEL, "4-adapter mix": list(ADAPTERS)}
    for model in loads.values():  # warm-up: every adapter loaded once
        asyncio.run(run_load(url, prompts, 8, 8, args.output_tokens, model))
    rows: dict[str, list[dict]] = {load: [] for load in loads}
    for r in range(args.rounds):
        for load, model in loads.items():
            row = asyncio.run(run_load(url, prompts, n, CONCURRENCY, args.output_tokens, model))
            rows[load].append(row)
            print(
                f"{label} round {r + 1} {load}: {row['tok_per_s']:.0f} tok/s, TTFT "
                f"{row['ttft_p50'] * 1e3:.0f} ms, gap {row['gap_p50'] * 1e3:.0f} ms, errors "
                f"{row['errors']}",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    load_args(p, port=8071)
    p.add_argument("--only", nargs="*", default=list(SERVERS), choices=SERVERS)
    args = p.parse_args(argv)
    args.chunks_per_s = None  # run_ours: serve's default

    model_dir, prompts = bench_model(args)
    adapters = make_adapters(model_dir)
    vllm_flags = (
        "--enable-lora",
        "--max-loras",
        str(len(ADAPTERS)),
        "--max-lora-rank",
        str(MAX_RANK),
        "--lora-modules",
        *(f"{name}={path}" for name, path in adapters.items()),
    )
    ours = {"adapters": adapters, "max_loras": len(ADAPTERS), "max_lora_rank": MAX_RANK}
    raw, startup = {}, {}
    for name in args.only:

        def run(url, name=name):
            return measure_mix(url, prompts, args, name)

        if name == "vllm-server+lora":
            raw[name], startup[name] = run_vllm_server(model_dir, prompts, args, vllm_flags, run)
        else:
            engine = name.removeprefix("ours/")
            raw[name], startup[name] = run_ours(
                model_dir, prompts, args, engine, extra=ours, run=run
            )
    results = {
        name: {load: median_row(r) for load, r in loads.items()} for name, loads in raw.items()
    }

    print(f"\nmedians of {args.rounds} rounds at c={CONCURRENCY} (spread = (max - min) / median)")
    head = (
        f"{'server':<18}{'load':<15}{'out tok/s':>10}{'spread':>8}{'TTFT p50':>10}"
        f"{'chunk gap p50':>15}{'errors':>8}{'mix/base':>10}"
    )
    print(head)
    print("-" * len(head))
    ratios = {}
    for name, loads in results.items():
        ratios[name] = round(loads["4-adapter mix"]["tok_per_s"] / loads["base"]["tok_per_s"], 3)
        for load, r in loads.items():
            mix = f"{ratios[name]:.2f}x" if load != "base" else ""
            print(
                f"{name:<18}{load:<15}{r['tok_per_s']:>10.0f}{r['tok_per_s_spread']:>8.0%}"
                f"{r['ttft_p50'] * 1e3:>8.0f}ms{r['gap_p50'] * 1e3:>13.0f}ms{r['errors']:>8}"
                f"{mix:>10}"
            )
    print("startup s: " + ", ".join(f"{k} {v:.0f}" for k, v in startup.items()))
    engines = [n for n in results if n.startswith("ours/")]
    summary = {
        "bench": "adapters",
        "rounds": args.rounds,
        "concurrency": CONCURRENCY,
        "startup_s": startup,
        "medians": results,
        "mix_over_base": ratios,
        "ratio": min((ratios[n] for n in engines), default=None),
    }
    if "vllm-server+lora" in results:
        ref = results["vllm-server+lora"]["4-adapter mix"]["tok_per_s"]
        summary["mix_vs_vllm_mix"] = {
            n: round(results[n]["4-adapter mix"]["tok_per_s"] / ref, 3) for n in engines
        }
    met = all(ratios[n] >= 0.7 and results[n]["4-adapter mix"]["errors"] == 0 for n in engines)
    summary["targets"] = {"mix_ge_0.7x_base": met}
    summary["targets_met"] = met
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
