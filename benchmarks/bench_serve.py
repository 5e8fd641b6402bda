"""Serving throughput, latency and stream smoothness: aigc_ray's Ray Serve endpoint (engine
builtin, engine vllm) against vLLM's own OpenAI server, same model, same load generator, one run.

Model: the guide's tiny Llama (8 layers x 512, vocab 8192, random init, fp32; benchmarks/
tiny_model.py). Every request: a distinct stdlib prompt of --prompt-tokens tokens, exactly
--output-tokens new tokens (greedy, `ignore_eos`), streamed.

Servers, one after the other on the same 2 cores (each alone while measured):
  (c) reference: `python -m vllm.entrypoints.openai.api_server --model DIR --dtype float32`
      (vLLM's CPU build, its defaults otherwise);
  ours/builtin: `aigc_ray.serve.run_serve` on a local Ray, one replica with --replica-cpus CPUs,
      engine: builtin, serve.ingress default (direct: HAProxy, then the model replica, which
      serves the OpenAI API itself);
  ours/vllm: the same with engine: vllm (vLLM's AsyncLLM inside our replica, its defaults);
  ours/ENGINE+haproxy: serve.ingress haproxy (HAProxy, then the Router, then the model replica);
  ours/ENGINE+proxy: serve.ingress proxy (Serve's Python proxy, the Router, the model replica).

Load generator: asyncio + httpx, N streamed POST /v1/completions at concurrency 1, 8 and 32,
repeated --rounds times per server (medians reported, spread = (max - min) / median). Reports
output tokens/s (usage counts / wall time), TTFT p50 (send -> first chunk with text), the gap
between streamed chunks p50 (what a user sees), inter-token latency p50 (chunk gaps divided by
the tokens they carried) and errors (non-200, missing [DONE], fewer tokens than asked).

Targets (the serving issue), for the two defaults (ours/builtin, ours/vllm): at concurrency
32 >= 1.0x (c) in output tok/s with 0 errors; at concurrency 1 TTFT p50 <= 1.15x (c); chunk gap
p50 <= 40 ms at concurrency 32. Last line: one JSON object with the ratios ("ratio": the lower
of the two defaults, ours/builtin and ours/vllm) and raw numbers.

    python benchmarks/bench_serve.py [--rounds 3] [--replica-cpus 2]
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
SERVERS = ("vllm-server", "ours/builtin", "ours/vllm", "ours/builtin+haproxy")
CHOICES = (
    *SERVERS,
    "ours/vllm+haproxy",
    "ours/builtin+proxy",
    "ours/vllm+proxy",
)
KEY = "bench-key"
MODEL = "tiny"


# ---------------------------------------------------------------- load generator


async def one_request(client, url, body, expected_tokens) -> dict:
    start = time.perf_counter()
    first, done, tokens = None, False, 0
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
                    first = first or now
                    chunk_times.append(now)
    except httpx.HTTPError as e:
        return {"ok": False, "status": type(e).__name__}
    ok = done and tokens >= expected_tokens and first is not None
    gaps = [b - a for a, b in zip(chunk_times, chunk_times[1:], strict=False)]
    per_chunk = max(1.0, (tokens - 1) / max(1, len(chunk_times) - 1))
    return {
        "ok": ok,
        "status": 200,
        "ttft": (first or start) - start,
        "gaps": gaps,
        "itl": [g / per_chunk for g in gaps],
        "tokens": tokens,
    }


async def run_load(
    url: str, prompts: list[str], n: int, concurrency: int, out_tokens: int, model
) -> dict:
    """``n`` streamed completions, ``concurrency`` at a time; ``model`` a name, or a list of
    names taken in turn (request i names model[i % len])."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(timeout=600, limits=limits, headers=headers) as client:

        async def go(i):
            body = {
                "model": model if isinstance(model, str) else model[i % len(model)],
                "prompt": prompts[i % len(prompts)],
                "max_tokens": out_tokens,
                "temperature": 0,
                "stream": True,
                "ignore_eos": True,
                "stream_options": {"include_usage": True},
            }
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
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "tok_per_s": sum(r["tokens"] for r in ok) / wall,
        "ttft_p50": pct([r["ttft"] for r in ok], 50),
        "gap_p50": pct([g for r in ok for g in r["gaps"]], 50),
        "itl_p50": pct([g for r in ok for g in r["itl"]], 50),
        "errors": len(results) - len(ok),
        "error_kinds": sorted({str(r["status"]) for r in results if not r["ok"]}),
    }


