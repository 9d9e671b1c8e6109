"""Conditional multi-scale normalizing flow of FTDDM (reference §4; SRFlow-like, Lugmayr et al. 2020).

Maps an image x, (B, 1, H, W), to a latent z, (B, D) with D = H·W, given a condition c (B, C, H, W) — in
FTDDM v2 c = [LR_zf, M, T1, FLAIR, x̂0_enc] — and optionally the SR encoder's multi-scale features. Level 0
works at full resolution on one channel (actnorm → affine injector); each of the ``levels`` further levels
starts with a 2×2 squeeze and runs ``steps_per_level`` steps of [actnorm → invertible 1×1 conv → affine
injector → conditional affine coupling]; after every level but the last, half of the channels leave as part
of z. The prior of every latent piece is a diagonal Gaussian whose mean and log-std are computed from the
condition features at that piece's resolution (zero-initialised, so it starts as N(0, I)). Nothing is tied
to an image size or position: any H, W that are multiples of 2**levels. An optional ``valid`` mask (B, 1, H,
W) keeps zero padding exactly inert (every scale/shift is 0 there), so a padded image gives the unpadded
result inside. Math only; device and dtype follow the inputs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .padding import masked as _masked, valid_pyramid, valid_size
from .config import FlowConfig

#: Seed of the generator that draws the random orthogonal initial 1×1 convolutions (reproducible models).
INVCONV_SEED = 1234


def bounded_log_scale(raw: torch.Tensor, clamp: float) -> torch.Tensor:
    """Bounded log-scale s = clamp·(2σ(ŝ) − 1) ∈ (−clamp, clamp) (reference §4), 0 at ŝ = 0."""
    return clamp * (2.0 * torch.sigmoid(raw) - 1.0)


def _sum_per_sample(t: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the batch one."""
    return t.flatten(1).sum(dim=1)


class ActNorm(nn.Module):
    """Per-channel affine y = (x + b)·exp(log_s) with data-dependent init (Kingma & Dhariwal 2018, Glow)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        # a buffer, so a loaded model does not re-initialise itself on its first training batch
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize_from(self, x: torch.Tensor) -> None:
        """Set b = −mean and log_s = −log std per channel so that this batch comes out zero-mean, unit-variance."""
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)

    def _logdet(self, x: torch.Tensor, valid=None) -> torch.Tensor:
        """log|det| = (number of image pixels)·Σ_c log|scale_c| (padding is held at 0, no volume)."""
        return _pixel_count(x, valid) * self.log_scale.sum()

    def _bias(self, valid):
        return self.bias if valid is None else self.bias * valid  # padding stays 0

    def forward(self, x: torch.Tensor, logdet: torch.Tensor, valid=None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not bool(self.initialized):
            self.initialize_from(x)
        return (x + self._bias(valid)) * torch.exp(self.log_scale), logdet + self._logdet(x, valid)

    def inverse(self, y: torch.Tensor, valid=None) -> torch.Tensor:
        return y * torch.exp(-self.log_scale) - self._bias(valid)


class InvertibleConv1x1(nn.Module):
    """Learned invertible 1×1 convolution W = P·L·(U + diag(sign·exp(log_s))) (Glow, LU form)."""

    def __init__(self, channels: int, generator: torch.Generator):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        # P and the signs stay fixed: they are discrete, and fixing them keeps det(W) ≠ 0 throughout training
        self.register_buffer("permutation", p.float())
        self.register_buffer("sign_s", torch.sign(diag).float())
        self.lower = nn.Parameter(torch.tril(lower, -1).float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(diag.abs()).float())

    def weight(self) -> torch.Tensor:
        """The (C, C) matrix W; only the strictly triangular parts of L and U are used."""
        eye = torch.eye(self.log_s.numel(), device=self.log_s.device, dtype=self.log_s.dtype)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.permutation @ lower @ upper

    def forward(self, x: torch.Tensor, logdet: torch.Tensor, valid=None) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight()
        y = F.conv2d(x, w[:, :, None, None])
        return y, logdet + _pixel_count(x, valid) * self.log_s.sum()

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        w_inv = _matrix_inverse(self.weight())
        return F.conv2d(y, w_inv[:, :, None, None])


def _matrix_inverse(w: torch.Tensor) -> torch.Tensor:
    """Differentiable inverse of a small matrix, computed in float64 (on the CPU for MPS, which lacks float64)."""
    if w.device.type == "mps":
        return torch.linalg.inv(w.cpu().double()).to(device=w.device, dtype=w.dtype)
    return torch.linalg.inv(w.double()).to(w.dtype)



def _pixel_count(x: torch.Tensor, valid: torch.Tensor | None):
    """Pixels a per-pixel layer acts on: H·W, or the valid ones per sample (B,) on a padded canvas."""
    return x.shape[2] * x.shape[3] if valid is None else _sum_per_sample(valid).to(x.dtype)


class ConvNet(nn.Module):
    """H of the injector/coupling: 3×3 conv → LReLU → 3×3 conv → LReLU → zero-initialised 3×3 conv,
    re-zeroed outside the valid image before every convolution (and at the output)."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.last = nn.Conv2d(hidden, out_channels, 3, padding=1)
        nn.init.zeros_(self.last.weight)  # zero output ⇒ s = 0 and t = 0 ⇒ every step starts as the identity
        nn.init.zeros_(self.last.bias)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        h = _masked(F.leaky_relu(self.conv1(_masked(x, valid)), 0.2), valid)
        h = _masked(F.leaky_relu(self.conv2(h), 0.2), valid)
        return _masked(self.last(h), valid)


