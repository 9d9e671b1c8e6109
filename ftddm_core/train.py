"""Training loop for FTDDM v2: SR encoder (L1), diffusion (truncated ε-MSE) and flow (NLL + guide), resumable,
DDP-ready.

One straight loop in commented phases (learning rate, forward/backward, EMA, log, validate + checkpoint),
as an importable function so a test can run a few CPU steps. The three networks train on the same batches
with their own optimisers; the flow and the ε-UNet are conditioned on the encoder's *detached* output, so the
encoder learns from its L1 alone (SRFlow's recipe with a jointly trained, not frozen, encoder). Launch
several processes with `torchrun` for DDP.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .atomic import atomic_savefig, atomic_write_text
from .checkpoint import json_metadata, read_safetensors, write_safetensors
from .config import FTDDMConfig
from .device import autocast, resolve_device
from .losses import diffusion_loss, encoder_loss, flow_loss
from .model import FTDDM, load_state
from .options import option

#: What a run trains: everything, or one network with the others' weights frozen (e.g. fine-tuning).
STAGES = ("all", "encoder", "diffusion", "flow")
NETWORKS = ("encoder", "unet", "flow")


@dataclass
class TrainOptions:
    """Optimisation settings (paper: Adam 1e-4 with linear decay, batch 8, EMA). Every network uses Adam with the
    usual β = (0.9, 0.999), a linear warm-up and then linear decay to 0 over `iterations`."""

    iterations: int = option(
        20000, "optimiser steps, one batch each, ≥ 1: the learning rate decays linearly to 0 at the last one "
        "(the shipped model: 4000, 56 min on 2 CPU cores)")
    batch_size: int = option(8, "64×64 training tiles per step, ≥ 1 (paper: 8); memory grows linearly with it")
    lr: float = option(1e-4, "Adam learning rate of the ε-UNet and the SR encoder (paper: 1e-4; the shipped "
                             "model: 2e-4); lower it when the loss curve jumps")
    flow_lr: float = option(1e-4, "Adam learning rate of the flow")
    warmup: int = option(200, "iterations of linear learning-rate warm-up from 0, before the linear decay")
    ema_decay: float = option(
        0.999, "decay of the weights' exponential moving average (what model.safetensors holds), in [0, 1): "
        "paper 0.9999 over 100k iterations; shorter runs need a shorter memory (0.999 ≈ the last 1000 steps)")
    guide_weight: float = option(10.0, "λ, weight of the flow's guide loss (its mode against √ᾱ·x0) next to its "
                                       "NLL, ≥ 0; 0 = NLL only (paper: 10)")
    guide_alpha: float = option(0.84, "α in [0, 1] of the guide loss (1−α)·L1 + α·(1 − MS-SSIM) (paper: 0.84)")
    grad_clip: float = option(1.0, "largest gradient norm per network per step (> 0); larger steps are scaled down")
    stage: str = option("all", "networks to train, the others frozen: all, encoder, diffusion (the ε-UNet) or "
                               "flow (e.g. to retrain one network of an --init model)", choices=STAGES)
    val_every: int = option(500, "iterations between validation losses and checkpoints (best.safetensors keeps "
                                 "the best validation loss, last.safetensors the state for --resume)")
    val_batches: int = option(8, "batches per validation loss: more = a steadier value, slower")
    log_every: int = option(50, "iterations per log.csv row (means over the interval)")
    seed: int = option(0, "seed of the patient split (with --fold), the initial weights and the augmentation: "
                          "the same seed and data give the same run")
    bf16: bool = option(False, "bfloat16 autocast: faster on AVX-512 CPUs and bf16 GPUs (the shipped model was "
                               "trained in float32)")
    device: str = option("auto", "auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps")

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.iterations < 1 or self.batch_size < 1:
            raise ValueError("iterations and batch_size must be ≥ 1")


def trained_networks(model: FTDDM, stage: str) -> tuple[str, ...]:
    """Names of the networks a stage trains (a regression model has only its encoder)."""
    if model.config.kind == "regression":
        return ("encoder",)
    return {"all": NETWORKS, "encoder": ("encoder",), "diffusion": ("unet",), "flow": ("flow",)}[stage]


class TrainingStep(nn.Module):
    """The losses of one batch; a module so DistributedDataParallel can wrap it."""

    def __init__(self, model: FTDDM, opts: TrainOptions):
        super().__init__()
        self.model, self.opts = model, opts

    def forward(self, batch: dict[str, torch.Tensor], generator=None) -> dict[str, torch.Tensor]:
        m, o = self.model, self.opts
        t_trunc = m.config.diffusion.t_trunc
        x0, cond, scale = batch["x0"], batch["cond"], batch["scale"]
        trained = trained_networks(m, o.stage)
        out = {}
        total = torch.zeros((), device=x0.device)
        x0_enc, features = torch.zeros_like(x0), []
        if "encoder" in trained or "flow" in trained or ("unet" in trained and m.unet_sees_estimate):
            with torch.set_grad_enabled(torch.is_grad_enabled() and "encoder" in trained):
                out["encoder"], x0_enc, features = encoder_loss(m, x0, cond, scale)
            if "encoder" in trained:
                total = out["encoder"]
        # the flow and the ε-UNet learn on the encoder's current estimate, without moving it
        x0_enc, features = x0_enc.detach(), [f.detach() for f in features]
        if "unet" in trained:
            out["diffusion"] = diffusion_loss(m, m.schedule, x0, cond, scale, x0_enc, t_trunc, generator)
            total = total + out["diffusion"]
        if "flow" in trained:
            f_total, out["nll"], out["guide"] = flow_loss(m, m.schedule, x0, cond, x0_enc, features, t_trunc,
                                                          guide_weight=o.guide_weight, guide_alpha=o.guide_alpha,
                                                          generator=generator)
            out["flow"] = f_total
            total = total + f_total
        out["total"] = total
        return out


def lr_factor(step: int, iterations: int, warmup: int) -> float:
    """Linear warm-up over `warmup` iterations, then linear decay to 0 at `iterations`."""
    return min(1.0, (step + 1) / max(warmup, 1)) * (1.0 - step / iterations)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with warm-up, min(d, (1 + step)/(10 + step)): early averages do not keep the random init."""
    return min(decay, (1.0 + step) / (10.0 + step))


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _optimizer_tensors(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Flatten an optimiser state into safetensors-compatible tensors plus JSON for the rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(prefix: str, opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class RunDirectory:
    """Files of one training run: checkpoints, logs and the loss curve."""

    def __init__(self, out: str | Path):
        self.root = Path(out)
        self.last = self.root / "last.safetensors"  # full training state, for --resume
        self.best = self.root / "best.safetensors"  # EMA model with the lowest validation loss
        self.final = self.root / "model.safetensors"  # EMA model at the end of training
        self.log_csv = self.root / "log.csv"
        self.run_json = self.root / "run.json"
        self.curve = self.root / "loss.png"

    def prepare(self, *, resume: bool, force: bool) -> None:
        """Refuse to overwrite an earlier run unless resuming or forced."""
        existing = [p for p in (self.last, self.best, self.final, self.log_csv) if p.exists()]
        if existing and not (resume or force):
            raise FileExistsError(
                f"{self.root} already holds a training run ({existing[0].name}); pass --resume to continue it "
                "or --force to start over and overwrite it"
            )
        if resume and not self.last.exists():
            raise FileNotFoundError(f"--resume: no checkpoint {self.last} to continue from")
        if force and not resume:
            for p in existing:
                p.unlink()
        self.root.mkdir(parents=True, exist_ok=True)


TRAINING_STATE_FORMAT = "ftddm-training-state/2"


def save_training_state(path, model, ema, optimizers: dict[str, torch.optim.Optimizer], step, best_val, options,
                        *, data_info, generators: dict[str, torch.Generator]) -> None:
    """Everything needed to continue bit-for-bit: weights, EMA, optimisers, step, RNG states."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"rng.{k}": g.get_state() for k, g in generators.items()})
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt_meta = {}
    for name, opt in optimizers.items():
        t, opt_meta[name] = _optimizer_tensors(f"opt_{name}", opt)
        tensors.update(t)
    meta = json_metadata(config=model.config.to_dict(), step=step, best_val=best_val, options=asdict(options),
                         optimizers=opt_meta, data=data_info)
    meta["format"] = TRAINING_STATE_FORMAT
    write_safetensors(path, tensors, meta, overwrite=True)


def load_training_state(path, model, ema, optimizers: dict[str, torch.optim.Optimizer],
                        generators: dict[str, torch.Generator]):
    """Restore save_training_state's file into the given objects; returns (step, best validation loss)."""
    tensors, meta = read_safetensors(path)
    if meta.get("format") != TRAINING_STATE_FORMAT:
        raise ValueError(f"{path} is not an ftddm v2 training checkpoint")
    stored = FTDDMConfig.from_dict(json.loads(meta["config"]))
    if stored.to_dict() != model.config.to_dict():
        raise ValueError(f"{path} was trained with a different config ({stored.name}); cannot resume with "
                         f"config {model.config.name}")
    load_state(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, source=str(path))
    load_state(ema, {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, source=str(path))
    stored_opts = json.loads(meta["optimizers"])
    if set(stored_opts) != set(optimizers):
        raise ValueError(f"{path} holds optimisers for {sorted(stored_opts)}, this run trains {sorted(optimizers)}; "
                         "resume with the same --stage")
    for name, opt in optimizers.items():
        _restore_optimizer(f"opt_{name}", opt, tensors, stored_opts[name])
    for k, g in generators.items():
        if f"rng.{k}" in tensors:
            g.set_state(tensors[f"rng.{k}"])
    return int(json.loads(meta["step"])), float(json.loads(meta["best_val"]))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """θ_ema ← d·θ_ema + (1−d)·θ; buffers (actnorm statistics) are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def train(config: FTDDMConfig, source, out: str | Path, options: TrainOptions | None = None, *,
          val_source=None, resume: bool = False, force: bool = False,
          progress: Callable[[dict], None] | None = None, data_info: dict | None = None,
          init: FTDDM | None = None) -> dict:
    """Train an FTDDM bundle on batches from `source` (see data.BatchSource); returns a summary dict.

    Writes RUN/last.safetensors (resumable state), RUN/best.safetensors and RUN/model.safetensors (EMA models,
    loadable with ftddm_core.load_model), RUN/log.csv, RUN/run.json and RUN/loss.png.
    """
    opts = options or TrainOptions()
    rank, world = _distributed()
    device = resolve_device(opts.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    run = RunDirectory(out)
    if rank == 0:
        run.prepare(resume=resume, force=force)
    if world > 1:
        dist.barrier()

    torch.manual_seed(opts.seed)
    model = FTDDM(config).to(device)
    if init is not None:  # fine-tuning: start from an earlier model's weights (same architecture)
        load_state(model, init.state_dict(), source="the initial model")
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    trained = trained_networks(model, opts.stage)
    base_lr = {"encoder": opts.lr, "unet": opts.lr, "flow": opts.flow_lr}
    optimizers = {name: torch.optim.Adam(getattr(model, name).parameters(), lr=base_lr[name], betas=(0.9, 0.999))
                  for name in trained}
    gen = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(opts.seed * 1000 + rank)
    data_gen = torch.Generator().manual_seed(opts.seed * 1000 + 7 + rank)
    generators = {"noise": gen, "data": data_gen} if world == 1 else {}  # per-rank states are not gathered

    step, best_val = 0, math.inf
    if resume:
        step, best_val = load_training_state(run.last, model, ema, optimizers, generators)
    else:
        if "flow" in trained and init is None:
            # Actnorm's data-dependent initialisation on a first batch, before DDP syncs rank 0's weights.
            with torch.no_grad():
                b = _to(source.sample_batch(opts.batch_size, data_gen), device)
                x0_enc, features = model.encode(b["cond"], b["scale"])
                model.flow.train()
                model.flow_log_prob(_flow_init_target(model, b), b["cond"], x0_enc, features)
        ema.load_state_dict(model.state_dict())

    stepper: nn.Module = TrainingStep(model, opts)
    if world > 1:
        unused = set(trained) != set(NETWORKS) or config.kind == "regression"
        stepper = nn.parallel.DistributedDataParallel(stepper, find_unused_parameters=unused)

    log_rows = _read_log(run.log_csv) if resume else []
    t0, seen = time.time(), 0
    running, running_n = {}, 0
    model.train()
    while step < opts.iterations:
        # --- learning rates -------------------------------------------------------------------
        factor = lr_factor(step, opts.iterations, opts.warmup)
        for name, opt in optimizers.items():
            for g in opt.param_groups:
                g["lr"] = base_lr[name] * factor

        # --- forward / backward ---------------------------------------------------------------
        batch = _to(source.sample_batch(opts.batch_size, data_gen), device)
        with autocast(device, opts.bf16):
            losses = stepper(batch, gen)
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        if not torch.isfinite(losses["total"]):
            raise FloatingPointError(f"non-finite loss at step {step}: "
                                     f"{ {k: float(v) for k, v in losses.items()} }")
        losses["total"].backward()
        for name, opt in optimizers.items():
            torch.nn.utils.clip_grad_norm_(getattr(model, name).parameters(), opts.grad_clip)
            opt.step()
        ema_update(ema, model, ema_decay_at(step, opts.ema_decay))
        step += 1
        seen += 1

        # --- log (means over the logging interval; single-batch losses are too noisy to read) ----------
        current = {k: float(v.detach()) for k, v in losses.items()}
        for k, v in current.items():
            running[k] = running.get(k, 0.0) + v
        running_n += 1
        if progress and rank == 0:
            progress({"step": step, **current, "iterations": opts.iterations, "seconds": time.time() - t0})
        row = {"step": step}
        if step % opts.log_every == 0 or step == opts.iterations:
            row.update({k: v / running_n for k, v in running.items()})
            running, running_n = {}, 0
            row["seconds_per_iter"] = (time.time() - t0) / max(seen, 1)
            row["lr"] = next(iter(optimizers.values())).param_groups[0]["lr"]

        # --- validate + checkpoint ---------------------------------------------------------------
        if rank == 0 and (step % opts.val_every == 0 or step == opts.iterations):
            if val_source is not None:
                row["val"] = validate(ema, val_source, opts, device)
                if row["val"] < best_val:
                    best_val = row["val"]
                    ema.save(run.best, overwrite=True, extra={"training": {"step": step, "val_loss": best_val,
                                                                              "data": data_info or {}}})
            save_training_state(run.last, model, ema, optimizers, step, best_val, opts,
                                data_info=data_info or {}, generators=generators)
        if rank == 0 and ("seconds_per_iter" in row or "val" in row):
            log_rows.append(row)
            _write_log(run, log_rows, config, opts, data_info)
        if world > 1 and step % opts.val_every == 0:
            dist.barrier()

    if rank == 0:
        ema.save(run.final, overwrite=True, extra={"training": {"step": step, "best_val": best_val,
                                                                "data": data_info or {}}})
        _plot_curve(run, log_rows)
    if world > 1:
        dist.barrier()
    return {"step": step, "best_val": best_val, "run": str(run.root), "seconds": time.time() - t0}


@torch.no_grad()
def validate(model: FTDDM, source, opts: TrainOptions, device) -> float:
    """Mean validation loss of the EMA model on fixed batches (fixed seed, so runs are comparable)."""
    gen = torch.Generator().manual_seed(12345)
    noise_gen = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(54321)
    step = TrainingStep(model, opts)
    total = 0.0
    for _ in range(opts.val_batches):
        batch = _to(source.sample_batch(opts.batch_size, gen), device)
        total += float(step(batch, noise_gen)["total"])
    return total / opts.val_batches


def _flow_init_target(model: FTDDM, batch) -> torch.Tensor:
    from .losses import flow_target

    return flow_target(model.schedule, batch["x0"], model.config.diffusion.t_trunc)


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [{k: (int(float(v)) if k == "step" else float(v)) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(fh)]


def _write_log(run: RunDirectory, rows: list[dict], config, opts, data_info) -> None:
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "step", k))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(run.log_csv, buf.getvalue())
    info = {"config": config.to_dict(), "options": asdict(opts), "data": data_info or {}, "log": rows[-1]}
    atomic_write_text(run.run_json, json.dumps(info, indent=2))


def _plot_curve(run: RunDirectory, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [[k for k in keys if any(k in r for r in rows)]
              for keys in (("encoder",), ("diffusion",), ("flow", "nll", "guide"))]
    groups = [g for g in groups if g]  # one panel per trained stage (a diffusion-only run has no flow losses)
    if not groups:
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.2), squeeze=False)
    for ax, keys in zip(axes[0], groups):
        for k in keys:
            ax.plot(*zip(*[(r["step"], r[k]) for r in rows if k in r]), label=f"{k} (train)")
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.legend(loc="upper right")
    vals = [(r["step"], r["val"]) for r in rows if "val" in r]
    if vals:  # the EMA model's validation total, on its own axis (different magnitude early on)
        twin = axes[0][0].twinx()
        twin.plot(*zip(*vals), "k--", label="validation total (EMA)")
        twin.legend(loc="center right")
    fig.tight_layout()
    atomic_savefig(fig, run.curve, dpi=100)
