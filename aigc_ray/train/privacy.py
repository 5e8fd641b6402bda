"""Differentially private training (DP-SGD) with Opacus, on the training ranks (no Ray here).

What Opacus does and what this module only arranges:
- per-sample gradients: Opacus' GradSampleModule (its own grad samplers for Linear and
  Embedding, torch.func for the rest, e.g. LlamaRMSNorm);
- clipping each row's gradient to ``max_grad_norm`` and adding Gaussian noise once per step:
  Opacus' DPOptimizer, or DistributedDPOptimizer across ranks (noise drawn on rank 0 only,
  clipped sums all-reduced);
- the privacy spent: Opacus' accountant (RDP or PRV), stepped once per optimizer step with
  the noise multiplier and the sample rate, its state kept in every checkpoint.

Sampling. The accountants assume Poisson sampling: every training row is in a step's batch
with probability q, independently of the other rows and of the other steps. PoissonFeed draws
exactly that: at step s every rank draws the same Bernoulli(q) mask over all N rows from a
generator seeded by (train.seed, s), and takes the chosen rows at positions p % world == rank.
q = batch_size x grad_accum x num_workers / N, so a step holds that many rows on average. The
draw depends on the seed and the step alone: a resumed (or resized) run draws, for each step it
has not committed, the rows an uninterrupted run would have drawn.
"""

from __future__ import annotations

import logging
import warnings
import zlib
from dataclasses import asdict, dataclass

import numpy as np
import torch

from aigc_ray.config import ModelConfig, TrainConfig
from aigc_ray.train.steps import TrainError

log = logging.getLogger(__name__)

SAMPLE_STREAM = 0x0D9  # mixed into each step's seed: DP's draws never equal the epoch order's


@dataclass
class DPPlan:
    """The mechanism of a run: fixed when it starts, kept in its checkpoints."""

    noise_multiplier: float
    sample_rate: float
    delta: float
    max_grad_norm: float
    accountant: str
    target_epsilon: float | None
    rows: int

    def as_dict(self) -> dict:
        return asdict(self)


def sample_rate(cfg: TrainConfig, rows: int) -> float:
    """q: the expected rows per step (batch_size x grad_accum x num_workers) over all rows."""
    return min(1.0, cfg.batch_size * cfg.grad_accum * cfg.num_workers / rows)


def plan(cfg: TrainConfig, rows: int) -> DPPlan:
    """The noise multiplier, sample rate and delta of a run over `rows` training rows: the
    noise is train.privacy.noise_multiplier, or the least (Opacus' search) with which
    train.max_steps steps spend at most train.privacy.target_epsilon."""
    from opacus.accountants.utils import get_noise_multiplier

    p = cfg.privacy
    q = sample_rate(cfg, rows)
    delta = p.delta if p.delta is not None else 1.0 / rows
    sigma = p.noise_multiplier
    if sigma is None:
        try:
            sigma = get_noise_multiplier(
                target_epsilon=p.target_epsilon,
                target_delta=delta,
                sample_rate=q,
                steps=cfg.max_steps,
                accountant=p.accountant,
                epsilon_tolerance=min(0.01, p.target_epsilon / 100),
            )
        except ValueError as e:
            raise TrainError(
                f"train.privacy.target_epsilon={p.target_epsilon} cannot be met in "
                f"train.max_steps={cfg.max_steps} steps at sample rate {q:.4g} ({e})"
            ) from None
    return DPPlan(float(sigma), q, delta, p.max_grad_norm, p.accountant, p.target_epsilon, rows)


class Ledger:
    """Opacus' accountant for a DPPlan, with its state in and out of checkpoints.

    Epsilon is asked for after every step: the RDP accountant's answer is computed from the
    Renyi divergence of one step (Opacus' compute_rdp, linear in the steps) times the steps,
    then Opacus' get_privacy_spent, which is what RDPAccountant.get_epsilon computes, without
    re-deriving the one-step divergence at every step (30 ms each here)."""

    def __init__(self, dp: DPPlan, state: dict | None = None):
        from opacus.accountants import create_accountant

        self.dp = dp
        self.accountant = create_accountant(mechanism=dp.accountant)
        if state:
            self.accountant.load_state_dict(state)
        self._one_step: dict = {}  # (noise, sample rate) -> RDP of one step, per order
        self._memo: dict = {}

    def step(self) -> None:
        self.accountant.step(
            noise_multiplier=self.dp.noise_multiplier, sample_rate=self.dp.sample_rate
        )

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.accountant.history)

    def epsilon(self) -> float:
        return self._epsilon(tuple(self.accountant.history))

    def epsilon_after_next(self) -> float:
        """The epsilon one more step would bring the run to."""
        history = list(self.accountant.history)
        sigma, q = self.dp.noise_multiplier, self.dp.sample_rate
        if history and history[-1][:2] == (sigma, q):
            history[-1] = (sigma, q, history[-1][2] + 1)
        else:
            history.append((sigma, q, 1))
        return self._epsilon(tuple(history))

    def _epsilon(self, history: tuple) -> float:
        if not history:
            return 0.0
        if history not in self._memo:
            self._memo = {history: self._compute(history), **dict(list(self._memo.items())[-2:])}
        return self._memo[history]

    def _compute(self, history: tuple) -> float:
        if self.dp.accountant != "rdp":
            from opacus.accountants import create_accountant

            other = create_accountant(mechanism=self.dp.accountant)
            other.history = list(history)
            return float(other.get_epsilon(delta=self.dp.delta))
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis import rdp as analysis

        orders = RDPAccountant.DEFAULT_ALPHAS
        total = 0.0
        for sigma, q, n in history:
            if (sigma, q) not in self._one_step:
                self._one_step[sigma, q] = analysis.compute_rdp(
                    q=q, noise_multiplier=sigma, steps=1, orders=orders
                )
            total = total + self._one_step[sigma, q] * n
        with warnings.catch_warnings():  # "optimal order is the largest alpha": still valid
            warnings.simplefilter("ignore", UserWarning)
            eps, _ = analysis.get_privacy_spent(orders=orders, rdp=total, delta=self.dp.delta)
        return float(eps)

    def state_dict(self) -> dict:
        return self.accountant.state_dict()