class AffineInjector(nn.Module):
    """Affine injector: [ŝ, t] = H(Cond(y)); y' = x·exp(s) + t, s = clamp·(2σ(ŝ)−1); log|det| = Σ s (SRFlow)."""

    def __init__(self, channels: int, cond_channels: int, hidden: int, clamp: float):
        super().__init__()
        self.clamp = clamp
        self.net = ConvNet(cond_channels, hidden, 2 * channels)

    def _scale_shift(self, features: torch.Tensor, valid) -> tuple[torch.Tensor, torch.Tensor]:
        raw, shift = self.net(features, valid).chunk(2, dim=1)
        return _masked(bounded_log_scale(raw, self.clamp), valid), shift

    def forward(self, x, features, logdet, valid=None):
        s, t = self._scale_shift(features, valid)
        return x * torch.exp(s) + t, logdet + _sum_per_sample(s)

    def inverse(self, y, features, valid=None):
        s, t = self._scale_shift(features, valid)
        return (y - t) * torch.exp(-s)


class ConditionalCoupling(nn.Module):
    """Conditional affine coupling: [ŝ, t] = H([x_a, Cond(y)]), x_b' = x_b·exp(s) + t, x_a unchanged (Dinh 2017)."""

    def __init__(self, channels: int, cond_channels: int, hidden: int, clamp: float, transform_first: bool):
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling layer needs at least 2 channels, got {channels}")
        self.clamp = clamp
        self.split = channels // 2
        # which half is transformed alternates from step to step, so every channel gets transformed
        self.transform_first = transform_first
        transformed = self.split if transform_first else channels - self.split
        self.net = ConvNet(channels - transformed + cond_channels, hidden, 2 * transformed)

    def _halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept, transformed) halves of x."""
        first, second = x[:, : self.split], x[:, self.split :]
        return (second, first) if self.transform_first else (first, second)

    def _join(self, kept: torch.Tensor, transformed: torch.Tensor) -> torch.Tensor:
        return torch.cat([transformed, kept] if self.transform_first else [kept, transformed], dim=1)

    def _scale_shift(self, kept, features, valid):
        raw, shift = self.net(torch.cat([kept, features], dim=1), valid).chunk(2, dim=1)
        return _masked(bounded_log_scale(raw, self.clamp), valid), shift

    def forward(self, x, features, logdet, valid=None):
        kept, moved = self._halves(x)
        s, t = self._scale_shift(kept, features, valid)
        return self._join(kept, moved * torch.exp(s) + t), logdet + _sum_per_sample(s)

    def inverse(self, y, features, valid=None):
        kept, moved = self._halves(y)
        s, t = self._scale_shift(kept, features, valid)
        return self._join(kept, (moved - t) * torch.exp(-s))


class FlowStep(nn.Module):
    """One step: actnorm → invertible 1×1 conv → affine injector → conditional affine coupling."""

    def __init__(self, channels, cond_channels, hidden, clamp, generator, transform_first: bool):
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.invconv = InvertibleConv1x1(channels, generator)
        self.injector = AffineInjector(channels, cond_channels, hidden, clamp)
        self.coupling = ConditionalCoupling(channels, cond_channels, hidden, clamp, transform_first)

    def forward(self, x, features, logdet, valid=None):
        x, logdet = self.actnorm(x, logdet, valid)
        x, logdet = self.invconv(x, logdet, valid)
        x, logdet = self.injector(x, features, logdet, valid)
        return self.coupling(x, features, logdet, valid)

    def inverse(self, y, features, valid=None):
        y = self.coupling.inverse(y, features, valid)
        y = self.injector.inverse(y, features, valid)
        y = self.invconv.inverse(y)
        return self.actnorm.inverse(y, valid)


class ConditionEncoder(nn.Module):
    """Cond network of one level: 3×3 conv, then `downsamplings` stride-2 3×3 convs, each with LeakyReLU(0.2),
    plus a 1×1 projection of the SR encoder's features at this resolution (when it has any)."""

    def __init__(self, in_channels: int, width: int, downsamplings: int, feature_channels: int = 0):
        super().__init__()
        self.first = nn.Conv2d(in_channels, width, 3, padding=1)
        self.downs = nn.ModuleList(nn.Conv2d(width, width, 3, stride=2, padding=1) for _ in range(downsamplings))
        self.project = nn.Conv2d(feature_channels, width, 1) if feature_channels else None

    def forward(self, cond: torch.Tensor, feature: torch.Tensor | None, valids: list) -> torch.Tensor:
        h = _masked(F.leaky_relu(self.first(_masked(cond, valids[0])), 0.2), valids[0])
        for i, down in enumerate(self.downs, start=1):
            h = _masked(F.leaky_relu(down(h), 0.2), valids[i])
        if self.project is not None:
            if feature is None:
                raise ValueError("this flow is conditioned on the SR encoder's features: pass enc_features")
            h = h + _masked(self.project(feature.to(h.dtype)), valids[len(self.downs)])
        return h




