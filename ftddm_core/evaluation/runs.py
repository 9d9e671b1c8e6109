"""Running one method: the loaded models, one resolved spec on one scale's maps, and the cache of its outputs."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from .. import __version__, baselines
from ..atomic import atomic_write
from ..device import autocast, choose_precision, generator as make_generator
from ..model import DEFAULT_MODEL, FTDDM, file_sha256
from ..sampling import flow_mode_x0
from ..nnutil import count_parameters
from .maps import ScaleData, cut_tile, load_test_maps
from .methods import MODEL_ROLES, RunSpec, nfe_of
from .options import EvaluateOptions

CACHE_VERSION = 1


@dataclass
class LoadedModel:
    """A model file loaded for one role (main, ddpm, regression), with its sha256 and training record."""

    role: str
    path: Path
    sha256: str
    model: Any
    training: dict  # the model file's recorded training metadata (data split …), {} if none

    @property
    def t_trunc(self) -> int:
        return int(self.model.config.diffusion.t_trunc)

    @property
    def last_index(self) -> int:
        return int(self.model.config.diffusion.num_timesteps) - 1

    def parameters(self, part: str) -> int:
        """Parameters of one network ("encoder", "unet", "flow"); 0 for one the model lacks (a regression model)."""
        network = getattr(self.model, part)
        return 0 if network is None else count_parameters(network)


def training_metadata(path: Path) -> dict:
    """The training record of a model file: `ftddm train`'s metadata, or a packaged model card's; {} if none."""
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
    try:
        if "training" in meta:  # a file written by `ftddm train`
            return json.loads(meta["training"]) or {}
        # a packaged model (scripts/package_default_model.py) keeps it in its model card
        training = dict(json.loads(meta.get("model_card", "{}")).get("training") or {})
    except (json.JSONDecodeError, AttributeError):
        return {}
    if "iterations" in training:
        training.setdefault("step", training["iterations"])
    return training


def validation_maps(model_path: Path, data_dir: Path, factors, max_maps: int) -> tuple[list[str], dict]:
    """(validation patient ids, ScaleData per factor) of the validation patients a model file records: the
    tiles the evaluation takes of test patients, for choices that must never look at the test maps."""
    validation = training_metadata(model_path).get("data", {}).get("validation")
    if not validation:
        raise ValueError(f"{model_path}: its training record names no validation patients (a model from "
                         "`ftddm train` or a packaged model card has them)")
    size = FTDDM.load(model_path).config.unet.image_size
    return validation, load_test_maps(Path(data_dir), validation, factors, max_maps, size)


def load_models(model_path, ddpm_path, regression_path, device) -> dict[str, LoadedModel]:
    """Load the FTDDM model and, when given, the full-range DDPM and regression models; check their kinds."""
    paths = {"main": Path(model_path) if model_path else DEFAULT_MODEL, "ddpm": ddpm_path,
             "regression": regression_path}
    loaded = {}
    for role, path in paths.items():
        if path is None:
            continue
        path = Path(path)
        if not path.is_file():
            hint = " (the shipped default model is not installed; pass --model PATH)" if path == DEFAULT_MODEL else ""
            raise FileNotFoundError(f"{MODEL_ROLES[role]} {path}: model file not found{hint}")
        model = FTDDM.load(path, device=device)
        want = "regression" if role == "regression" else "ftddm"
        if model.config.kind != want:
            raise ValueError(f"{MODEL_ROLES[role]} {path}: a '{model.config.kind}' model; expected kind '{want}'"
                             + (" (pass a regression model as --regression-model)" if role == "main" else ""))
        loaded[role] = LoadedModel(role, path, file_sha256(path), model, training_metadata(path))
    return loaded



@torch.no_grad()
def flow_estimate(model, cond: torch.Tensor, scale, max_batch: int | None = None) -> torch.Tensor:
    """The flow start as an estimate: x̂0 = mode of p(x_Ttrunc | y) / √ᾱ_Ttrunc, clamped and masked.

    Not the paper's Ttrunc = 0 ablation (a flow trained on x0): it shows what the chain's start carries.
    """
    device = getattr(model, "device", cond.device)
    step = max_batch or len(cond)
    outs = []
    for i in range(0, len(cond), step):
        c = cond[i:i + step].to(device)
        s = torch.as_tensor(scale, dtype=c.dtype, device=device)
        s = s.expand(len(cond)) if s.ndim == 0 else s
        x0_enc, features = model.encode(c, s[i:i + step])
        outs.append(flow_mode_x0(model, c, x0_enc, features).to(cond.device))
    return torch.cat(outs)


def baseline_maps(fn, data: ScaleData) -> np.ndarray:
    """A baseline (zero-filling, bicubic) of each map's measured LR onto its full slice, / norm, cut to its tile."""
    norm = data.norm[:, None, None].astype(np.float32)
    if not data.tiled:
        return fn(data.lr, data.gt.shape[-1]) / norm
    tile = data.gt.shape[-1]
    return np.stack([cut_tile(fn(lr, shape), origin, tile) for lr, shape, origin
                     in zip(data.lr, data.slice_shapes, data.tile_origins)]) / norm


