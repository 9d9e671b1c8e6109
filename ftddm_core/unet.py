"""Denoising ε-UNet of FTDDM (reference §3): Nichol & Dhariwal-style UNet conditioned on t and s.

Input is cat([x_t, y]) with y = [LR_zf, M, T1, FLAIR]; output is ε̂ with x_t's shape. Every residual block
gets an embedding of the timestep t (sinusoidal → 2-layer MLP) concatenated with an embedding of the raw
upscaling factor s (3-layer MLP) and applies it as GroupNorm(h)·(1+scale) + shift ("conditional
normalisation"). Math only; device and dtype follow the inputs (CPU, CUDA, MPS, autocast, channels_last).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import UNetConfig


def count_parameters(module: nn.Module) -> int:
    """Number of scalars in all parameters of a module (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of (possibly fractional) timesteps (Vaswani et al. 2017; Ho et al. 2020)."""
    half = dim // 2
    # float32 keeps t up to 1000 exact enough even when the model runs in half precision
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _zero(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so that its block starts as the identity (Nichol & Dhariwal 2021)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block: GN→SiLU→conv, then GN·(1+scale)+shift from the embedding→SiLU→dropout→zero conv."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all pixels, residual, zero-initialised output projection."""

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        head_dim = c // self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, head_dim, h * w)
        q, k, v = qkv.permute(1, 0, 2, 4, 3).unbind(0)  # each (B, heads, HW, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3×3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour interpolation, then a 3×3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level's residual blocks, each optionally followed by self-attention."""

    def __init__(self, blocks: list[ResBlock], attentions: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attentions = nn.ModuleList(attentions)


def _validate_config(cfg: UNetConfig) -> None:
    """Refuse configurations the architecture cannot build, with what was expected."""
    if len(cfg.channels) < 1 or any(c < 1 for c in cfg.channels):
        raise ValueError(f"channels must be a non-empty tuple of positive ints, got {cfg.channels}")
    if cfg.norm_groups < 1 or any(c % cfg.norm_groups for c in cfg.channels):
        raise ValueError(f"norm_groups={cfg.norm_groups} must divide every channel count {cfg.channels}")
    factor = 2 ** (len(cfg.channels) - 1)
    if cfg.image_size < 1 or cfg.image_size % factor:
        raise ValueError(f"image_size={cfg.image_size} must be a positive multiple of 2**(levels-1) = {factor}")
    if cfg.num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be ≥ 1, got {cfg.num_res_blocks}")
    if cfg.cond_channels < 0 or cfg.out_channels < 1:
        raise ValueError(
            f"expected cond_channels ≥ 0 and out_channels ≥ 1, got {cfg.cond_channels} and {cfg.out_channels}"
        )
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.embed_dim < 0:
        raise ValueError(f"embed_dim must be ≥ 0 (0 = 4 × channels[0]), got {cfg.embed_dim}")
    sizes = [cfg.image_size // 2**i for i in range(len(cfg.channels))]
    attn_channels = [c for c, size in zip(cfg.channels, sizes) if size in cfg.attention_resolutions]
    for c in attn_channels + [cfg.channels[-1]]:  # the middle block always attends
        if cfg.num_heads < 1 or c % cfg.num_heads:
            raise ValueError(f"num_heads={cfg.num_heads} must divide the channel count {c} of every attention layer")


class UNet(nn.Module):
    """ε-UNet ε̂(x_t, t, y, s) of FTDDM (reference §3), built from a :class:`UNetConfig`.

    Attention is applied at levels whose feature-map size is in ``attention_resolutions`` (sizes that no
    level has are ignored) and always in the middle block.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        _validate_config(config)
        self.config = config
        ch, groups = config.channels, config.norm_groups
        embed = config.embed_dim or 4 * ch[0]
        self.time_embed_dim = ch[0]  # width of the sinusoidal features
        self.time_mlp = nn.Sequential(nn.Linear(ch[0], embed), nn.SiLU(), nn.Linear(embed, embed))
        # s is fed raw (2 … 8), as in the authors' code; the MLP learns its own scaling
        self.scale_mlp = nn.Sequential(
            nn.Linear(1, embed), nn.SiLU(), nn.Linear(embed, embed), nn.SiLU(), nn.Linear(embed, embed)
        )
        cond_dim = 2 * embed  # [time embedding, scale embedding] concatenated

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, cond_dim, groups, config.dropout)

        def attn(c: int, size: int) -> nn.Module:
            wanted = size in config.attention_resolutions
            return AttentionBlock(c, config.num_heads, groups) if wanted else nn.Identity()

        self.input_conv = nn.Conv2d(1 + config.cond_channels, ch[0], 3, padding=1)
        skip_channels = [ch[0]]
        cur = ch[0]
        self.down_levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for i, c in enumerate(ch):
            size = config.image_size // 2**i
            blocks, attns = [], []
            for _ in range(config.num_res_blocks):
                blocks.append(res(cur, c))
                attns.append(attn(c, size))
                cur = c
                skip_channels.append(cur)
            self.down_levels.append(Level(blocks, attns))
            if i < len(ch) - 1:
                self.downsamples.append(Downsample(cur))
                skip_channels.append(cur)

        self.mid_block1 = res(cur, cur)
        self.mid_attn = AttentionBlock(cur, config.num_heads, groups)
        self.mid_block2 = res(cur, cur)

        self.up_levels = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i in reversed(range(len(ch))):
            size = config.image_size // 2**i
            blocks, attns = [], []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(res(cur + skip_channels.pop(), ch[i]))
                attns.append(attn(ch[i], size))
                cur = ch[i]
            self.up_levels.append(Level(blocks, attns))
            if i > 0:
                self.upsamples.append(Upsample(cur))

        self.out_norm = nn.GroupNorm(groups, cur)
        self.out_conv = _zero(nn.Conv2d(cur, config.out_channels, 3, padding=1))

    # --- input checking ------------------------------------------------------------------------------
    def _check_inputs(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, scale: torch.Tensor) -> None:
        """Raise ValueError naming the expected shape for any malformed input."""
        cfg = self.config
        n = cfg.image_size
        for name, value in (("x_t", x_t), ("t", t), ("cond", cond), ("scale", scale)):
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if x_t.ndim != 4 or x_t.shape[1] != 1:
            raise ValueError(f"x_t must have shape (B, 1, {n}, {n}), got {tuple(x_t.shape)}")
        if cond.ndim != 4 or cond.shape[1] != cfg.cond_channels:
            raise ValueError(f"cond must have shape (B, {cfg.cond_channels}, {n}, {n}), got {tuple(cond.shape)}")
        factor = 2 ** (len(cfg.channels) - 1)
        for name, value in (("x_t", x_t), ("cond", cond)):
            h, w = value.shape[-2:]
            if h != n or w != n or h % factor or w % factor:
                raise ValueError(
                    f"{name} must be {n}×{n} (config.image_size, a multiple of {factor}), got {h}×{w}"
                )
        batch = x_t.shape[0]
        for name, value in (("t", t), ("scale", scale)):
            if value.ndim != 1:
                raise ValueError(f"{name} must have shape (B,) = ({batch},), got {tuple(value.shape)}")
        sizes = {"x_t": batch, "t": t.shape[0], "cond": cond.shape[0], "scale": scale.shape[0]}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"batch sizes of x_t, t, cond and scale must agree, got {sizes}")

    # --- forward -------------------------------------------------------------------------------------
    def embed(self, t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Conditioning vector (B, 2·embed_dim) = [MLP(sinusoid(t)), MLP(s)]."""
        t_emb = self.time_mlp(timestep_embedding(t, self.time_embed_dim).to(dtype))
        s_emb = self.scale_mlp(scale.to(device=t_emb.device, dtype=dtype)[:, None])
        return torch.cat([t_emb, s_emb], dim=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """ε̂ (B, out_channels, H, W) for noisy image x_t (B,1,H,W), step t (B,), condition y, factor s (B,)."""
        self._check_inputs(x_t, t, cond, scale)
        emb = self.embed(t, scale, x_t.dtype)
        h = self.input_conv(torch.cat([x_t, cond.to(x_t.dtype)], dim=1))
        skips = [h]
        for i, level in enumerate(self.down_levels):
            for block, attention in zip(level.blocks, level.attentions):
                h = attention(block(h, emb))
                skips.append(h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)
                skips.append(h)
        h = self.mid_block2(self.mid_attn(self.mid_block1(h, emb)), emb)
        for i, level in enumerate(self.up_levels):
            for block, attention in zip(level.blocks, level.attentions):
                h = attention(block(torch.cat([h, skips.pop()], dim=1), emb))
            if i < len(self.upsamples):
                h = self.upsamples[i](h)
        return self.out_conv(F.silu(self.out_norm(h)))