def _validate_config(cfg: FlowConfig) -> None:
    """Refuse configurations the architecture cannot build, saying what was expected."""
    if cfg.levels < 1:
        raise ValueError(f"levels must be ≥ 1, got {cfg.levels}")
    if cfg.image_size < 1 or cfg.image_size % 2**cfg.levels:
        raise ValueError(f"image_size={cfg.image_size} must be a positive multiple of 2**levels = {2**cfg.levels}")
    for name in ("in_channels", "cond_channels", "steps_per_level", "hidden_channels", "cond_hidden"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be ≥ 1, got {getattr(cfg, name)}")
    if cfg.feature_channels and len(cfg.feature_channels) < cfg.levels + 1:
        raise ValueError(f"feature_channels {cfg.feature_channels} must give one entry per flow level "
                         f"(0 … {cfg.levels})")
    if not cfg.clamp > 0:
        raise ValueError(f"clamp must be > 0, got {cfg.clamp}")


def latent_shapes(cfg: FlowConfig, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """(level, C, H, W) of each piece of z in flattening order: the split-off halves, then the last level's."""
    shapes = []
    channels, h, w = cfg.in_channels, height, width
    for level in range(1, cfg.levels + 1):
        channels, h, w = 4 * channels, h // 2, w // 2
        if level < cfg.levels:
            shapes.append((level, channels - channels // 2, h, w))
            channels //= 2
    shapes.append((cfg.levels, channels, h, w))
    return shapes


def _prior_net(in_channels: int, latent_channels: int) -> nn.Conv2d:
    """Conditional prior (μ, log σ) of one latent piece from the condition features; zero-initialised: N(0, I)."""
    conv = nn.Conv2d(in_channels, 2 * latent_channels, 3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ConditionalFlow(nn.Module):
    """FTDDM's conditional flow x ↔ z given c (and encoder features), conditional diagonal Gaussian prior."""

    def __init__(self, config: FlowConfig):
        super().__init__()
        _validate_config(config)
        self.config = config
        cfg = config
        generator = torch.Generator().manual_seed(INVCONV_SEED)
        feats = tuple(cfg.feature_channels) or (0,) * (cfg.levels + 1)
        # one condition network per level, computed once per pass and shared by that level's layers
        self.cond_encoders = nn.ModuleList(
            ConditionEncoder(cfg.cond_channels, cfg.cond_hidden, level, feats[level])
            for level in range(cfg.levels + 1)
        )
        self.level0_actnorm = ActNorm(cfg.in_channels)
        self.level0_injector = AffineInjector(cfg.in_channels, cfg.cond_hidden, cfg.hidden_channels, cfg.clamp)
        self.levels = nn.ModuleList()
        channels = cfg.in_channels
        for level in range(1, cfg.levels + 1):
            channels *= 4
            steps = [
                FlowStep(channels, cfg.cond_hidden, cfg.hidden_channels, cfg.clamp, generator, step % 2 == 1)
                for step in range(cfg.steps_per_level)
            ]
            self.levels.append(nn.ModuleList(steps))
            if level < cfg.levels:
                channels //= 2
        self.prior_nets = nn.ModuleList(_prior_net(cfg.cond_hidden, c)
                                        for _, c, _, _ in latent_shapes(cfg, cfg.image_size, cfg.image_size))

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this (one 2×2 squeeze per level)."""
        return 2 ** self.config.levels

    # ------------------------------------------------------------------ input checks
    def _check_cond(self, cond: torch.Tensor, valid=None) -> None:
        cfg, m = self.config, self.size_multiple
        if not isinstance(cond, torch.Tensor) or cond.dim() != 4 or cond.shape[1] != cfg.cond_channels:
            got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(f"cond must have shape (B, {cfg.cond_channels}, H, W), got {got}")
        h, w = cond.shape[-2:]
        if h < m or w < m or h % m or w % m:
            raise ValueError(f"image size {h}×{w} must be a positive multiple of 2**levels = {m} in both axes "
                             "(pad it, e.g. with FTDDM.sample, which pads and crops for you)")
        if valid is not None and tuple(valid.shape) != (cond.shape[0], 1, h, w):
            raise ValueError(f"valid must have shape ({cond.shape[0]}, 1, {h}, {w}), got {tuple(valid.shape)}")

    def _check_x(self, x: torch.Tensor, cond: torch.Tensor, valid=None) -> None:
        cfg = self.config
        self._check_cond(cond, valid)
        expected = (cfg.in_channels, *cond.shape[-2:])
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}) like cond, got {got}")
        if x.shape[0] != cond.shape[0]:
            raise ValueError(f"x and cond must have the same batch size, got {x.shape[0]} and {cond.shape[0]}")

    def _check_z(self, z: torch.Tensor, cond: torch.Tensor, valid=None) -> None:
        self._check_cond(cond, valid)
        dim = self.z_dim(*cond.shape[-2:])
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != dim:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must have shape (B, {dim}), got {got}")
        if z.shape[0] != cond.shape[0]:
            raise ValueError(f"z and cond must have the same batch size, got {z.shape[0]} and {cond.shape[0]}")

    def z_dim(self, height: int | None = None, width: int | None = None) -> int:
        """D, the number of latent dimensions (= in_channels·H·W; H = W = image_size by default)."""
        height = height or self.config.image_size
        width = width or height
        return self.config.in_channels * height * width

    # ------------------------------------------------------------------ the bijection
    def context(self, cond: torch.Tensor, enc_features=None, valid=None) -> tuple[list, list]:
        """(condition features per level, valid masks per level) — computed once per pass."""
        valids = valid_pyramid(valid, self.config.levels + 1)
        if enc_features is None:
            enc_features = [None] * (self.config.levels + 1)
        feats = [enc(cond, enc_features[level], valids) for level, enc in enumerate(self.cond_encoders)]
        return feats, valids

    def forward(self, x: torch.Tensor, cond: torch.Tensor, enc_features=None, valid=None):
        """z = F(x; c) flattened to (B, D) and log|det ∂z/∂x| of shape (B,)."""
        self._check_x(x, cond, valid)
        z, logdet, _ = self._forward(x, *self.context(cond, enc_features, valid))
        return z, logdet

    def _forward(self, x, features, valids):
        logdet = x.new_zeros(x.shape[0])
        h, logdet = self.level0_actnorm(_masked(x, valids[0]), logdet, valids[0])
        h, logdet = self.level0_injector(h, features[0], logdet, valids[0])
        pieces = []
        for level, steps in enumerate(self.levels, start=1):
            h = F.pixel_unshuffle(h, 2)  # squeeze: 2×2 space-to-depth
            for step in steps:
                h, logdet = step(h, features[level], logdet, valids[level])
            if level < len(self.levels):
                keep = h.shape[1] // 2
                pieces.append(h[:, keep:])
                h = h[:, :keep]
        pieces.append(h)
        return torch.cat([p.flatten(1) for p in pieces], dim=1), logdet, pieces

    def inverse(self, z: torch.Tensor, cond: torch.Tensor, enc_features=None, valid=None) -> torch.Tensor:
        """x = F⁻¹(z; c), (B, in_channels, H, W), for z of shape (B, D)."""
        self._check_z(z, cond, valid)
        return self._inverse(self._unflatten(z, *cond.shape[-2:]), *self.context(cond, enc_features, valid))

    def _inverse(self, pieces, features, valids):
        pieces = list(pieces)
        h = pieces.pop()
        for level in range(len(self.levels), 0, -1):
            if level < len(self.levels):
                h = torch.cat([h, pieces.pop()], dim=1)
            for step in reversed(self.levels[level - 1]):
                h = step.inverse(h, features[level], valids[level])
            h = F.pixel_shuffle(h, 2)
        h = self.level0_injector.inverse(h, features[0], valids[0])
        return _masked(self.level0_actnorm.inverse(h, valids[0]), valids[0])

    def _unflatten(self, z: torch.Tensor, height: int, width: int) -> list[torch.Tensor]:
        """Split a flat (B, D) z back into its per-level (B, C, H, W) pieces."""
        shapes = latent_shapes(self.config, height, width)
        chunks = torch.split(z, [c * h * w for _, c, h, w in shapes], dim=1)
        return [chunk.reshape(z.shape[0], c, h, w) for chunk, (_, c, h, w) in zip(chunks, shapes)]

    # ------------------------------------------------------------------ density and sampling
    def prior_params(self, features, valids, height: int, width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(μ, log σ) of every latent piece, from the condition features at its resolution (0 on padding)."""
        out = []
        for net, (level, _, _, _) in zip(self.prior_nets, latent_shapes(self.config, height, width)):
            mean, log_std = net(features[level]).chunk(2, dim=1)
            out.append((_masked(mean, valids[level]), _masked(log_std, valids[level])))
        return out

    def _draw_noise(self, cond, generator, valid) -> list[torch.Tensor]:
        """ε ~ N(0, I) for every latent piece: one flat draw per row over the *unpadded* image's latent (its
        size read off the bottom/right padding of `valid`), zero-padded, so padding never changes a sample."""
        height, width = cond.shape[-2:]
        h, w = height, width
        if valid is not None:
            h, w = valid_size(valid)
        m = self.size_multiple
        h, w = -(-h // m) * m, -(-w // m) * m  # the unpadded image rounded up to the flow's multiple
        rows = generator if isinstance(generator, (list, tuple)) else None
        dim = self.z_dim(h, w)
        if rows is not None:
            flat = torch.cat([torch.randn((1, dim), generator=g, device=cond.device, dtype=cond.dtype) for g in rows])
        else:
            flat = torch.randn((cond.shape[0], dim), generator=generator, device=cond.device, dtype=cond.dtype)
        pieces = self._unflatten(flat, h, w)
        full = latent_shapes(self.config, height, width)
        return [F.pad(p, (0, fw - p.shape[-1], 0, fh - p.shape[-2])) for p, (_, _, fh, fw) in zip(pieces, full)]

    @staticmethod
    def _gaussian_log_prob(z, mean, log_std, valid=None) -> torch.Tensor:
        normalised = (z - mean) * torch.exp(-log_std)
        # padded latent entries are not part of the image's density
        return _sum_per_sample(_masked(-0.5 * normalised**2 - log_std - 0.5 * math.log(2 * math.pi), valid))

    def log_prob(self, x: torch.Tensor, cond: torch.Tensor, enc_features=None, valid=None) -> torch.Tensor:
        """log p(x | c) = Σ log N(z_l; μ_l(c), σ_l(c)) + log|det ∂F/∂x| (change of variables), nats, (B,)."""
        self._check_x(x, cond, valid)
        features, valids = self.context(cond, enc_features, valid)
        _, logdet, pieces = self._forward(x, features, valids)
        params = self.prior_params(features, valids, *x.shape[-2:])
        levels = [level for level, _, _, _ in latent_shapes(self.config, *x.shape[-2:])]
        return sum(self._gaussian_log_prob(z, m, s, valids[level])
                   for z, (m, s), level in zip(pieces, params, levels)) + logdet

    def nll_bits_per_dim(self, x: torch.Tensor, cond: torch.Tensor, enc_features=None, valid=None) -> torch.Tensor:
        """−log p(x | c) / (D·ln 2): negative log-likelihood in bits per dimension, (B,)."""
        return -self.log_prob(x, cond, enc_features, valid) / (x[0].numel() * math.log(2.0))

    def sample(self, cond: torch.Tensor, tau: float = 1.0, generator=None, enc_features=None,
               valid=None) -> torch.Tensor:
        """x = F⁻¹(μ(c) + τ·σ(c)·ε; c), ε ~ N(0, I); τ scales the std, τ = 0 gives the mode x̂ (reference §5).

        generator: None, one torch.Generator, or a list with one generator per batch row (each row's noise
        then depends only on its own generator, so batching never changes a sample). Differentiable in the
        parameters (reparameterised), so a loss on samples trains the flow.
        """
        self._check_cond(cond, valid)
        if tau < 0:
            raise ValueError(f"tau must be ≥ 0, got {tau}")
        per_row = isinstance(generator, (list, tuple))
        if per_row and len(generator) != cond.shape[0]:
            raise ValueError(f"need one generator per batch row ({cond.shape[0]}), got {len(generator)}")
        for g in (generator if per_row else [generator]):
            if g is not None and g.device.type != cond.device.type:
                raise ValueError(f"generator must live on cond's device ({cond.device}), got {g.device}")
        features, valids = self.context(cond, enc_features, valid)
        height, width = cond.shape[-2:]
        params = self.prior_params(features, valids, height, width)
        if tau > 0:
            eps = self._draw_noise(cond, generator, valid)
        pieces = []
        for j, ((level, _, _, _), (mean, log_std)) in enumerate(zip(latent_shapes(self.config, height, width),
                                                                     params)):
            z = mean if tau == 0 else mean + tau * torch.exp(log_std) * _masked(eps[j], valids[level])
            pieces.append(z)
        return self._inverse(pieces, features, valids)
