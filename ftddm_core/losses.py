"""Training losses of FTDDM v2: encoder L1, truncated ε-MSE for the UNet, NLL + guide for the flow (reference §3–4)."""
from __future__ import annotations

import torch

from .schedule import DiffusionSchedule

#: MS-SSIM on 64×64 maps: 3 scales with a 3×3 window (the default 5 scales × 11×11 needs > 160 px).
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001)
MS_SSIM_WINDOW = 3


def masked_l1(x: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean |x − target| over the mask's pixels (slices with small masks are not down-weighted to nothing)."""
    return ((x - target) * mask).abs().sum() / mask.sum().clamp_min(1.0)


def encoder_loss(model, x0, cond, scale):
    """The SR encoder's L1 to x0 inside the mask; returns (loss, x̂0_enc, features) (SRFlow's RRDB pre-training)."""
    x0_enc, features = model.encode(cond, scale)
    return masked_l1(x0_enc, x0, cond[:, 1:2]), x0_enc, features


def diffusion_loss(model, schedule: DiffusionSchedule, x0, cond, scale, x0_enc, t_trunc: int, generator=None):
    """ε-MSE with t ~ U{0, …, Ttrunc} and masked noise x_t = √ᾱ x0 + √(1−ᾱ)(ε⊙M) (Ho et al. eq. 14).

    The ε-UNet is conditioned on [y, x̂0_enc]. The chain starts at index Ttrunc, so the UNet must also be
    trained at Ttrunc (inclusive range).
    """
    mask = cond[:, 1:2]
    t = torch.randint(0, t_trunc + 1, (x0.shape[0],), device=x0.device, generator=generator)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator) * mask
    x_t = schedule.q_sample(x0, t, eps)
    eps_hat = model.denoiser(cond, x0_enc, scale)(x_t, t) * mask
    return ((eps_hat - eps) ** 2).sum() / mask.sum().clamp_min(1.0)


def flow_target(schedule: DiffusionSchedule, x0, t_trunc: int, generator=None):
    """x at index Ttrunc with unmasked noise: √ᾱ x0 + √(1−ᾱ) ε.

    Noise everywhere (not only inside M) keeps the flow's density non-degenerate where x0 ≡ 0;
    the flow's output is masked at sampling time, so this changes nothing inside M.
    """
    t = torch.full((x0.shape[0],), t_trunc, device=x0.device, dtype=torch.long)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    return schedule.q_sample(x0, t, eps)


def guide_loss(x_hat, target, mask, alpha: float = 0.84, data_range: float = 1.0):
    """(1−α)·L1 + α·(1 − MS-SSIM) between masked images (reference §4, α = 0.84)."""
    from pytorch_msssim import ms_ssim  # training only: inference never needs it

    x_hat, target = x_hat * mask, target * mask
    msssim = ms_ssim(x_hat.float(), target.float(), data_range=data_range, win_size=MS_SSIM_WINDOW,
                     weights=list(MS_SSIM_WEIGHTS))
    return (1 - alpha) * masked_l1(x_hat, target, mask) + alpha * (1 - msssim)


def flow_loss(model, schedule: DiffusionSchedule, x0, cond, x0_enc, features, t_trunc: int, *,
              guide_weight: float = 10.0, guide_alpha: float = 0.84, generator=None):
    """Flow stage: NLL of x_Ttrunc (nats per in-mask pixel) + λ·guide(mode, √ᾱ·x0); returns (total, nll, guide).

    The NLL is normalised by the number of mask pixels: outside M the target is pure noise, which the
    conditional prior (it sees M) models exactly at once, so it adds a constant, not a competing gradient.
    The guide is applied to the flow's mode (τ = 0, paper §2.3): it fixes where the distribution sits; its
    spread is the NLL's, which is why sampling defaults to the trained τ_f = 1.
    """
    mask = cond[:, 1:2]
    target = flow_target(schedule, x0, t_trunc, generator)
    nll = -model.flow_log_prob(target, cond, x0_enc, features).sum() / mask.sum().clamp_min(1.0)
    if guide_weight == 0:
        return nll, nll.detach(), torch.zeros((), device=x0.device)
    x_hat = model.flow_sample(cond, x0_enc, features, tau=0.0)
    guide = guide_loss(x_hat, model.flow_shift_factor * x0, mask, alpha=guide_alpha)  # E[x_Ttrunc | x0]
    return nll + guide_weight * guide, nll.detach(), guide.detach()
