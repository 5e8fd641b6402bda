"""The optimize stage: a model directory in, an optimized model directory out, and a report.

Steps, each optional, in this order: prune (magnitude, 2:4, or whole MLP channels), a short
recovery fine-tune through the trainer, precision (bf16/fp16), quantization of the Linear
weights (int8 weight-only, int8 weights + dynamic int8 activations, int4 weight-only in groups),
written in the compressed-tensors format that vLLM and transformers load, and the engine's
compile setting. The output is written to a temporary directory and renamed into place, so a
failure never leaves half a model behind.

The report compares the result with the source: size on disk, parameters (and non-zero ones),
validation perplexity on the data stage's val split and greedy token agreement on held prompts
(both through the built-in engine's own kernels, so a quantized model is measured as it is
served), and engine tokens/s at batch 1 and 32. A perplexity rise beyond
``max_perplexity_increase`` fails the stage with the report, so the pipeline never serves it.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from aigc_ray.config import OptimizeConfig
from aigc_ray.errors import AigcRayError

log = logging.getLogger(__name__)

REPORT = "report.json"


class OptimizeError(AigcRayError, ValueError):
    """The optimization cannot run (bad method for this model/hardware) or its result is not
    acceptable (``report`` holds the figures)."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


# ---------------------------------------------------------------- preflight


def target_dtype(cfg: OptimizeConfig, source_dtype: torch.dtype) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if cfg.quantization != "none" else source_dtype
    return getattr(torch, cfg.dtype)


def _linears(model) -> list[tuple[str, torch.nn.Linear]]:
    """The Linear layers a method applies to: every one in the decoder blocks (not the
    embeddings or lm_head, which stay dense)."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"
    ]


def int4_group_size(model, requested: int | None) -> int:
    widths = {m.in_features for _, m in _linears(model)}
    for g in [requested] if requested else (128, 64, 32):
        if all(w % g == 0 for w in widths):
            return g
    raise OptimizeError(
        f"quantization int4_weight_only: no group size in "
        f"{[requested] if requested else [128, 64, 32]} divides every Linear "
        f"input width {sorted(widths)}; set optimize.int4_group_size"
    )


def preflight(cfg: OptimizeConfig, model) -> None:
    """Every reason the requested methods cannot run here, before any work starts."""
    from aigc_ray.engine.quant import int4_kernel_available

    dtype = target_dtype(cfg, next(model.parameters()).dtype)
    if dtype == torch.bfloat16 and not _bf16_supported():
        raise OptimizeError(
            "dtype bfloat16: this CPU has no bf16 support in oneDNN "
            "(AVX512-BF16 or AMX); use float32 or run on a GPU"
        )
    nothing = cfg.quantization == "none" and cfg.pruning == "none" and cfg.dtype == "auto"
    if nothing and not cfg.compile:
        raise OptimizeError("optimize: nothing to do (set dtype, quantization or pruning)")
    if cfg.quantization != "none" and not _linears(model):
        kind = type(model).__name__
        raise OptimizeError(
            f"quantization {cfg.quantization}: {kind} has no nn.Linear layers in "
            "its blocks (compressed-tensors quantizes Linear modules)"
        )
    if cfg.quantization == "int4_weight_only":
        if not int4_kernel_available():
            raise OptimizeError(
                "quantization int4_weight_only: this torch build has no CPU int4 "
                "matmul kernel (_weight_int4pack_mm_for_cpu)"
            )
        if dtype != torch.bfloat16:
            raise OptimizeError(
                "quantization int4_weight_only needs dtype bfloat16 (the int4 "
                "kernels, ours and vLLM's, take bf16 activations)"
            )
        int4_group_size(model, cfg.int4_group_size)
    if cfg.pruning == "mlp_channels" and not all(
        hasattr(layer, "mlp") and hasattr(layer.mlp, "gate_proj") for layer in _blocks(model)
    ):
        raise OptimizeError(
            "pruning mlp_channels: needs gated MLPs (gate/up/down projections, "
            "Llama-family); use magnitude pruning for this model"
        )


def _bf16_supported() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _blocks(model) -> list:
    inner = getattr(model, "model", None)
    return list(getattr(inner, "layers", []) or [])


# ---------------------------------------------------------------- pruning


@torch.no_grad()
def prune_magnitude(model, sparsity: float) -> dict[str, torch.Tensor]:
    """Zero the ``sparsity`` fraction of smallest-magnitude weights of each block Linear;
    returns the keep masks (re-applied after a recovery fine-tune)."""
    masks = {}
    for name, m in _linears(model):
        w = m.weight
        k = int(w.numel() * sparsity)
        if k == 0:
            continue
        threshold = w.abs().flatten().kthvalue(k).values
        masks[name] = w.abs() > threshold
        w.mul_(masks[name])
    return masks


@torch.no_grad()
def prune_2of4(model) -> dict[str, torch.Tensor]:
    """Keep the two largest of every four consecutive weights along each row (the pattern
    GPUs' sparse tensor cores run at up to 2x; dense kernels on CPUs gain nothing)."""
    masks = {}
    for name, m in _linears(model):
        w = m.weight
        if w.shape[1] % 4:
            continue
        groups = w.abs().reshape(-1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, groups.topk(2, dim=1).indices, True)
        masks[name] = keep.reshape(w.shape)
        w.mul_(masks[name])
    return masks


@torch.no_grad()
def prune_mlp_channels(model, sparsity: float) -> None:
    """Remove the least important ``sparsity`` fraction of each block's MLP channels (rows of
    gate/up, columns of down; importance = product of their norms): a smaller dense model that
    any engine runs faster, saved with the reduced intermediate_size."""
    width = None
    for layer in _blocks(model):
        mlp = layer.mlp
        score = (
            mlp.gate_proj.weight.norm(dim=1)
            * mlp.up_proj.weight.norm(dim=1)
            * mlp.down_proj.weight.norm(dim=0)
        )
        keep_n = max(1, int(round(score.numel() * (1 - sparsity))))
        keep = score.topk(keep_n).indices.sort().values
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight = torch.nn.Parameter(proj.weight[keep].clone())
            proj.out_features = keep_n
        mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight[:, keep].clone())
        mlp.down_proj.in_features = keep_n
        width = keep_n
    model.config.intermediate_size = width


