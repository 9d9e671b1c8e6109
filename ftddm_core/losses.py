"""Training losses: truncated ε-MSE for the UNet and NLL + guide for the flow (reference §3–4)."""
from __future__ import annotations

import math

import torch
from pytorch_msssim import ms_ssim

from .schedule import DiffusionSchedule

#: MS-SSIM on 64×64 maps: 3 scales with a 3×3 window (the default 5 scales × 11×11 needs > 160 px).
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001)
MS_SSIM_WINDOW = 3


def diffusion_loss(unet, schedule: DiffusionSchedule, x0, cond, scale, t_trunc: int, generator=None):
    """ε-MSE with t ~ U{0, …, Ttrunc} and masked noise x_t = √ᾱ x0 + √(1−ᾱ)(ε⊙M) (Ho et al. eq. 14).

    The chain starts at index Ttrunc, so the UNet must also be trained at Ttrunc (inclusive range).
    """
    mask = cond[:, 1:2]
    t = torch.randint(0, t_trunc + 1, (x0.shape[0],), device=x0.device, generator=generator)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator) * mask
    x_t = schedule.q_sample(x0, t, eps)
    eps_hat = unet(x_t, t, cond, scale) * mask
    # Mean over in-mask pixels: slices with small masks are not down-weighted to nothing.
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
    x_hat, target = x_hat * mask, target * mask
    l1 = (x_hat - target).abs().sum() / mask.sum().clamp_min(1.0)
    msssim = ms_ssim(x_hat.float(), target.float(), data_range=data_range, win_size=MS_SSIM_WINDOW,
                     weights=list(MS_SSIM_WEIGHTS))
    return (1 - alpha) * l1 + alpha * (1 - msssim)


def flow_loss(flow, schedule: DiffusionSchedule, x0, cond, t_trunc: int, *, guide_weight: float = 10.0,
              guide_alpha: float = 0.84, generator=None):
    """Flow stage: NLL in nats per pixel + λ·guide(x̂(z=μ), √ᾱ·x0), returning (total, nll, guide)."""
    target = flow_target(schedule, x0, t_trunc, generator)
    nll = -flow.log_prob(target, cond).mean() / x0[0].numel()
    if guide_weight == 0:
        return nll, nll.detach(), torch.zeros((), device=x0.device)
    x_hat = flow.sample(cond, tau=0.0)  # the mode, τ_f = 0
    mean_target = math.sqrt(schedule.alphas_cumprod[t_trunc]) * x0  # E[x_Ttrunc | x0]
    guide = guide_loss(x_hat, mean_target, cond[:, 1:2], alpha=guide_alpha)
    return nll + guide_weight * guide, nll.detach(), guide.detach()



def regression_loss(unet, x0, cond, scale):
    """Deterministic UNet baseline: x̂0 = UNet(0, t=0, y, s) in one pass, L1 to x0 inside the mask."""
    mask = cond[:, 1:2]
    t = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
    out = unet(torch.zeros_like(x0), t, cond, scale) * mask
    return (out - x0 * mask).abs().sum() / mask.sum().clamp_min(1.0)
