"""The compared methods as RunSpecs, and how a spec becomes runnable for the loaded models (its NFE, parameters)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from ..chains import chain_nfe, noise_start_index

if TYPE_CHECKING:
    from .runs import LoadedModel

# the shipped default sampler (SuperResolveOptions()): the flow's mode re-noised to t = 10, ancestral (NFE 11)
REFERENCE = "ftddm_anc_10"
HEADLINE_DDPM = "ddpm_full"
SSIM_MARGIN, NFE_FACTOR = 0.01, 10.0  # headline: within 0.01 SSIM of full-chain DDPM at ≥ 10× fewer NFE
MODEL_ROLES = {"main": "--model", "ddpm": "--ddpm-model", "regression": "--regression-model"}


@dataclass(frozen=True)
class RunSpec:
    """One way of producing outputs: a compared method or a study point (name/label do not affect outputs)."""

    name: str
    label: str
    kind: str  # zero_filled | bicubic | regression | flow | chain
    model: str = "none"  # none | main | ddpm | regression
    sampler: str = ""  # chains: ancestral | ddpm | dpmpp
    start: str = ""  # chains: flow | renoised | noise
    # first chain index; None = the model's Ttrunc (resolve_spec fills it). Non-chains keep 0: the field is part
    # of the cache key (identity), so its value for them must not change.
    t_start: int | None = 0
    steps: int = 0  # solver steps (ddpm, dpmpp)
    tau_d: float = 1.0
    cond_scale: float | None = None  # condition the network on s' instead of the actual s (Fig. 6)

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("name"), d.pop("label")
        return d

    @property
    def stochastic(self) -> bool:
        return self.kind == "chain"


def method_specs(tau_d: float = 0.9) -> dict[str, RunSpec]:
    """The compared methods of the issue (paper Table 1 + ablations); FTDDM chains use τ_d, DDPM τ_d = 1."""
    specs = [
        RunSpec("zero_filled", "Zero-filling", "zero_filled"),
        RunSpec("bicubic", "Bicubic", "bicubic"),
        RunSpec("regression", "UNet regression (one pass; the FTDDM model's SR encoder unless "
                "--regression-model)", "regression", "regression"),
        RunSpec("flow_only", "Flow start ÷ √ᾱ (mode at Ttrunc, not a Ttrunc = 0 flow)", "flow", "main"),
        RunSpec(HEADLINE_DDPM, "DDPM full chain", "chain", "ddpm", "ancestral", "noise", tau_d=1.0),
        RunSpec("ddpm_respaced_100", "DDPM respaced to 100", "chain", "ddpm", "respaced", "noise", steps=100,
                tau_d=1.0),
    ]
    specs += [RunSpec(f"dpmpp_noise_{k}", f"DPM-Solver++ from noise, K = {k}", "chain", "ddpm", "dpmpp", "noise",
                      steps=k) for k in (100, 20, 10)]
    specs.append(RunSpec("dpmpp_sde_noise_100", "SDE-DPM-Solver++(2M) from noise, K = 100", "chain", "ddpm",
                         "dpmpp-sde", "noise", steps=100, tau_d=1.0))
    specs += [RunSpec(f"ftddm_anc_{t}", f"FTDDM Ttrunc = {t} (ancestral)", "chain", "main", "ancestral", "flow",
                      t_start=t, tau_d=tau_d) for t in (100, 50, 20, 10)]
    specs += [RunSpec(f"ftddm_dpmpp_{k}", f"FTDDM + DPM-Solver++ K = {k}", "chain", "main", "dpmpp", "flow",
                      t_start=None, steps=k) for k in (50, 20, 10)]
    specs += [RunSpec(f"ftddm_dpmpp3m_{k}", f"FTDDM + DPM-Solver++(3M) K = {k}", "chain", "main", "dpmpp-3m",
                      "flow", t_start=None, steps=k) for k in (6, 5)]  # the fewer-NFE setting of the speed issue
    return {s.name: s for s in specs}


METHOD_NAMES = tuple(method_specs())


def resolve_spec(spec: RunSpec, models: dict[str, LoadedModel]) -> tuple[RunSpec, str | None]:
    """Fill model-dependent fields (start index, re-noised start) or return why the method cannot run."""
    if spec.model == "none":
        return spec, None
    if spec.model == "regression" and "regression" not in models and "main" in models:
        spec = replace(spec, model="main")  # FTDDM v2: its SR encoder is the one-pass regression, same training
    lm = models.get(spec.model)
    if lm is None:
        why = {"ddpm": "needs a UNet trained on the full chain: no --ddpm-model given (train one with "
                       "`ftddm train --t-trunc 999`)",
               "regression": "no --regression-model given (train one with `ftddm train --config regression`)"}
        return spec, why.get(spec.model, f"no {spec.model} model")
    if spec.kind != "chain":
        return spec, None
    if spec.start == "noise":
        if lm.t_trunc != lm.last_index:
            return spec, (f"starts from pure noise at index {lm.last_index}, but {lm.path.name}'s UNet was trained on "
                          f"t ∈ [0, {lm.t_trunc}] only; pass a model trained with `ftddm train --t-trunc "
                          f"{lm.last_index}` as --ddpm-model")
        spec = replace(spec, t_start=noise_start_index(lm.model.schedule, spec.sampler))  # DPM-Solver++: λ clip
        if spec.sampler == "ancestral":
            spec = replace(spec, label=f"{spec.label} (T = {lm.last_index + 1})")
    else:
        t = lm.t_trunc if spec.t_start is None else spec.t_start
        if t > lm.t_trunc:
            return spec, (f"starts at index {t}, above the flow's index Ttrunc = {lm.t_trunc} of {lm.path.name} "
                          "(needs a flow trained at that index)")
        spec = replace(spec, t_start=t)
        if t < lm.t_trunc:
            spec = replace(spec, start="renoised", label=f"{spec.label}, re-noised flow start")
    if spec.sampler != "ancestral" and not 1 <= spec.steps <= spec.t_start:
        return spec, f"{spec.steps} solver steps do not fit a chain starting at index {spec.t_start}"
    return spec, None


def nfe_of(spec: RunSpec) -> tuple[int, int]:
    """(UNet evaluations, flow passes) per sample chain."""
    if spec.kind == "chain":
        return chain_nfe(spec.sampler, spec.t_start, spec.steps), int(spec.start != "noise")
    return {"regression": (1, 0), "flow": (0, 1)}.get(spec.kind, (0, 0))


def parameters_of(spec: RunSpec, models: dict[str, LoadedModel]) -> int:
    """Parameters of the networks a method uses (UNet and/or flow; 0 for baselines)."""
    lm = models.get(spec.model)
    if lm is None:
        return 0
    if spec.kind == "regression":
        return lm.parameters("encoder")
    if spec.kind == "flow":
        return lm.parameters("encoder") + lm.parameters("flow")
    if spec.kind == "chain" and spec.start != "noise":
        return lm.parameters("encoder") + lm.parameters("unet") + lm.parameters("flow")
    return lm.parameters("encoder") + lm.parameters("unet")