def measure(
    url: str, prompts, args, model, label: str, concurrency=CONCURRENCY
) -> dict[int, list[dict]]:
    """--rounds rounds of the concurrencies; {concurrency: [round results]}."""
    asyncio.run(run_load(url, prompts, 4, 4, args.output_tokens, model))  # warm-up
    rows: dict[int, list[dict]] = {c: [] for c in concurrency}
    counts = dict(zip(CONCURRENCY, args.requests, strict=True))
    for r in range(args.rounds):
        for c, n in ((c, counts[c]) for c in concurrency):
            row = asyncio.run(run_load(url, prompts, n, c, args.output_tokens, model))
            rows[c].append(row)
            print(
                f"{label} round {r + 1} c={c}: {row['tok_per_s']:.0f} tok/s, TTFT "
                f"{row['ttft_p50'] * 1e3:.0f} ms, gap {row['gap_p50'] * 1e3:.0f} ms, "
                f"errors {row['errors']}",
                flush=True,
            )
    return rows


# ---------------------------------------------------------------- servers


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def run_vllm_server(
    model_dir: str, prompts, args, extra: tuple[str, ...] = (), run=None
) -> tuple[dict, float]:
    """vLLM's own server (``extra``: more of its flags); ``run(url)`` measures it (default:
    measure() of MODEL). Returns (measurements, startup seconds)."""
    port = args.port + 1
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "4"}
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_dir,
        "--served-model-name",
        MODEL,
        "--dtype",
        "float32",
        "--max-model-len",
        "1024",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-log-stats",
        *extra,
    ]
    log = open(Path(tempfile.gettempdir()) / "bench_serve_vllm.log", "w")  # noqa: SIM115
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", proc)
        startup = time.perf_counter() - t
        url = f"http://127.0.0.1:{port}/v1/completions"
        if run is not None:
            return run(url), startup
        return measure(url, prompts, args, MODEL, "vllm-server"), startup
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def run_ours(
    model_dir: str,
    prompts,
    args,
    engine: str,
    ingress: str = "direct",
    extra: dict | None = None,
    run=None,
) -> tuple[dict, float]:
    """Our endpoint on a local Ray (``extra``: more ServeConfig fields); ``run(url)`` measures
    it (default: measure() of MODEL). Returns (measurements, startup seconds)."""
    import ray
    from ray import serve

    from aigc_ray.config import ServeConfig
    from aigc_ray.serve import run_serve

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"AIGC_RAY_API_KEYS": KEY}},
    )
    try:
        t = time.perf_counter()
        cfg = ServeConfig(
            model_dir=model_dir,
            model_name=MODEL,
            port=args.port,
            engine=engine,
            num_cpus=args.replica_cpus,
            dtype="float32",
            max_ongoing_requests=64,
            max_tokens_limit=args.output_tokens,
            vllm={"kv_cache_memory_gb": 4},
            ingress=ingress,
            **({} if args.chunks_per_s is None else {"stream_chunks_per_s": args.chunks_per_s}),
            **(extra or {}),
        )
        base = run_serve(cfg)
        wait_ready(f"{base}/health", None)
        startup = time.perf_counter() - t
        if run is not None:
            return run(f"{base}/v1/completions"), startup
        label = f"ours/{engine}" + ("" if ingress == "direct" else f"+{ingress}")
        return measure(f"{base}/v1/completions", prompts, args, MODEL, label), startup
    finally:
        serve.shutdown()
        ray.shutdown()


# ---------------------------------------------------------------- report


def median_row(rounds: list[dict]) -> dict:
    out = {"concurrency": rounds[0]["concurrency"]}
    for key in ("tok_per_s", "ttft_p50", "gap_p50", "itl_p50"):
        values = [r[key] for r in rounds]
        med = statistics.median(values)
        out[key] = med
        out[f"{key}_spread"] = (max(values) - min(values)) / med if med else 0.0
    out["errors"] = sum(r["errors"] for r in rounds)
    return out


