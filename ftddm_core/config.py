"""Configuration dataclasses for FTDDM (UNet, flow, diffusion) and their JSON round trip.

Every checkpoint stores its :class:`FTDDMConfig` as JSON, so a model file always says what it is.
Named presets: ``paper`` (published sizes), ``compact`` (the CPU-trainable default), ``regression`` (the
deterministic SR encoder alone, the evaluation's one-pass baseline) and ``tiny`` (tests).

FTDDM v2 (our extension of the paper): a deterministic SR *encoder* (a UNet on y, conditioned on s) gives
x̂0_enc and multi-scale features; the flow is conditioned on [y, x̂0_enc] and those features and models the
residual x_Ttrunc − √ᾱ·x̂0_enc; the denoising UNet sees [y, x̂0_enc] as its condition.
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

    image_size: int = 64  # training tile size; the network runs on any multiple of 2**(levels−1)
    image_channels: int = 1  # x_t channels before the condition (0: the encoder, which sees y only)
    cond_channels: int = len(COND_CHANNELS) + 1  # [*y, x̂0 of the encoder]
    out_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 96, 128)  # one entry per resolution level
    num_res_blocks: int = 2  # encoder blocks per level (decoder uses one more)
    attention_resolutions: tuple[int, ...] = (16, 8)  # feature-map sizes (at image_size) that get self-attention
    num_heads: int = 4
    dropout: float = 0.0
    embed_dim: int = 0  # time/scale embedding width; 0 = 4 × channels[0]


@dataclass
class FlowConfig:
    """Conditional multi-scale normalizing flow producing x at the truncation index (SRFlow-like)."""

    image_size: int = 64  # training tile size; the flow runs on any multiple of 2**levels
    in_channels: int = 1
    cond_channels: int = len(COND_CHANNELS) + 1  # [*y, x̂0 of the encoder]
    feature_channels: tuple[int, ...] = ()  # channels of the encoder's features per level (level 0 = full size)
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
    encoder: UNetConfig = field(default_factory=lambda: encoder_config())
    unet: UNetConfig = field(default_factory=UNetConfig)
    flow: FlowConfig = field(default_factory=lambda: FlowConfig(feature_channels=(32, 64, 96, 128)))
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    scale_range: tuple[float, float] = (2.0, 8.0)  # trained range of the in-plane upscaling factor s
    x0_clip: tuple[float, float] = (0.0, 2.0)  # model-space data range used to clamp x̂0
    metabolites: tuple[str, ...] = METABOLITES
    normalisation: str = "lr_robust_max"  # see ftddm_core.prep.normalisation_scale
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


def encoder_config(channels: tuple[int, ...] = (32, 64, 96, 128), num_res_blocks: int = 2,
                   num_heads: int = 4) -> UNetConfig:
    """The deterministic SR encoder: a UNet on y = [LR_zf, M, T1, FLAIR] only (no x_t), conditioned on s."""
    return UNetConfig(image_channels=0, cond_channels=len(COND_CHANNELS), channels=channels,
                      num_res_blocks=num_res_blocks, attention_resolutions=(8,), num_heads=num_heads)


def preset(name: str) -> FTDDMConfig:
    """Named configurations: ``paper``, ``compact`` (default, CPU-trainable), ``regression`` (its encoder alone),
    ``ddpm`` (a plain full-chain conditional DDPM with the compact ε-UNet, for comparisons) and ``tiny`` (tests)."""
    if name == "paper":
        enc = encoder_config((64, 128, 192, 256), 3)
        return FTDDMConfig(
            name="paper", encoder=enc,
            unet=UNetConfig(channels=(64, 128, 192, 256), num_res_blocks=3),
            flow=FlowConfig(steps_per_level=12, hidden_channels=128, cond_hidden=64, feature_channels=enc.channels),
        )
    if name == "compact":  # sized to train in about an hour on 2 CPU cores; the encoder carries most of the work
        enc = encoder_config((32, 64, 96, 128), 1)
        return FTDDMConfig(
            name="compact", encoder=enc,
            unet=UNetConfig(channels=(16, 32, 64, 96), num_res_blocks=1, attention_resolutions=(8,)),
            flow=FlowConfig(steps_per_level=2, hidden_channels=48, cond_hidden=32, feature_channels=enc.channels),
        )
    if name == "regression":  # the one-pass baseline: the compact encoder alone, trained on L1
        return FTDDMConfig(name="regression", kind="regression", encoder=preset("compact").encoder)
    if name == "tiny":
        enc = encoder_config((8, 16, 16, 16), 1, 2)
        return FTDDMConfig(
            name="tiny", encoder=enc,
            unet=UNetConfig(channels=(8, 16, 16, 16), num_res_blocks=1, num_heads=2),
            flow=FlowConfig(steps_per_level=1, hidden_channels=8, cond_hidden=4, feature_channels=enc.channels),
        )


    if name == "ddpm":  # the plain conditional DDPM baseline: the compact ε-UNet on y alone, full chain
        base = preset("compact")
        base.unet.cond_channels = len(COND_CHANNELS)
        return FTDDMConfig(name="ddpm", encoder=base.encoder, unet=base.unet, flow=base.flow,
                           diffusion=DiffusionConfig(t_trunc=999))
    raise ValueError(f"unknown config {name!r}; expected one of {PRESETS}")


PRESETS = ("paper", "compact", "regression", "ddpm", "tiny")
KINDS = ("ftddm", "regression")
