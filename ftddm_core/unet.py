"""UNet of FTDDM (reference §3): Nichol & Dhariwal-style UNet conditioned on t and s, on any image size.

Input is cat([x_t, y]) with y = [LR_zf, M, T1, FLAIR(, x̂0 of the encoder)]; output has x_t's size. Every
residual block gets an embedding of the timestep t (sinusoidal → 2-layer MLP) concatenated with an embedding
of the raw upscaling factor s (3-layer MLP) and applies it as Norm(h)·(1+scale) + shift ("conditional
normalisation"). The same class with ``image_channels=0`` is FTDDM v2's deterministic SR encoder.

Fully convolutional: the norm is per pixel over channels (no spatial statistics) and an optional ``valid``
mask (B, 1, H, W) re-zeroes everything outside the image before every 3×3 convolution and hides padded keys
from attention, so an image zero-padded to the networks' multiple gives exactly the unpadded result inside.
Math only; device and dtype follow the inputs (CPU, CUDA, MPS, autocast, channels_last).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .padding import masked as _masked, valid_pyramid
from .config import UNetConfig


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


class ChannelNorm(nn.Module):
    """Per-pixel normalisation over channels with a learned affine (LayerNorm of ConvNeXt/DiT, channels-first).

    No statistics over space: the result at a pixel never depends on the image size or on padding.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # layer_norm over the last axis of the NHWC view: free for channels_last tensors (the UNet's layout)
        out = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight.to(x.dtype), self.bias.to(x.dtype),
                           self.eps)
        return out.permute(0, 3, 1, 2)