def execute(spec: RunSpec, data: ScaleData, models: dict[str, LoadedModel], opts: EvaluateOptions,
            device: torch.device, callback=None) -> dict[str, Any]:
    """Run one resolved spec on one scale's maps: outputs (N, H, W) mean and std, cost counters, seconds."""
    started = time.perf_counter()
    n = len(data.ids)
    mask = data.mask.astype(np.float32)
    std = np.zeros_like(data.gt)
    samples = 1
    if spec.kind in ("zero_filled", "bicubic"):
        fn = baselines.zero_filled if spec.kind == "zero_filled" else baselines.bicubic
        mean = baseline_maps(fn, data) * mask
    else:
        model = models[spec.model].model
        scale = (torch.full((n,), float(spec.cond_scale)) if spec.cond_scale else
                 torch.as_tensor(data.cond_scale, dtype=torch.float32))
        # tiles: the factor actually applied, √((n1/m1)(n2/m2)), may pass the trained range's ends by the
        # rounding of m_a, as in training (run_evaluation checked the requested factors)
        force = data.tiled
        with autocast(device, choose_precision(device, "bf16" if opts.bf16 else "fp32").bf16):
            if spec.kind == "flow":
                res = None
                mean = flow_estimate(model, data.cond, scale, opts.max_batch).float().numpy()[:, 0]
            elif spec.kind == "regression":
                res = model.sample(data.cond, scale, sampler="regression", max_batch=opts.max_batch,
                                   force_scale=force)
            else:
                res = model.sample(data.cond, scale, sampler=spec.sampler, start=spec.start, t_trunc=spec.t_start,
                                   steps=max(spec.steps, 1), tau_d=spec.tau_d, tau_f=opts.tau_f,
                                   n_samples=opts.samples, generator=_chain_generator(spec, device, opts.seed),
                                   max_batch=opts.max_batch, callback=callback, force_scale=force)
        if res is not None:
            mean = res.mean.float().cpu().numpy()[:, 0]
            std = res.std.float().cpu().numpy()[:, 0]
            samples = opts.samples if spec.kind == "chain" else 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    nfe, flow_passes = nfe_of(spec)
    return {"mean": np.asarray(mean, dtype=np.float32), "std": np.asarray(std, dtype=np.float32), "nfe": nfe,
            "flow_passes": flow_passes, "samples": samples, "seconds": time.perf_counter() - started,
            "device": str(device), "max_batch": opts.max_batch}


def _chain_generator(spec: RunSpec, device: torch.device, seed: int) -> torch.Generator:
    """The generator the chains' seeds come from: on the device, but on the CPU for re-noised starts, whose
    runs always drew their seeds there (so their outputs, cached per device type, stay the same on CUDA)."""
    return torch.Generator().manual_seed(seed) if spec.start == "renoised" else make_generator(device, seed)


def cache_key(spec: RunSpec, data: ScaleData, models: dict[str, LoadedModel], opts: EvaluateOptions,
              context: dict, device: torch.device) -> str:
    """SHA-256 of everything that determines a run's outputs (never its name, label or batch size)."""
    key = {"version": CACHE_VERSION, "ftddm": __version__, "spec": spec.identity(), "scale": data.scale, "lr_size": data.lr_size,
           "maps": hashlib.sha256(json.dumps(data.ids).encode()).hexdigest(), **context}
    if data.tiled:  # the tiles: their size, origins and LR matrices
        key["tiles"] = hashlib.sha256(json.dumps([data.gt.shape[-1], data.tile_origins, data.lr_shapes]).encode()
                                      ).hexdigest()
    if spec.model != "none":
        key.update(model_sha256=models[spec.model].sha256, device=device.type, bf16=opts.bf16)
    if spec.stochastic:
        key.update(samples=opts.samples, seed=opts.seed)
        if spec.start == "flow":
            key["tau_f"] = opts.tau_f
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def cache_path(cache_dir: Path, spec: RunSpec, scale: float, key: str) -> Path:
    return cache_dir / f"{spec.kind}_s{scale:g}_{key[:20]}.npz"


def read_cache(path: Path, key: str) -> dict | None:
    """A cached run, or None when absent, unreadable or made for another key."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            if meta.get("key") != key:
                return None
            return {**meta, "mean": f["mean"], "std": f["std"], "cached": True}
    except (OSError, ValueError, KeyError):
        return None


def write_cache(path: Path, key: str, result: dict) -> None:
    """Atomically write a run (outputs as float32 arrays, counters as a JSON string) to its npz file."""
    meta = {k: v for k, v in result.items() if k not in ("mean", "std", "cached")}
    meta["key"] = key

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, mean=result["mean"], std=result["std"], meta=np.array(json.dumps(meta)))

    atomic_write(path, write)


@dataclass
class Job:
    """One (resolved spec, scale) run, identified by its cache key."""

    spec: RunSpec
    scale: float
    key: str = ""




def lpips_scorer(device: torch.device):
    """(score(gt, out) → float, note) when the `lpips` package and its AlexNet weights are present, else (None, why)."""
    try:
        import lpips  # optional dependency, never installed by ftddm
    except ImportError:
        return None, ("LPIPS skipped: the `lpips` package is not installed (it also needs the torchvision AlexNet "
                      "weights in the torch hub cache; nothing is downloaded by `ftddm evaluate`).")
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if not any(hub.glob("alexnet-*.pth")):
        return None, (f"LPIPS skipped: `lpips` is installed but the AlexNet backbone weights are not in {hub}; "
                      "nothing is downloaded by `ftddm evaluate`.")
    net = lpips.LPIPS(net="alex", verbose=False).to(device).eval()

    def score(gt: np.ndarray, out: np.ndarray) -> float:
        lo, rng = float(gt.min()), float(gt.max() - gt.min()) or 1.0
        def to_rgb(a):  # [−1, 1] by the ground truth's range, grey → 3 channels
            x = torch.as_tensor((a - lo) / rng * 2 - 1, dtype=torch.float32, device=device)
            return x[None, None].repeat(1, 3, 1, 1)

        with torch.no_grad():
            return float(net(to_rgb(gt), to_rgb(out)).item())

    return score, "LPIPS (AlexNet, lpips package) on maps scaled to [−1, 1] by the ground truth's range, grey → RGB."