def print_table(results: dict[str, dict[int, dict]], rounds: int) -> None:
    print(f"\nmedians of {rounds} rounds (spread = (max - min) / median)")
    head = (
        f"{'server':<20}{'conc':>5}{'out tok/s':>11}{'spread':>8}{'TTFT p50':>10}"
        f"{'chunk gap p50':>15}{'ITL p50':>9}{'errors':>8}"
    )
    print(head)
    print("-" * len(head))
    for name, rows in results.items():
        for c in CONCURRENCY:
            r = rows[c]
            print(
                f"{name:<20}{c:>5}{r['tok_per_s']:>11.0f}{r['tok_per_s_spread']:>8.0%}"
                f"{r['ttft_p50'] * 1e3:>8.0f}ms{r['gap_p50'] * 1e3:>13.0f}ms"
                f"{r['itl_p50'] * 1e3:>7.1f}ms{r['errors']:>8}"
            )


def load_args(p: argparse.ArgumentParser, port: int) -> None:
    """The load, model and replica options of the serving benchmarks (this one and
    bench_adapters.py)."""
    p.add_argument(
        "--requests",
        type=int,
        nargs=3,
        default=[8, 32, 96],
        help="requests at concurrency 1, 8, 32",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--replica-cpus", type=float, default=2)
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "aigc_bench_tiny"))


def bench_model(args) -> tuple[str, list[str]]:
    """(the bench model's directory, built once; 32 distinct prompts of --prompt-tokens)."""
    from transformers import AutoTokenizer

    model_dir = make_model_dir(args.model_dir)
    prompts = bench_prompts(AutoTokenizer.from_pretrained(model_dir), 32, args.prompt_tokens)
    return model_dir, prompts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    load_args(p, port=8061)
    p.add_argument("--only", nargs="*", default=list(SERVERS), choices=CHOICES)
    p.add_argument(
        "--chunks-per-s", type=float, default=None, help="serve.stream_chunks_per_s of ours"
    )
    p.add_argument(
        "--ray-env",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="environment of our local Ray (its processes inherit it), e.g. Serve's settings",
    )
    args = p.parse_args(argv)
    os.environ.update(kv.split("=", 1) for kv in args.ray_env)

    model_dir, prompts = bench_model(args)
    raw, startup = {}, {}

    def runner(name: str):
        if name == "vllm-server":
            return run_vllm_server(model_dir, prompts, args)
        engine, _, ingress = name.removeprefix("ours/").partition("+")
        return run_ours(model_dir, prompts, args, engine, ingress or "direct")

    for name in args.only:
        raw[name], startup[name] = runner(name)
    results = {name: {c: median_row(rows[c]) for c in CONCURRENCY} for name, rows in raw.items()}
    print_table(results, args.rounds)
    print("startup s: " + ", ".join(f"{k} {v:.0f}" for k, v in startup.items()))
    summary = {"bench": "serve", "rounds": args.rounds, "startup_s": startup, "medians": results}
    if "vllm-server" in results:
        ref = results["vllm-server"]
        ratios = {
            name: round(r[32]["tok_per_s"] / ref[32]["tok_per_s"], 3)
            for name, r in results.items()
            if name != "vllm-server"
        }
        ttft = {
            name: round(r[1]["ttft_p50"] / ref[1]["ttft_p50"], 2)
            for name, r in results.items()
            if name != "vllm-server"
        }
        gaps = {name: round(r[32]["gap_p50"] * 1e3, 1) for name, r in results.items()}
        # the serving issue's targets hold for the defaults (serve.ingress direct), each engine
        ours = [n for n in results if n != "vllm-server" and "+" not in n]
        met = {
            "c32_ge_1.0x": all(ratios[n] >= 1.0 and results[n][32]["errors"] == 0 for n in ours),
            "c1_ttft_le_1.15x": all(ttft[n] <= 1.15 for n in ours),
            "gap_p50_c32_le_40ms": all(gaps[n] <= 40 for n in ours),
        }
        for name in ratios:
            print(
                f"{name}: {ratios[name]:.2f}x vLLM's server at c=32, TTFT at c=1 "
                f"{ttft[name]:.2f}x, chunk gap p50 at c=32 {gaps[name]:.0f} ms"
            )
        summary.update(
            ratio=min((ratios[n] for n in ours), default=None),
            ratio_vs_vllm=ratios,
            ttft_c1_vs_vllm=ttft,
            gap_p50_c32_ms=gaps,
            targets=met,
            targets_met=all(met.values()),
        )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
