"""The FTDDM bundle: ε-UNet + conditional flow + cosine schedule + config, saved as one safetensors file."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from .checkpoint import json_metadata, read_safetensors, write_safetensors
from .config import KINDS, FTDDMConfig, preset
from .flow import ConditionalFlow
from .schedule import DiffusionSchedule
from .unet import UNet

FORMAT = "ftddm-model/1"
#: The shipped default model (compact config trained on synthetic patients), see its model card.
DEFAULT_MODEL = Path(__file__).resolve().parent / "weights" / "ftddm_compact.safetensors"


class FTDDM(nn.Module):
    """Flow-based truncated denoising diffusion model (Dong et al., MedIA 2024)."""

    def __init__(self, config: FTDDMConfig | str = "compact"):
        super().__init__()
        self.config = preset(config) if isinstance(config, str) else config
        d = self.config.diffusion
        if self.config.kind not in KINDS:
            raise ValueError(f"model kind must be one of {KINDS}, got {self.config.kind!r}")
        if d.schedule != "cosine":
            raise ValueError(f"only the cosine schedule is implemented, config asks for {d.schedule!r}")
        if not 0 <= d.t_trunc < d.num_timesteps:
            raise ValueError(f"t_trunc must be in [0, {d.num_timesteps - 1}], got {d.t_trunc}")
        self.schedule = DiffusionSchedule.cosine(d.num_timesteps)
        self.unet = UNet(self.config.unet)
        self.flow = ConditionalFlow(self.config.flow)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def check_scale(self, scale, *, force: bool = False) -> None:
        """Refuse upscaling factors outside the trained range unless forced."""
        lo, hi = self.config.scale_range
        s = torch.as_tensor(scale, dtype=torch.float64)
        if not force and (bool((s < lo - 1e-6).any()) or bool((s > hi + 1e-6).any())):
            raise ValueError(
                f"upscaling factor(s) {sorted(set(s.flatten().tolist()))} outside the model's trained range "
                f"[{lo}, {hi}] (LR matrix {64 / hi:g}..{64 / lo:g} for a 64 grid); pass force=True to try anyway"
            )

    def sample(self, cond: torch.Tensor, scale: torch.Tensor, *, force_scale: bool = False, **kwargs):
        """Super-resolve a batch of model-space conditions; see sampling.sample_ftddm for the options.

        A ``regression`` model ignores the sampler options and returns its one-pass prediction (std 0).
        """
        from .sampling import predict_regression, sample_ftddm  # local: sampling imports nothing from model

        self.check_scale(scale, force=force_scale)
        if self.config.kind == "regression":
            return predict_regression(self, cond, scale, max_batch=kwargs.get("max_batch"),
                                      callback=kwargs.get("callback"))
        return sample_ftddm(self, cond, scale, **kwargs)

    # --- persistence -----------------------------------------------------------------------------
    def save(self, path: str | Path, *, overwrite: bool = False, extra: dict | None = None) -> Path:
        """Write weights + config JSON (+ extra JSON, e.g. a model card) as one safetensors file."""
        meta = json_metadata(config=self.config.to_dict(), **(extra or {}))
        meta["format"] = FORMAT
        return write_safetensors(path, self.state_dict(), meta, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "FTDDM":
        """Load a model saved by :meth:`save`; refuses pickles, explains corrupt or mismatched files."""
        import json

        tensors, meta = read_safetensors(path)
        if meta.get("format") != FORMAT or "config" not in meta:
            raise ValueError(f"{path} is a safetensors file but not an FTDDM model (no '{FORMAT}' header)")
        try:
            config = FTDDMConfig.from_dict(json.loads(meta["config"]))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: the stored FTDDM config is invalid: {exc}") from exc
        model = cls(config)
        load_state(model, tensors, source=str(path))
        return model.to(device).eval()


def load_state(module: nn.Module, tensors: dict[str, torch.Tensor], *, source: str) -> None:
    """load_state_dict with an error that lists missing, unexpected and mis-shaped tensors."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(tensors)) if tensors[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{source} does not match its config:"]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mismatched shape", shapes)):
            if items:
                parts.append(f"  {label} ({len(items)}): {', '.join(items[:5])}{' …' if len(items) > 5 else ''}")
        raise ValueError("\n".join(parts))
    module.load_state_dict(tensors)


def load_model(path: str | Path | None = None, device: str | torch.device = "auto") -> FTDDM:
    """Load an FTDDM model; path=None loads the shipped default model."""
    from .device import resolve_device

    path = DEFAULT_MODEL if path is None else Path(path)
    if path == DEFAULT_MODEL and not path.exists():
        raise FileNotFoundError(
            f"the default model {path} is not installed; train one with `ftddm train` or pass --model PATH"
        )
    return FTDDM.load(path, device=resolve_device(device))


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file (recorded in run reports so results can be traced to exact inputs and weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
