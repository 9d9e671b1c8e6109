"""The FTDDM v2 bundle: SR encoder + ε-UNet + conditional flow + cosine schedule + config, one safetensors file.

Data flow (ARCHITECTURE.md): the encoder maps y = [LR_zf, M, T1, FLAIR] (and s) to x̂0_enc and multi-scale
features; the flow, conditioned on [y, x̂0_enc] and those features, draws the residual r so that
x_Ttrunc = √ᾱ_Ttrunc·x̂0_enc + r; the ε-UNet, conditioned on [y, x̂0_enc], runs the truncated reverse chain.
Any H×W: :meth:`FTDDM.sample` zero-pads to the networks' multiple (outside the image, marked by a valid
mask the networks respect exactly) and crops back.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import json_metadata, read_safetensors, write_safetensors
from .config import COND_CHANNELS, KINDS, FTDDMConfig, preset
from .flow import ConditionalFlow
from .schedule import DiffusionSchedule
from .uncertainty import METADATA_KEY as CALIBRATION_KEY, UncertaintyCalibration
from .unet import UNet

FORMAT = "ftddm-model/2"
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
        self.encoder = UNet(self.config.encoder)
        # a regression model is the encoder alone (the one-pass baseline); FTDDM adds the flow and the ε-UNet
        self.unet = UNet(self.config.unet) if self.config.kind == "ftddm" else None
        self.flow = ConditionalFlow(self.config.flow) if self.config.kind == "ftddm" else None
        #: σ-scaling of the uncertainty map fitted on validation maps (scripts/calibrate_uncertainty.py), or None
        self.uncertainty_calibration: UncertaintyCalibration | None = None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def size_multiple(self) -> int:
        """Image sizes the networks take directly (sample() pads anything else)."""
        nets = [n for n in (self.encoder, self.unet, self.flow) if n is not None]
        return max(n.size_multiple for n in nets)

    @property
    def flow_shift_factor(self) -> float:
        """√ᾱ at Ttrunc: E[x_Ttrunc | x0] = √ᾱ·x0, so the flow's residual is taken around √ᾱ·x̂0_enc."""
        return math.sqrt(float(self.schedule.alphas_cumprod[self.config.diffusion.t_trunc]))

    # --- the three networks, as the samplers and the losses use them ------------------------------------
    def encode(self, cond: torch.Tensor, scale: torch.Tensor, valid: torch.Tensor | None = None):
        """(x̂0_enc (B, 1, H, W) clamped to the data range and masked, encoder features per level)."""
        t = torch.zeros(cond.shape[0], dtype=torch.long, device=cond.device)
        out, features = self.encoder.forward_features(None, t, cond, scale.to(cond.device), valid)
        lo, hi = self.config.x0_clip
        return out.float().clamp(lo, hi) * cond[:, 1:2], features

    @staticmethod
    def with_estimate(cond: torch.Tensor, x0_enc: torch.Tensor) -> torch.Tensor:
        """The condition of the flow and the ε-UNet: [y, x̂0_enc]."""
        return torch.cat([cond, x0_enc.to(cond.dtype)], dim=1)

    def flow_sample(self, cond, x0_enc, features, tau: float, generator=None, valid=None) -> torch.Tensor:
        """x_Ttrunc = √ᾱ·x̂0_enc + F⁻¹(z; [y, x̂0_enc], features), z from the conditional prior at temperature τ."""
        r = self.flow.sample(self.with_estimate(cond, x0_enc), tau, generator, features, valid)
        return self.flow_shift_factor * x0_enc.to(r.dtype) + r

    def flow_log_prob(self, x, cond, x0_enc, features, valid=None) -> torch.Tensor:
        """log p(x_Ttrunc | y) of the residual flow (a shift has unit Jacobian), nats, (B,)."""
        r = x - self.flow_shift_factor * x0_enc.to(x.dtype)
        return self.flow.log_prob(r, self.with_estimate(cond, x0_enc), features, valid)

    @property
    def unet_sees_estimate(self) -> bool:
        """Whether the ε-UNet is conditioned on x̂0_enc (v2) or on y alone (a plain conditional DDPM baseline)."""
        return self.unet is not None and self.unet.config.cond_channels == len(COND_CHANNELS) + 1

    def denoiser(self, cond, x0_enc, scale, valid=None):
        """ε̂(x_t, t) of the ε-UNet with everything but (x_t, t) closed over (the samplers' interface)."""
        ucond = self.with_estimate(cond, x0_enc) if self.unet_sees_estimate else cond
        return lambda x_t, t: self.unet(x_t, t, ucond, scale, valid)

    def pad(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """(cond zero-padded at the bottom/right to size_multiple, valid mask or None, original (H, W))."""
        h, w = cond.shape[-2:]
        m = self.size_multiple
        ph, pw = (-h) % m, (-w) % m
        if ph == 0 and pw == 0:
            return cond, None, (h, w)
        valid = torch.ones((cond.shape[0], 1, h, w), dtype=cond.dtype, device=cond.device)
        return F.pad(cond, (0, pw, 0, ph)), F.pad(valid, (0, pw, 0, ph)), (h, w)

    def check_scale(self, scale, *, force: bool = False) -> None:
        """Refuse upscaling factors outside the trained range unless forced."""
        lo, hi = self.config.scale_range
        s = torch.as_tensor(scale, dtype=torch.float64)
        if not force and (bool((s < lo - 1e-6).any()) or bool((s > hi + 1e-6).any())):
            raise ValueError(
                f"upscaling factor(s) {sorted(set(round(v, 3) for v in s.flatten().tolist()))} outside the model's "
                f"trained range [{lo:g}, {hi:g}]; choose --factor (factor=) in that range, or pass --force "
                "(force=True) to try anyway"
            )

    def sample(self, cond: torch.Tensor, scale: torch.Tensor, *, force_scale: bool = False, **kwargs):
        """Super-resolve a batch of model-space conditions (B, 4, H, W), any H×W; see sampling.sample_ftddm.

        A ``regression`` model, or ``sampler="regression"``, returns the encoder's one-pass prediction (std 0,
        NFE 1: the fast preview). The input is zero-padded to :attr:`size_multiple` and the result cropped.
        """
        from .sampling import predict_regression, sample_ftddm  # local: sampling imports nothing from model

        self.check_scale(scale, force=force_scale)
        padded, valid, (h, w) = self.pad(cond)
        if self.config.kind == "regression" or kwargs.get("sampler") == "regression":
            result = predict_regression(self, padded, scale, max_batch=kwargs.get("max_batch"),
                                        callback=kwargs.get("callback"), valid=valid)
        else:
            result = sample_ftddm(self, padded, scale, valid=valid, **kwargs)
        return result.cropped(h, w)

    # --- persistence -----------------------------------------------------------------------------
    def save(self, path: str | Path, *, overwrite: bool = False, extra: dict | None = None) -> Path:
        """Write weights + config JSON (+ extra JSON, e.g. a model card) as one safetensors file."""
        meta = json_metadata(config=self.config.to_dict(), **(extra or {}))
        meta["format"] = FORMAT
        if self.uncertainty_calibration is not None:
            meta[CALIBRATION_KEY] = self.uncertainty_calibration.to_json()
        return write_safetensors(path, self.state_dict(), meta, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "FTDDM":
        """Load a model saved by :meth:`save`; refuses pickles, explains corrupt or mismatched files."""
        import json

        tensors, meta = read_safetensors(path)
        if meta.get("format") == "ftddm-model/1":
            raise ValueError(f"{path} is an FTDDM v1 model (no SR encoder, flow tied to 64×64); this version "
                             "needs an FTDDM v2 model: retrain it with `ftddm train` or use the shipped default")
        if meta.get("format") != FORMAT or "config" not in meta:
            raise ValueError(f"{path} is a safetensors file but not an FTDDM model (no '{FORMAT}' header)")
        try:
            config = FTDDMConfig.from_dict(json.loads(meta["config"]))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: the stored FTDDM config is invalid: {exc}") from exc
        model = cls(config)
        load_state(model, tensors, source=str(path))
        model.uncertainty_calibration = UncertaintyCalibration.from_metadata(meta, str(path))
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