def _zero(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so that its block starts as the identity (Nichol & Dhariwal 2021)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block: Norm→SiLU→conv, then Norm·(1+scale)+shift from the embedding→SiLU→dropout→zero conv."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = ChannelNorm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = ChannelNorm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(_masked(F.silu(self.norm1(x)), valid))
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(_masked(self.dropout(F.silu(h)), valid))
        return _masked(self.skip(x) + h, valid)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all pixels, residual, zero-initialised output projection."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = ChannelNorm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        head_dim = c // self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, head_dim, h * w)
        q, k, v = qkv.permute(1, 0, 2, 4, 3).unbind(0)  # each (B, heads, HW, head_dim)
        # padded pixels are not keys: attention over the image itself, whatever the padding
        keys = None if valid is None else (valid.flatten(1) > 0)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return _masked(x + self.proj(out), valid)


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
    factor = 2 ** (len(cfg.channels) - 1)
    if cfg.image_size < 1 or cfg.image_size % factor:
        raise ValueError(f"image_size={cfg.image_size} must be a positive multiple of 2**(levels-1) = {factor}")
    if cfg.num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be ≥ 1, got {cfg.num_res_blocks}")
    if cfg.image_channels < 0 or cfg.cond_channels < 0 or cfg.image_channels + cfg.cond_channels < 1:
        raise ValueError(f"expected image_channels ≥ 0, cond_channels ≥ 0 and at least one input channel, "
                         f"got {cfg.image_channels} and {cfg.cond_channels}")
    if cfg.out_channels < 1:
        raise ValueError(f"out_channels must be ≥ 1, got {cfg.out_channels}")
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
    """UNet f(x_t, t, y, s) of FTDDM (reference §3), built from a :class:`UNetConfig`; any H, W that are
    multiples of :attr:`size_multiple`.

    Attention is applied at the levels whose feature-map size *at the training size* ``image_size`` is in
    ``attention_resolutions`` (the same levels on any other input size) and always in the middle block.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        _validate_config(config)
        self.config = config
        ch = config.channels
        embed = config.embed_dim or 4 * ch[0]
        self.time_embed_dim = ch[0]  # width of the sinusoidal features
        self.time_mlp = nn.Sequential(nn.Linear(ch[0], embed), nn.SiLU(), nn.Linear(embed, embed))
        # s is fed raw (2 … 8), as in the authors' code; the MLP learns its own scaling
        self.scale_mlp = nn.Sequential(
            nn.Linear(1, embed), nn.SiLU(), nn.Linear(embed, embed), nn.SiLU(), nn.Linear(embed, embed)
        )
        cond_dim = 2 * embed  # [time embedding, scale embedding] concatenated

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, cond_dim, config.dropout)

        def attn(c: int, size: int) -> nn.Module:
            wanted = size in config.attention_resolutions
            return AttentionBlock(c, config.num_heads) if wanted else nn.Identity()

        self.input_conv = nn.Conv2d(config.image_channels + config.cond_channels, ch[0], 3, padding=1)
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
        self.mid_attn = AttentionBlock(cur, config.num_heads)
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

        self.out_norm = ChannelNorm(cur)
        self.out_conv = _zero(nn.Conv2d(cur, config.out_channels, 3, padding=1))

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this (one halving per level below the top)."""
        return 2 ** (len(self.config.channels) - 1)

    # --- input checking ------------------------------------------------------------------------------
    def _check_inputs(self, x_t, t, cond, scale, valid) -> None:
        """Raise ValueError naming the expected shape for any malformed input."""
        cfg = self.config
        for name, value in (("t", t), ("cond", cond), ("scale", scale)):
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if cfg.image_channels:
            if not isinstance(x_t, torch.Tensor) or x_t.ndim != 4 or x_t.shape[1] != cfg.image_channels:
                raise ValueError(f"x_t must have shape (B, {cfg.image_channels}, H, W), "
                                 f"got {tuple(getattr(x_t, 'shape', ()))}")
            if x_t.shape[0] != cond.shape[0] or x_t.shape[-2:] != cond.shape[-2:]:
                raise ValueError(f"x_t {tuple(x_t.shape)} and cond {tuple(cond.shape)} must share batch and size")
        elif x_t is not None:
            raise ValueError("this network has no image input (image_channels = 0): pass x_t=None")
        if cond.ndim != 4 or cond.shape[1] != cfg.cond_channels:
            raise ValueError(f"cond must have shape (B, {cfg.cond_channels}, H, W), got {tuple(cond.shape)}")
        h, w = cond.shape[-2:]
        m = self.size_multiple
        if h < m or w < m or h % m or w % m:
            raise ValueError(f"image size {h}×{w} must be a positive multiple of {m} in both axes "
                             "(pad it, e.g. with FTDDM.sample, which pads and crops for you)")
        batch = cond.shape[0]
        for name, value in (("t", t), ("scale", scale)):
            if value.ndim != 1 or value.shape[0] != batch:
                raise ValueError(f"{name} must have shape (B,) = ({batch},), got {tuple(value.shape)}")
        if valid is not None and (valid.ndim != 4 or valid.shape[1] != 1 or valid.shape[0] != batch
                                  or valid.shape[-2:] != cond.shape[-2:]):
            raise ValueError(f"valid must have shape ({batch}, 1, {h}, {w}), got {tuple(valid.shape)}")

    # --- forward -------------------------------------------------------------------------------------
    def embed(self, t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Conditioning vector (B, 2·embed_dim) = [MLP(sinusoid(t)), MLP(s)]."""
        t_emb = self.time_mlp(timestep_embedding(t, self.time_embed_dim).to(dtype))
        s_emb = self.scale_mlp(scale.to(device=t_emb.device, dtype=dtype)[:, None])
        return torch.cat([t_emb, s_emb], dim=1)

    def forward(self, x_t, t: torch.Tensor, cond: torch.Tensor, scale: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        """Output (B, out_channels, H, W) for image x_t (B, image_channels, H, W) or None, step t (B,), condition
        y (B, cond_channels, H, W), factor s (B,); ``valid`` (B, 1, H, W) marks the unpadded image."""
        return self.forward_features(x_t, t, cond, scale, valid)[0]

    def forward_features(self, x_t, t, cond, scale, valid=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(output, decoder features [level 0 = full resolution, level 1 = ½, …]) — the encoder's multi-scale
        features that FTDDM v2's flow is conditioned on."""
        self._check_inputs(x_t, t, cond, scale, valid)
        dtype = cond.dtype if x_t is None else x_t.dtype
        valids = valid_pyramid(valid, len(self.config.channels))
        emb = self.embed(t, scale, dtype)
        inputs = cond.to(dtype) if x_t is None else torch.cat([x_t, cond.to(dtype)], dim=1)
        # channels_last throughout: the per-pixel norms are then contiguous and oneDNN's convolutions faster
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        h = _masked(self.input_conv(_masked(inputs, valid)), valid)
        skips = [h]
        for i, level in enumerate(self.down_levels):
            for block, attention in zip(level.blocks, level.attentions):
                h = _attend(attention, block(h, emb, valids[i]), valids[i])
                skips.append(h)
            if i < len(self.downsamples):
                h = _masked(self.downsamples[i](h), valids[i + 1])
                skips.append(h)
        deepest = valids[-1]
        h = self.mid_block2(self.mid_attn(self.mid_block1(h, emb, deepest), deepest), emb, deepest)
        features = [None] * len(self.config.channels)
        for j, level in enumerate(self.up_levels):
            i = len(self.config.channels) - 1 - j
            for block, attention in zip(level.blocks, level.attentions):
                h = _attend(attention, block(torch.cat([h, skips.pop()], dim=1), emb, valids[i]), valids[i])
            features[i] = h
            if j < len(self.upsamples):
                h = _masked(self.upsamples[j](h), valids[i - 1])
        out = self.out_conv(_masked(F.silu(self.out_norm(h)), valid))
        return _masked(out, valid).contiguous(), features


def _attend(attention: nn.Module, h: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    return attention(h, valid) if isinstance(attention, AttentionBlock) else h