# ---------------------------------------------------------------- what Opacus cannot run


def check_settings(cfg: TrainConfig) -> None:
    """Settings DP-SGD does not run with here, refused before any worker starts."""
    if cfg.strategy == "fsdp":
        raise TrainError(
            "train.privacy with train.strategy=fsdp is not supported: DP-SGD runs on DDP "
            "(Opacus' DistributedDPOptimizer); use train.strategy: ddp (with model.lora_r for "
            "models too large for per-sample gradients)"
        )
    if cfg.use_gpu and cfg.precision == "fp16":
        raise TrainError(
            "train.privacy with train.precision=fp16 is not supported: fp16's loss scaling "
            "would scale each row's gradient before Opacus clips it; use bf16 or fp32"
        )


def check_model(model: torch.nn.Module) -> None:
    """Layers Opacus cannot compute per-sample gradients for, or that mix the rows of a batch
    (e.g. BatchNorm), as Opacus' ModuleValidator finds them, named by module path."""
    from opacus.validators import ModuleValidator

    found = []
    for name, sub in model.named_modules():
        validator = ModuleValidator.VALIDATORS.get(type(sub))
        for error in validator(sub) if validator else []:
            reason = str(error).strip().split(". ")[0]
            found.append(f"{name or '(root)'} ({type(sub).__name__}): {reason}")
    if found:
        raise TrainError(
            "train.privacy: Opacus' DP-SGD does not support these layers of the model: "
            + "; ".join(found[:5])
            + ("; ..." if len(found) > 5 else "")
        )


def check_model_config(model_cfg: ModelConfig) -> None:
    """check_model on the model a run would build, built on the meta device (no weights).
    A pretrained model in object storage is checked by the workers instead (same check, before
    their first step)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from aigc_ray.model import llama_config
    from aigc_ray.storage import is_uri

    if model_cfg.pretrained and is_uri(model_cfg.pretrained):
        return
    if model_cfg.pretrained:
        conf = AutoConfig.from_pretrained(model_cfg.pretrained)
    else:
        conf = llama_config(model_cfg, vocab_size=64, eos_id=0, pad_id=1)
    with torch.device("meta"):
        check_model(AutoModelForCausalLM.from_config(conf))


# ---------------------------------------------------------------- the private model and step


def make_private(model: torch.nn.Module, opt: torch.optim.Optimizer, dp: DPPlan, world: int):
    """(module, optimizer): `model` wrapped for per-sample gradients (and DPDDP across ranks:
    parameters broadcast from rank 0, gradients reduced by the optimizer after clipping and
    noise, never during backward), `opt` wrapped to clip, noise and scale."""
    from opacus import GradSampleModule
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
    from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

    check_model(model)
    wrapped = DPDDP(model) if world > 1 else model
    module = GradSampleModule(wrapped, loss_reduction="mean")
    expected = dp.sample_rate * dp.rows / world  # rows per rank per step, on average
    kind = DistributedDPOptimizer if world > 1 else DPOptimizer
    optimizer = kind(
        opt,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=expected,
        loss_reduction="mean",
    )
    return module, optimizer


def per_row_loss(model, ids: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Mean over the batch of each row's mean next-token loss (-100 labels ignored): with
    loss_reduction="mean", Opacus' per-sample gradient of a row is then the gradient of that
    row's own loss, whatever the other rows hold."""
    labels = ids if labels is None else labels
    logits = model(input_ids=ids).logits.float()
    # shift the labels, not the logits (as transformers' own loss does): no copy of the logits
    target = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    tok = torch.nn.functional.cross_entropy(
        logits.view(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
    ).view(target.shape)
    valid = (target != -100).float()
    return ((tok * valid).sum(1) / valid.sum(1).clamp(min=1)).mean()


def dp_step(model, micro_batches: list, opt, sched) -> tuple[float, int, float]:
    """One DP-SGD step over this rank's rows of the step's Poisson batch, in micro-batches of
    at most batch_size rows (Opacus accumulates their clipped per-sample gradients; noise is
    added once, at the last). Returns (sum of the rows' losses, rows, norm of the noised
    gradient).
    A rank that drew no rows contributes an empty sum: it still joins the reduction."""
    model.train()
    total, rows = 0.0, 0
    if not micro_batches:
        for p in opt.params:
            p.grad_sample = p.new_zeros((0, *p.shape))
    for i, (ids, labels) in enumerate(micro_batches):
        loss = per_row_loss(model, ids, labels)
        with warnings.catch_warnings():  # the embedding's hook (its input is token ids)
            warnings.filterwarnings("ignore", "Full backward hook is firing")
            loss.backward()
        total += loss.item() * len(ids)
        rows += len(ids)
        if i < len(micro_batches) - 1:  # clip and add to the sum; no noise, no update yet
            opt.signal_skip_step(do_skip=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
    opt.step()
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in opt.params if p.grad is not None])
    )
    sched.step()
    opt.zero_grad(set_to_none=True)
    return total, rows, float(norm)


