"""Configuration dataclasses for FTDDM (UNet, flow, diffusion) and their JSON round trip.

Every checkpoint stores its :class:`FTDDMConfig` as JSON, so a model file always says what it is.
Named presets: ``paper`` (published sizes), ``compact`` (the CPU-trainable default), ``regression`` (the
deterministic UNet baseline of the evaluation) and ``tiny`` (tests).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

#: Order of the condition channels y fed to both networks (paper §2: [LR_zf, M, T1, FLAIR]).
COND_CHANNELS = ("lr", "mask", "t1", "flair")

#: Metabolites of the published 7T protocol, in the order used by the phantom and the demo.
METABOLITES = ("tCr", "tCho", "NAA", "Glu", "Ins", "Gln", "Gly")


@dataclass
class UNetConfig:
    """Nichol & Dhariwal-style ε-UNet conditioned on timestep t and upscaling factor s."""

    image_size: int = 64
    cond_channels: int = len(COND_CHANNELS)  # input is [x_t, *cond]
    out_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 96, 128)  # one entry per resolution level
    num_res_blocks: int = 2  # encoder blocks per level (decoder uses one more)
    attention_resolutions: tuple[int, ...] = (16, 8)  # feature-map sizes that get self-attention
    num_heads: int = 4
    dropout: float = 0.0
    norm_groups: int = 8  # GroupNorm groups; must divide every channel count
    embed_dim: int = 0  # time/scale embedding width; 0 = 4 × channels[0]


@dataclass
class FlowConfig:
    """Conditional multi-scale normalizing flow producing x at the truncation index (SRFlow-like)."""

    image_size: int = 64
    in_channels: int = 1
    cond_channels: int = len(COND_CHANNELS)
    levels: int = 3  # squeeze levels after the 64×64 level 0
    steps_per_level: int = 4  # [actnorm → 1×1 conv → injector → coupling] steps per level
    hidden_channels: int = 64  # width of coupling / injector networks
    cond_hidden: int = 32  # width of the condition encoders
    clamp: float = 1.0  # log-scale bound: s = clamp · (2σ(ŝ) − 1)


@dataclass
class DiffusionConfig:
    """Gaussian diffusion: cosine ᾱ (Nichol & Dhariwal 2021), ε-prediction, truncation index."""

    num_timesteps: int = 1000
    schedule: str = "cosine"
    t_trunc: int = 100  # the flow produces x at this index and the reverse chain starts here


@dataclass
class FTDDMConfig:
    """Everything that defines a trained FTDDM bundle, stored as JSON beside its weights."""

    name: str = "compact"
    kind: str = "ftddm"  # "ftddm" (flow + truncated diffusion) or "regression" (UNet baseline, one pass)
    unet: UNetConfig = field(default_factory=UNetConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    scale_range: tuple[float, float] = (2.0, 8.0)  # trained range of s = 64 / LR matrix
    x0_clip: tuple[float, float] = (0.0, 2.0)  # model-space data range used to clamp x̂0
    metabolites: tuple[str, ...] = METABOLITES
    normalisation: str = "lr_robust_max"  # see ftddm_core.normalise
    info: dict[str, Any] = field(default_factory=dict)  # training data, iterations, metrics …

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FTDDMConfig":
        return _from_dict(cls, d)

    @classmethod
    def from_json(cls, text: str) -> "FTDDMConfig":
        return cls.from_dict(json.loads(text))


def _from_dict(cls, d: dict[str, Any]):
    """Build a (nested) dataclass from a dict, restoring tuples and refusing unknown keys."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object for {cls.__name__}, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {sorted(unknown)}")
    kwargs = {}
    for name, value in d.items():
        default = getattr(cls(), name) if _has_default(fields[name]) else None
        if dataclasses.is_dataclass(default):
            value = _from_dict(type(default), value)
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def preset(name: str) -> FTDDMConfig:
    """Named configurations: ``paper``, ``compact`` (default, CPU-trainable), ``regression`` and ``tiny`` (tests)."""
    if name == "paper":
        return FTDDMConfig(
            name="paper",
            unet=UNetConfig(channels=(64, 128, 192, 256), num_res_blocks=3, norm_groups=32),
            flow=FlowConfig(steps_per_level=12, hidden_channels=128, cond_hidden=64),
        )
    if name == "compact":
        return FTDDMConfig(name="compact")
    if name == "regression":  # deterministic baseline: the compact UNet trained to output x0 in one pass
        return FTDDMConfig(name="regression", kind="regression")
    if name == "tiny":
        return FTDDMConfig(
            name="tiny",
            unet=UNetConfig(channels=(8, 16, 16, 16), num_res_blocks=1, num_heads=2, norm_groups=4),
            flow=FlowConfig(steps_per_level=1, hidden_channels=8, cond_hidden=4),
        )
    raise ValueError(f"unknown config {name!r}; expected one of {PRESETS}")


PRESETS = ("paper", "compact", "regression", "tiny")
KINDS = ("ftddm", "regression")
