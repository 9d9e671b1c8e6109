"""Conditional multi-scale normalizing flow of FTDDM (reference §4; SRFlow-like, Lugmayr et al. 2020).

Maps the noisy image x at the truncation index, (B, 1, H, W), to a latent z, (B, D) with D = H·W, given the
condition y = [LR_zf, M, T1, FLAIR], (B, 4, H, W). Level 0 works at full resolution on one channel
(actnorm → affine injector); each of the ``levels`` further levels starts with a 2×2 squeeze and runs
``steps_per_level`` steps of [actnorm → invertible 1×1 conv → affine injector → conditional affine coupling];
after every level but the last, half of the channels leave as part of z. The prior over the flattened z is a
learned diagonal Gaussian N(μ_z, σ_z). Math only; device and dtype follow the inputs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import FlowConfig

#: Seed of the generator that draws the random orthogonal initial 1×1 convolutions (reproducible models).
INVCONV_SEED = 1234


def count_parameters(module: nn.Module) -> int:
    """Number of scalars in all parameters of a module (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


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

    def _logdet(self, x: torch.Tensor) -> torch.Tensor:
        """log|det| = H·W·Σ_c log|scale_c|."""
        return x.shape[2] * x.shape[3] * self.log_scale.sum()

    def forward(self, x: torch.Tensor, logdet: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not bool(self.initialized):
            self.initialize_from(x)
        return (x + self.bias) * torch.exp(self.log_scale), logdet + self._logdet(x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.log_scale) - self.bias


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

    def forward(self, x: torch.Tensor, logdet: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight()
        y = F.conv2d(x, w[:, :, None, None])
        return y, logdet + x.shape[2] * x.shape[3] * self.log_s.sum()

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        w_inv = _matrix_inverse(self.weight())
        return F.conv2d(y, w_inv[:, :, None, None])


def _matrix_inverse(w: torch.Tensor) -> torch.Tensor:
    """Differentiable inverse of a small matrix, computed in float64 (on the CPU for MPS, which lacks float64)."""
    if w.device.type == "mps":
        return torch.linalg.inv(w.cpu().double()).to(device=w.device, dtype=w.dtype)
    return torch.linalg.inv(w.double()).to(w.dtype)


def _conv_net(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    """H of the injector/coupling: 3×3 conv → LReLU → 3×3 conv → LReLU → zero-initialised 3×3 conv."""
    last = nn.Conv2d(hidden, out_channels, 3, padding=1)
    nn.init.zeros_(last.weight)  # zero output ⇒ s = 0 and t = 0 ⇒ every step starts as the identity
    nn.init.zeros_(last.bias)
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(hidden, hidden, 3, padding=1),
        nn.LeakyReLU(0.2),
        last,
    )


class AffineInjector(nn.Module):
    """Affine injector: [ŝ, t] = H(Cond(y)); y' = x·exp(s) + t, s = clamp·(2σ(ŝ)−1); log|det| = Σ s (SRFlow)."""

    def __init__(self, channels: int, cond_channels: int, hidden: int, clamp: float):
        super().__init__()
        self.clamp = clamp
        self.net = _conv_net(cond_channels, hidden, 2 * channels)

    def _scale_shift(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw, shift = self.net(features).chunk(2, dim=1)
        return bounded_log_scale(raw, self.clamp), shift

    def forward(self, x, features, logdet):
        s, t = self._scale_shift(features)
        return x * torch.exp(s) + t, logdet + _sum_per_sample(s)

    def inverse(self, y, features):
        s, t = self._scale_shift(features)
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
        self.net = _conv_net(channels - transformed + cond_channels, hidden, 2 * transformed)

    def _halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept, transformed) halves of x."""
        first, second = x[:, : self.split], x[:, self.split :]
        return (second, first) if self.transform_first else (first, second)

    def _join(self, kept: torch.Tensor, transformed: torch.Tensor) -> torch.Tensor:
        return torch.cat([transformed, kept] if self.transform_first else [kept, transformed], dim=1)

    def _scale_shift(self, kept, features):
        raw, shift = self.net(torch.cat([kept, features], dim=1)).chunk(2, dim=1)
        return bounded_log_scale(raw, self.clamp), shift

    def forward(self, x, features, logdet):
        kept, moved = self._halves(x)
        s, t = self._scale_shift(kept, features)
        return self._join(kept, moved * torch.exp(s) + t), logdet + _sum_per_sample(s)

    def inverse(self, y, features):
        kept, moved = self._halves(y)
        s, t = self._scale_shift(kept, features)
        return self._join(kept, (moved - t) * torch.exp(-s))


class FlowStep(nn.Module):
    """One step: actnorm → invertible 1×1 conv → affine injector → conditional affine coupling."""

    def __init__(self, channels, cond_channels, hidden, clamp, generator, transform_first: bool):
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.invconv = InvertibleConv1x1(channels, generator)
        self.injector = AffineInjector(channels, cond_channels, hidden, clamp)
        self.coupling = ConditionalCoupling(channels, cond_channels, hidden, clamp, transform_first)

    def forward(self, x, features, logdet):
        x, logdet = self.actnorm(x, logdet)
        x, logdet = self.invconv(x, logdet)
        x, logdet = self.injector(x, features, logdet)
        return self.coupling(x, features, logdet)

    def inverse(self, y, features):
        y = self.coupling.inverse(y, features)
        y = self.injector.inverse(y, features)
        y = self.invconv.inverse(y)
        return self.actnorm.inverse(y)


def condition_encoder(in_channels: int, width: int, downsamplings: int) -> nn.Sequential:
    """Cond network of one level: 3×3 conv, then `downsamplings` stride-2 3×3 convs, each with LeakyReLU(0.2)."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.LeakyReLU(0.2)]
    for _ in range(downsamplings):
        layers += [nn.Conv2d(width, width, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers)


def _validate_config(cfg: FlowConfig) -> None:
    """Refuse configurations the architecture cannot build, saying what was expected."""
    if cfg.levels < 1:
        raise ValueError(f"levels must be ≥ 1, got {cfg.levels}")
    if cfg.image_size < 1 or cfg.image_size % 2**cfg.levels:
        raise ValueError(f"image_size={cfg.image_size} must be a positive multiple of 2**levels = {2**cfg.levels}")
    for name in ("in_channels", "cond_channels", "steps_per_level", "hidden_channels", "cond_hidden"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be ≥ 1, got {getattr(cfg, name)}")
    if not cfg.clamp > 0:
        raise ValueError(f"clamp must be > 0, got {cfg.clamp}")


def _latent_shapes(cfg: FlowConfig) -> list[tuple[int, int, int]]:
    """(C, H, W) of each piece of z in flattening order: the split-off halves, then the last level's output."""
    shapes = []
    channels, size = cfg.in_channels, cfg.image_size
    for level in range(1, cfg.levels + 1):
        channels, size = 4 * channels, size // 2
        if level < cfg.levels:
            shapes.append((channels - channels // 2, size, size))
            channels //= 2
    shapes.append((channels, size, size))
    return shapes


class ConditionalFlow(nn.Module):
    """FTDDM's conditional flow x ↔ z given y, with a learned diagonal Gaussian prior (reference §4)."""

    def __init__(self, config: FlowConfig):
        super().__init__()
        _validate_config(config)
        self.config = config
        cfg = config
        generator = torch.Generator().manual_seed(INVCONV_SEED)
        # one condition network per level, computed once per pass and shared by that level's layers
        self.cond_encoders = nn.ModuleList(
            condition_encoder(cfg.cond_channels, cfg.cond_hidden, level) for level in range(cfg.levels + 1)
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
        self.latent_shapes = _latent_shapes(cfg)
        dim = sum(c * h * w for c, h, w in self.latent_shapes)
        self.prior_mean = nn.Parameter(torch.zeros(dim))
        self.prior_log_std = nn.Parameter(torch.zeros(dim))

    @property
    def z_dim(self) -> int:
        """D, the number of latent dimensions (= in_channels·H·W)."""
        return self.prior_mean.numel()

    # ------------------------------------------------------------------ input checks
    def _check_cond(self, cond: torch.Tensor) -> None:
        cfg = self.config
        expected = (cfg.cond_channels, cfg.image_size, cfg.image_size)
        if not isinstance(cond, torch.Tensor) or cond.dim() != 4 or tuple(cond.shape[1:]) != expected:
            got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(f"cond must have shape (B, {', '.join(map(str, expected))}), got {got}")

    def _check_x(self, x: torch.Tensor, cond: torch.Tensor) -> None:
        cfg = self.config
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}), got {got}")
        self._check_cond(cond)
        if x.shape[0] != cond.shape[0]:
            raise ValueError(f"x and cond must have the same batch size, got {x.shape[0]} and {cond.shape[0]}")

    def _check_z(self, z: torch.Tensor, cond: torch.Tensor) -> None:
        self._check_cond(cond)
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != self.z_dim:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must have shape (B, {self.z_dim}), got {got}")
        if z.shape[0] != cond.shape[0]:
            raise ValueError(f"z and cond must have the same batch size, got {z.shape[0]} and {cond.shape[0]}")

    # ------------------------------------------------------------------ the bijection
    def condition_features(self, cond: torch.Tensor) -> list[torch.Tensor]:
        """Cond(y) at every level's resolution (level 0 = full resolution)."""
        return [encoder(cond) for encoder in self.cond_encoders]

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z = F(x; y) flattened to (B, D) and log|det ∂z/∂x| of shape (B,)."""
        self._check_x(x, cond)
        features = self.condition_features(cond)
        logdet = x.new_zeros(x.shape[0])
        h, logdet = self.level0_actnorm(x, logdet)
        h, logdet = self.level0_injector(h, features[0], logdet)
        pieces = []
        for level, steps in enumerate(self.levels, start=1):
            h = F.pixel_unshuffle(h, 2)  # squeeze: 2×2 space-to-depth
            for step in steps:
                h, logdet = step(h, features[level], logdet)
            if level < len(self.levels):
                keep = h.shape[1] // 2
                pieces.append(h[:, keep:])
                h = h[:, :keep]
        pieces.append(h)
        return torch.cat([p.flatten(1) for p in pieces], dim=1), logdet

    def inverse(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x = F⁻¹(z; y), (B, in_channels, H, W), for z of shape (B, D)."""
        self._check_z(z, cond)
        features = self.condition_features(cond)
        pieces = self._unflatten(z)
        h = pieces.pop()
        for level in range(len(self.levels), 0, -1):
            if level < len(self.levels):
                h = torch.cat([h, pieces.pop()], dim=1)
            for step in reversed(self.levels[level - 1]):
                h = step.inverse(h, features[level])
            h = F.pixel_shuffle(h, 2)
        h = self.level0_injector.inverse(h, features[0])
        return self.level0_actnorm.inverse(h)

    def _unflatten(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Split a flat (B, D) z back into its per-level (B, C, H, W) pieces."""
        sizes = [c * h * w for c, h, w in self.latent_shapes]
        chunks = torch.split(z, sizes, dim=1)
        return [chunk.reshape(z.shape[0], *shape) for chunk, shape in zip(chunks, self.latent_shapes)]

    # ------------------------------------------------------------------ density and sampling
    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; μ_z, diag σ_z²) summed over the D dimensions, shape (B,)."""
        normalised = (z - self.prior_mean) * torch.exp(-self.prior_log_std)
        per_dim = -0.5 * normalised**2 - self.prior_log_std - 0.5 * math.log(2 * math.pi)
        return per_dim.sum(dim=1)

    def log_prob(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """log p(x | y) = log N(F(x; y); μ_z, σ_z) + log|det ∂F/∂x| (change of variables), natural log, (B,)."""
        z, logdet = self(x, cond)
        return self.prior_log_prob(z) + logdet

    def nll_bits_per_dim(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """−log p(x | y) / (D·ln 2): negative log-likelihood in bits per dimension, (B,)."""
        return -self.log_prob(x, cond) / (self.z_dim * math.log(2.0))

    def sample(self, cond: torch.Tensor, tau: float = 1.0, generator=None) -> torch.Tensor:
        """x = F⁻¹(μ_z + τ·σ_z·ε; y), ε ~ N(0, I); τ scales the std, τ = 0 gives the mode x̂ (reference §5).

        generator: None, one torch.Generator, or a list with one generator per batch row (each row's noise
        then depends only on its own generator, so batching never changes a sample).
        """
        self._check_cond(cond)
        if tau < 0:
            raise ValueError(f"tau must be ≥ 0, got {tau}")
        generators = generator if isinstance(generator, (list, tuple)) else [generator]
        if isinstance(generator, (list, tuple)) and len(generators) != cond.shape[0]:
            raise ValueError(f"need one generator per batch row ({cond.shape[0]}), got {len(generators)}")
        for g in generators:
            if g is not None and g.device.type != cond.device.type:
                raise ValueError(f"generator must live on cond's device ({cond.device}), got {g.device}")
        mean = self.prior_mean.expand(cond.shape[0], -1)
        if tau == 0:
            z = mean
        else:
            rows = [mean.shape] if len(generators) == 1 and not isinstance(generator, (list, tuple)) \
                else [(1, mean.shape[1])] * len(generators)
            eps = torch.cat([torch.randn(shape, generator=g, device=mean.device, dtype=mean.dtype)
                             for shape, g in zip(rows, generators)])
            z = mean + tau * torch.exp(self.prior_log_std) * eps
        return self.inverse(z, cond)