def plain(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside GradSampleModule / DPDDP / DDP wrappers."""
    from opacus import GradSampleModule

    while True:
        if isinstance(module, GradSampleModule):
            module = module._module
        elif type(module).__name__ in (
            "DifferentiallyPrivateDistributedDataParallel",
            "DistributedDataParallel",
        ):
            module = module.module
        else:
            return module


# ---------------------------------------------------------------- Poisson sampling


class PoissonFeed:
    """Each step's Poisson batch (see the module doc), for one rank.

    The rank holds its rows (positions p % world == rank, corpus order) in memory: a Poisson
    batch can draw any row, so rows are looked up, not streamed."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, rows: int, source, q: float):
        """`source(0)` yields the split's rows in corpus order (a ShardReader with window 0)."""
        self.cfg, self.rank, self.world, self.rows, self.q = cfg, rank, world, rows, q
        ids, labels, pos, head = [], [], 0, b""
        for batch in source(0):
            n = len(batch["input_ids"])
            if not head and n:  # the first rows of the split: the same on every rank
                head = np.concatenate([np.asarray(r, np.int64) for r in batch["input_ids"][:16]])
                head = head.tobytes()
            first = (rank - pos) % world
            ids.append(batch["input_ids"][first::world])
            if "labels" in batch:
                labels.append(batch["labels"][first::world])
            pos += n
        if pos != rows:
            raise TrainError(f"the train shards hold {pos} rows, their manifest says {rows}")
        self.ids = np.concatenate(ids)
        self.seq_len = int(self.ids.shape[1])
        self.labels = np.concatenate(labels) if labels else None
        self.probe = [int(zlib.crc32(np.int64(pos).tobytes() + head))]

    def chosen(self, step: int) -> np.ndarray:
        """Global positions in step `step`'s batch (the same on every rank)."""
        rng = np.random.default_rng([self.cfg.seed, SAMPLE_STREAM, step])
        return np.flatnonzero(rng.random(self.rows) < self.q)

    def step(self, step: int) -> tuple[np.ndarray, list]:
        """(this rank's positions, its micro-batches [(input_ids, labels|None)]) of `step`."""
        everyone = self.chosen(step)
        mine = everyone[everyone % self.world == self.rank]
        local = mine // self.world
        micro, b = [], self.cfg.batch_size
        for i in range(0, len(local), b):
            part = local[i : i + b]
            ids = torch.from_numpy(self.ids[part].astype(np.int64))
            lab = None
            if self.labels is not None:
                lab = torch.from_numpy(self.labels[part].astype(np.int64))
            micro.append((ids, lab))
        return mine, micro


def model_card_section(privacy: dict) -> str:
    """The privacy paragraph of the exported model's card (README.md)."""
    stop = f"\n- Stopped early: {privacy['stopped']}" if privacy.get("stopped") else ""
    return (
        "## Differential privacy\n\n"
        f"Trained with DP-SGD (Opacus): ({privacy['epsilon']:.4g}, {privacy['delta']:.3g})-"
        f"differentially private with respect to the rows of the training set.\n\n"
        f"- Accountant: {privacy['accountant']}\n"
        f"- Noise multiplier: {privacy['noise_multiplier']:.6g}\n"
        f"- Sample rate (Poisson): {privacy['sample_rate']:.6g} of {privacy['rows']} rows\n"
        f"- Steps: {privacy['steps']}\n"
        f"- Per-row gradient clipped to: {privacy['max_grad_norm']}\n"
        f"- Target epsilon: {privacy.get('target_epsilon')}{stop}\n"
    )
