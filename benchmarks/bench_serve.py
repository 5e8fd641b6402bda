"""Serving throughput and latency: aigc_ray's Ray Serve endpoint vs a naive server and the
offline static-batch ceiling, same model, same prompts, this machine, one run.

Model: the guide's tiny Llama (8 layers x 512, vocab 8192, random init, fp32; benchmarks/
tiny_model.py). Every request: a distinct stdlib prompt of --prompt-tokens tokens, exactly
--output-tokens new tokens (greedy, `ignore_eos`), streamed.

1. Offline, in this process, before anything else runs: (b) `model.generate` on a static batch
   of 32 (left-padded, min_new_tokens = max_new_tokens); for the engine choice, transformers'
   own continuous-batching manager (`generate_batch`) and our GenerationEngine on the same 32.
2. (a) the naive server (benchmarks/naive_server.py: one request at a time through
   `model.generate`, streamed) under the load generator.
3. Ours: a local Ray instance, `aigc_ray.serve.run_serve` (Router + one ModelServer replica with
   --replica-cpus CPUs, continuous batching up to 32 rows) under the same load generator.

Load generator: asyncio + httpx, N requests at concurrency 1, 8 and 32 (a semaphore), each a
streamed POST /v1/completions. Reports requests/s, output tokens/s (usage counts / wall time),
TTFT p50/p99 (send -> first non-empty chunk), inter-token latency p50/p99 (gaps between chunks
divided by the tokens they carried; a server that coalesces tokens under load is not flattered)
and error rate (non-200, missing [DONE], or fewer tokens than asked). The server and the load
generator share the 2 cores, as they would for a user measuring on one box.

Targets at concurrency 32: output tokens/s >= 8x (a) and >= 0.9x (b), with 0 errors. Last line:
one JSON object with both ratios.

    python benchmarks/bench_serve.py [--requests 96] [--replica-cpus 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from tiny_model import bench_prompts, make_model_dir  # noqa: E402

CONCURRENCY = (1, 8, 32)
KEY = "bench-key"


# ---------------------------------------------------------------- load generator


async def one_request(client, url, body, expected_tokens) -> dict:
    start = time.perf_counter()
    first, last, gaps, tokens, done = None, None, [], 0, False
    chunk_times: list[float] = []
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return {"ok": False, "status": resp.status_code}
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                now = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices", [])):
                    if first is None:
                        first = now
                    chunk_times.append(now)
                last = now
    except httpx.HTTPError as e:
        return {"ok": False, "status": type(e).__name__}
    ok = done and tokens >= expected_tokens and first is not None
    if len(chunk_times) > 1:
        # spread each chunk's gap over the tokens it carried (~tokens / chunks per chunk)
        per_chunk = max(1.0, (tokens - 1) / (len(chunk_times) - 1))
        gaps = [(b - a) / per_chunk for a, b in zip(chunk_times, chunk_times[1:], strict=False)]
    return {"ok": ok, "status": 200, "ttft": (first or last or start) - start, "itl": gaps,
            "tokens": tokens, "latency": time.perf_counter() - start}  # fmt: skip


async def run_load(url: str, prompts: list[str], n: int, concurrency: int, out_tokens: int,
                   model: str) -> dict:  # fmt: skip
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(timeout=600, limits=limits, headers=headers) as client:

        async def go(i):
            body = {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": out_tokens,
                    "temperature": 0, "stream": True, "ignore_eos": True}  # fmt: skip
            async with sem:
                return await one_request(client, url, body, out_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(go(i) for i in range(n)))
        wall = time.perf_counter() - start
    return summarize(results, wall, concurrency)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarize(results: list[dict], wall: float, concurrency: int) -> dict:
    ok = [r for r in results if r["ok"]]
    itl = [g for r in ok for g in r["itl"]]
    ttft = [r["ttft"] for r in ok]
    return {"concurrency": concurrency, "requests": len(results), "wall_s": wall,
            "req_per_s": len(ok) / wall, "tok_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "itl_p50": pct(itl, 50),
            "itl_p99": pct(itl, 99), "error_rate": 1 - len(ok) / len(results),
            "errors": sorted({str(r["status"]) for r in results if not r["ok"]})}  # fmt: skip


# ---------------------------------------------------------------- offline references


def offline(model_dir: str, prompts: list[str], out_tokens: int, repeats: int) -> dict:
    """Static batch generate (the ceiling), transformers' generate_batch, our engine offline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from aigc_ray.engine import GenerationEngine, SamplingParams

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    n = len(prompts)
    enc = tok(prompts, return_tensors="pt", padding=True)

    def static():
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=out_tokens, min_new_tokens=out_tokens,
                           do_sample=False, pad_token_id=tok.pad_token_id)  # fmt: skip

    def hf_cb():
        cfg = GenerationConfig(max_new_tokens=out_tokens, min_new_tokens=out_tokens,
                               do_sample=False, eos_token_id=-1, pad_token_id=tok.pad_token_id)  # fmt: skip
        ids = [tok(p)["input_ids"] for p in prompts]
        with torch.inference_mode():
            model.generate_batch(ids, generation_config=cfg, progress_bar=False)

    engine = GenerationEngine(model, tok, max_batch_size=32)
    params = [SamplingParams(max_tokens=out_tokens, temperature=0, ignore_eos=True)] * n

    def ours():
        engine.generate(prompts, params)

    # static and engine alternate (this machine's speed drifts); transformers' manager last,
    # so no thread it may leave behind can slow the others.
    runs = (("static", static), ("engine", ours), ("hf_generate_batch", hf_cb))
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    for _name, fn in runs:
        fn()  # warmup
    for _ in range(repeats):
        for name, fn in runs[:2]:
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    engine.close()
    for _ in range(repeats):
        t = time.perf_counter()
        hf_cb()
        times["hf_generate_batch"].append(time.perf_counter() - t)
    out = {name: n * out_tokens / statistics.median(ts) for name, ts in times.items()}
    for name, value in out.items():
        print(f"offline {name}: {value:.0f} tok/s", flush=True)
    return out