def apply_masks(model, masks: dict[str, torch.Tensor]) -> None:
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            modules[name].weight.mul_(mask)


# ---------------------------------------------------------------- quantization


QUANT_SCHEMES = {"int8_weight_only": "W8A16", "w8a8": "W8A8", "int4_weight_only": "W4A16"}
QUANT_FORMATS = {
    "int8_weight_only": "pack-quantized",
    "w8a8": "int-quantized",
    "int4_weight_only": "pack-quantized",
}


CLIP_SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)


@torch.no_grad()
def rtn_qparams(grouped: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points [rows, groups] of round-to-nearest quantization of ``grouped``
    weights [rows, groups, group size]: per group, the range [min, max] shrunk by the factor of
    CLIP_SHRINKS whose rounding reconstructs the group with the least squared error (clipping a
    few outliers instead of coarsening every other weight; the "mse" observer of llm-compressor).
    Unshrunk min/max is among the candidates, so the error is never larger than min/max's."""
    from compressed_tensors.quantization.utils import calculate_qparams, calculate_range

    qmin, qmax = calculate_range(args, grouped.device)
    lo, hi = grouped.amin(-1), grouped.amax(-1)
    best = best_err = None
    for shrink in CLIP_SHRINKS:
        scale, zero = calculate_qparams(lo * shrink, hi * shrink, args)
        s, z = scale[..., None], zero[..., None].to(scale.dtype)
        q = torch.clamp(torch.round(grouped / s + z), qmin, qmax)
        err = (((q - z) * s - grouped) ** 2).sum(-1)
        if best is None:
            best, best_err = (scale, zero), err
            continue
        better = err < best_err
        best = (torch.where(better, scale, best[0]), torch.where(better, zero, best[1]))
        best_err = torch.minimum(err, best_err)
    return best


@torch.no_grad()
def quantize_and_save(model, method: str, group_size: int | None, out_dir: Path) -> None:
    """Round-to-nearest quantization of every block Linear (per output channel for int8, per
    group for int4; ranges from rtn_qparams), saved compressed so vLLM and transformers load
    it."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )

    scheme = preset_name_to_scheme(QUANT_SCHEMES[method], ["Linear"])
    if method == "int4_weight_only":
        scheme.weights.group_size = group_size
    else:  # int8: one scale per output channel
        scheme.weights.strategy, scheme.weights.group_size = "channel", None
    skip = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." not in f".{n}"
    ]
    apply_quantization_config(
        model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=skip)
    )
    for _, m in _linears(model):
        args, w = m.quantization_scheme.weights, m.weight.float()
        size = args.group_size if args.strategy == "group" else w.shape[1]
        scale, zero = rtn_qparams(w.reshape(w.shape[0], -1, size), args)
        m.weight_scale.data.copy_(scale.reshape(m.weight_scale.shape))
        if hasattr(m, "weight_zero_point"):
            m.weight_zero_point.data.copy_(zero.reshape(m.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(
        model, quantization_format=QUANT_FORMATS[method]
    )
    compressor.compress_model(model)
    model.save_pretrained(str(out_dir))
    compressor.update_config(str(out_dir))


# ---------------------------------------------------------------- the stage


def run_optimize(cfg: OptimizeConfig, model_dir: str, data_dir: str | None, recovery=None) -> dict:
    """Optimize ``model_dir`` into ``cfg.output_dir``; return the report (also written there).

    ``recovery(pruned_dir, steps) -> fine-tuned dir`` runs the recovery fine-tune (the CLI
    passes one built on the trainer); it is needed only when ``cfg.recovery_steps > 0``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aigc_ray.model import check_model_dir
    from aigc_ray.storage import local_model_dir

    check_model_dir(model_dir)
    source = local_model_dir(model_dir)
    if Path(cfg.output_dir).resolve() == Path(source).resolve():
        raise OptimizeError("optimize.output_dir must differ from the source model directory")
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    preflight(cfg, model)
    if cfg.recovery_steps and cfg.pruning == "none":
        raise OptimizeError("optimize.recovery_steps needs a pruning method")
    if cfg.recovery_steps and recovery is None:
        raise OptimizeError("optimize.recovery_steps needs the trainer (run through the CLI)")
    tokenizer = AutoTokenizer.from_pretrained(source)
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        steps = _transform(cfg, model, tokenizer, staging, recovery)
        report = evaluate(cfg, source, str(staging), data_dir)
        report.update(
            steps=steps,
            seconds=round(time.perf_counter() - started, 1),
            config=cfg.model_dump(mode="json"),
            source=str(model_dir),
            output_dir=str(out),
        )
        (staging / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not report["passed"]:
        raise OptimizeError(
            f"optimized model rejected: validation perplexity {report['optimized']['perplexity']}"
            f" vs {report['original']['perplexity']} (+{report['perplexity_increase']:.1%}, "
            f"limit +{cfg.max_perplexity_increase:.0%}); report in {out / REPORT}",
            report,
        )
    return report


def _transform(cfg: OptimizeConfig, model, tokenizer, staging: Path, recovery) -> list[str]:
    steps = []
    masks: dict = {}
    if cfg.pruning == "magnitude":
        masks = prune_magnitude(model, cfg.sparsity)
        steps.append(f"magnitude pruning {cfg.sparsity:.0%}")
    elif cfg.pruning == "2of4":
        masks = prune_2of4(model)
        steps.append("2:4 pruning")
    elif cfg.pruning == "mlp_channels":
        prune_mlp_channels(model, cfg.sparsity)
        steps.append(
            f"MLP channel pruning {cfg.sparsity:.0%} -> intermediate_size "
            f"{model.config.intermediate_size}"
        )
    if cfg.recovery_steps:
        from transformers import AutoModelForCausalLM

        pruned = staging / "pruned"
        model.save_pretrained(str(pruned))
        tokenizer.save_pretrained(str(pruned))
        tuned = recovery(str(pruned), cfg.recovery_steps)
        model = AutoModelForCausalLM.from_pretrained(tuned).eval()
        apply_masks(model, masks)  # the fine-tune moved pruned weights: zero them again
        shutil.rmtree(pruned)
        steps.append(f"recovery fine-tune {cfg.recovery_steps} steps")
    dtype = target_dtype(cfg, next(model.parameters()).dtype)
    if dtype != next(model.parameters()).dtype:
        model = model.to(dtype)
        steps.append(f"dtype {str(dtype).removeprefix('torch.')}")
    if cfg.quantization != "none":
        group = int4_group_size(model, cfg.int4_group_size) if "int4" in cfg.quantization else None
        quantize_and_save(model, cfg.quantization, group, staging)
        steps.append(f"quantization {cfg.quantization}" + (f" (group {group})" if group else ""))
    else:
        model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    if cfg.compile:
        steps.append("engine setting: torch.compile the decode step")
    from aigc_ray.engine.core import ENGINE_SETTINGS

    (staging / ENGINE_SETTINGS).write_text(json.dumps({"compile": cfg.compile}) + "\n")
    return steps


# ---------------------------------------------------------------- the report


def evaluate(cfg: OptimizeConfig, original: str, optimized: str, data_dir: str | None) -> dict:
    """Size, parameters, perplexity, greedy agreement and engine speed of both directories."""
    blocks = val_blocks(data_dir, cfg.eval_blocks) if data_dir else None
    prompts = held_prompts(blocks, cfg.held_prompts) if blocks is not None else None
    measured = measure_dirs(
        {"original": original, "optimized": optimized},
        blocks,
        prompts,
        cfg.agreement_tokens,
        cfg.benchmark,
    )
    rows = {name: row for name, (row, _) in measured.items()}
    outputs = {name: out for name, (_, out) in measured.items()}
    report = {"original": rows["original"], "optimized": rows["optimized"]}
    o, n = rows["original"], rows["optimized"]
    report["size_ratio"] = round(n["size_mb"] / o["size_mb"], 3)
    for key in ("tok_per_s_b1", "tok_per_s_b32"):
        speedup = n[key] / o[key] if n.get(key) and o.get(key) else None
        report[f"speedup_{key.removeprefix('tok_per_s_')}"] = speedup and round(speedup, 3)
    if o["perplexity"] and n["perplexity"]:
        report["perplexity_increase"] = round(n["perplexity"] / o["perplexity"] - 1, 4)
        same = total = 0
        for a, b in zip(outputs["original"], outputs["optimized"], strict=True):
            same += sum(x == y for x, y in zip(a, b, strict=False))
            total += len(a)
        report["greedy_agreement"] = round(same / max(total, 1), 4)
        report["passed"] = report["perplexity_increase"] <= cfg.max_perplexity_increase
    else:
        report["perplexity_increase"], report["greedy_agreement"] = None, None
        report["passed"] = True  # nothing to compare against (no val split)
    return report


def val_blocks(data_dir: str, limit: int) -> torch.Tensor | None:
    """Up to ``limit`` blocks of the data stage's val split, as a [N, seq_len] tensor."""
    import numpy as np
    import pyarrow.parquet as pq

    from aigc_ray.data import read_manifest
    from aigc_ray.storage import filesystem_for

    manifest = read_manifest(data_dir)
    rows = []
    for shard in manifest["splits"]["val"]["shards"]:
        filesystem, path = filesystem_for(shard)
        table = pq.read_table(path, filesystem=filesystem, columns=["input_ids"])
        rows += table.column("input_ids").to_pylist()[: limit - len(rows)]
        if len(rows) >= limit:
            break
    return torch.tensor(np.array(rows, dtype=np.int64)) if rows else None


def held_prompts(blocks: torch.Tensor, n: int, length: int = 24) -> list[list[int]]:
    """Prompts for greedy agreement: the first tokens of the last ``n`` val blocks."""
    return [b[:length].tolist() for b in blocks[-n:]]


def measure_dirs(
    paths: dict[str, str], blocks, prompts, agreement_tokens: int, benchmark: bool = True
) -> dict[str, tuple[dict, list]]:
    """Each directory through the built-in engine in a fresh process: {name: (its figures, its
    greedy outputs)}. With ``benchmark``, a process per directory (an engine started after
    another in the same process runs on throttled OpenMP workers: its speed would depend on the
    order); without, one process measures them all (perplexity and greedy outputs do not
    depend on the order), a process start less per directory."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    if not benchmark:
        with ctx.Pool(1) as pool:
            return pool.apply(_measure_dirs, (paths, blocks, prompts, agreement_tokens))
    out = {}
    for name, path in paths.items():
        with ctx.Pool(1) as pool:
            out[name] = pool.apply(_measure_dir, (path, blocks, prompts, agreement_tokens, True))
    return out


def _measure_dirs(paths: dict[str, str], blocks, prompts, agreement_tokens: int) -> dict:
    return {
        name: _measure_dir(path, blocks, prompts, agreement_tokens, False)
        for name, path in paths.items()
    }


def _measure_dir(
    path: str, blocks, prompts, agreement_tokens: int, benchmark: bool
) -> tuple[dict, list]:
    from aigc_ray.engine import GenerationEngine, SamplingParams
    from aigc_ray.model import perplexity

    size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    engine = GenerationEngine.from_pretrained(path, device="cpu", own_cores=True)
    try:
        # Speed first: torch ops on this thread (counting, scoring) would make it an OpenMP
        # user before the engine thread is done measuring.
        row = {"tok_per_s_b1": None, "tok_per_s_b32": None}
        if benchmark:
            row = {
                "tok_per_s_b1": round(_throughput(engine, 1), 1),
                "tok_per_s_b32": round(_throughput(engine, 32), 1),
            }
        outputs = []
        if prompts:
            greedy = SamplingParams(max_tokens=agreement_tokens, temperature=0, ignore_eos=True)
            outputs = [r.token_ids for r in engine.generate_ids(prompts, greedy)]
        weights = [
            p
            for n, p in engine.model.named_parameters()
            if not n.endswith(("weight_scale", "weight_zero_point"))
        ]
        row.update(
            size_mb=round(size / 1e6, 2),
            params=sum(p.numel() for p in weights),
            nonzero_params=sum(int((p != 0).sum()) for p in weights),
            engine_path=engine.path,
            perplexity=None,
            dtype=str(next(engine.model.parameters()).dtype),
        )
        if blocks is not None:
            row["perplexity"] = round(perplexity(engine.nll(blocks)), 3)
    finally:
        engine.close()
    return row, outputs


def _throughput(engine, batch: int, tokens: int = 64) -> float:
    from aigc_ray.engine import SamplingParams

    ids = [[(7 * i + j) % 200 + 10 for j in range(32)] for i in range(batch)]
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    engine.generate_ids(ids, params)  # warm-up: oneDNN builds its kernels per shape
    times = []
    for _ in range(3):  # the median of three: single runs drift on a shared machine
        started = time.perf_counter()
        engine.generate_ids(ids, params)
        times.append(time.perf_counter() - started)
    return batch * tokens / sorted(times)[1]


def format_report(report: dict) -> str:
    o, n = report["original"], report["optimized"]

    def fmt(v):
        return "n/a" if v is None else f"{v:,}" if isinstance(v, int) else f"{v}"

    rows = [
        ("size on disk (MB)", "size_mb"),
        ("parameters", "params"),
        ("non-zero parameters", "nonzero_params"),
        ("validation perplexity", "perplexity"),
        ("engine tok/s, batch 1", "tok_per_s_b1"),
        ("engine tok/s, batch 32", "tok_per_s_b32"),
    ]
    lines = [f"{'':<26}{'original':>14}{'optimized':>14}"]
    lines += [f"{label:<26}{fmt(o[key]):>14}{fmt(n[key]):>14}" for label, key in rows]
    agreement = report.get("greedy_agreement")
    lines.append(f"steps: {'; '.join(report['steps'])}")
    lines.append(
        f"size x{report['size_ratio']}, speed x{fmt(report['speedup_b1'])} (batch 1) / "
        f"x{fmt(report['speedup_b32'])} (batch 32), perplexity "
        f"{_pct(report['perplexity_increase'])}, greedy agreement "
        f"{'n/a' if agreement is None else f'{agreement:.1%}'}"
    )
    return "\n".join(lines)


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:+.2%}"