# ---------------------------------------------------------------- servers


def run_naive(model_dir, prompts, args) -> list[dict]:
    port = args.port + 1
    proc = subprocess.Popen([sys.executable, str(HERE / "naive_server.py"), model_dir, str(port)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "ready"
        url = f"http://127.0.0.1:{port}/v1/completions"
        rows = []
        for c, n in zip(CONCURRENCY, args.naive_requests, strict=True):
            rows.append(asyncio.run(run_load(url, prompts, n, c, args.output_tokens, "naive")))
            print(f"naive c={c}: {rows[-1]['tok_per_s']:.0f} tok/s", flush=True)
        return rows
    finally:
        proc.kill()
        proc.wait()


def run_ours(model_dir, prompts, args) -> tuple[list[dict], float]:
    import ray
    from ray import serve

    from aigc_ray.config import ServeConfig
    from aigc_ray.serve import run_serve

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"AIGC_RAY_API_KEYS": KEY}})  # fmt: skip
    try:
        t = time.perf_counter()
        cfg = ServeConfig(model_dir=model_dir, model_name="tiny", port=args.port,
                          num_cpus=args.replica_cpus, max_batch_size=32, max_ongoing_requests=64,
                          max_tokens_limit=args.output_tokens)  # fmt: skip
        base = run_serve(cfg)
        startup = time.perf_counter() - t
        url = f"{base}/v1/completions"
        asyncio.run(run_load(url, prompts, 4, 4, args.output_tokens, "tiny"))  # warmup
        rows = []
        for c, n in zip(CONCURRENCY, args.requests, strict=True):
            rows.append(asyncio.run(run_load(url, prompts, n, c, args.output_tokens, "tiny")))
            print(f"ours c={c}: {rows[-1]['tok_per_s']:.0f} tok/s", flush=True)
        return rows, startup
    finally:
        serve.shutdown()
        ray.shutdown()


# ---------------------------------------------------------------- report


def print_table(naive: list[dict], ours: list[dict], off: dict) -> None:
    head = (f"{'server':<8}{'conc':>5}{'reqs':>6}{'req/s':>8}{'tok/s':>9}{'TTFT p50':>10}"
            f"{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}{'errors':>8}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for name, rows in (("naive", naive), ("ours", ours)):
        for r in rows:
            print(f"{name:<8}{r['concurrency']:>5}{r['requests']:>6}{r['req_per_s']:>8.2f}"
                  f"{r['tok_per_s']:>9.0f}{r['ttft_p50']:>9.3f}s{r['ttft_p99']:>9.3f}s"
                  f"{r['itl_p50'] * 1e3:>7.1f}ms{r['itl_p99'] * 1e3:>7.1f}ms"
                  f"{r['error_rate']:>8.1%}")  # fmt: skip
    print(f"offline static batch of 32 `model.generate` (b): {off['static']:.0f} tok/s")
    print(f"offline transformers generate_batch (continuous): {off['hf_generate_batch']:.0f} tok/s")
    print(f"offline aigc_ray GenerationEngine (continuous):  {off['engine']:.0f} tok/s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, nargs=3, default=[8, 32, 96],
                   help="requests at concurrency 1, 8, 32 (ours)")  # fmt: skip
    p.add_argument("--naive-requests", type=int, nargs=3, default=[6, 12, 32])
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--replica-cpus", type=float, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--port", type=int, default=8061)
    p.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "aigc_bench_tiny"))
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    model_dir = make_model_dir(args.model_dir)
    prompts = bench_prompts(AutoTokenizer.from_pretrained(model_dir), 32, args.prompt_tokens)
    off = offline(model_dir, prompts, args.output_tokens, args.repeats)
    naive = run_naive(model_dir, prompts, args)
    ours, startup = run_ours(model_dir, prompts, args)
    print_table(naive, ours, off)
    c32_ours, c32_naive = ours[-1]["tok_per_s"], naive[-1]["tok_per_s"]
    vs_naive, vs_static = c32_ours / c32_naive, c32_ours / off["static"]
    met = vs_naive >= 8 and vs_static >= 0.9 and ours[-1]["error_rate"] == 0
    print(f"at concurrency 32: {vs_naive:.2f}x naive (target 8x), {vs_static:.2f}x static batch "
          f"(target 0.9x), errors {ours[-1]['error_rate']:.1%}; serve startup {startup:.1f}s")  # fmt: skip
    print(json.dumps({"bench": "serve", "ratio": round(vs_static, 3),
                      "ratio_vs_naive": round(vs_naive, 2), "ratio_vs_static": round(vs_static, 3),
                      "targets_met": met, "ours_c32_tok_per_s": round(c32_ours),
                      "naive_c32_tok_per_s": round(c32_naive), "static_tok_per_s": round(off["static"]),
                      "hf_generate_batch_tok_per_s": round(off["hf_generate_batch"]),
                      "engine_offline_tok_per_s": round(off["engine"]),
                      "serve_startup_s": round(startup, 1),
                      "rows": {"naive": naive, "ours": ours}}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
