"""The options of one super-resolution run: `ftddm super-resolve` / `bids` flags, the Python API and the Slicer module.

:class:`SuperResolveOptions` is the single source. The CLI generates its flags (with their help) from the fields,
the Slicer module builds its parameter node from them, and the validation is here. This module imports only
the standard library (and ftddm_core.config, which does too), so the Slicer module can import it before torch
and the engine's other packages are installed.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field

from .config import FTDDMConfig
from .flags import cli_flag

#: sampler → what it does (the CLI help and the Slicer combo box list them in this order; default first)
SAMPLER_HELP = {
    "ancestral": "the paper's Algorithm 1, every index from the chain's start to 0: NFE = t + 1; from the default "
                 "re-noised start at t = 10, NFE 11 (default)",
    "dpmpp": "DPM-Solver++(2M), deterministic given the start: NFE = steps + 1",
    "dpmpp-3m": "DPM-Solver++(3M), third order, deterministic: NFE = steps + 1",
    "respaced": "ancestral (DDPM) sampling respaced to `steps` indices: NFE = steps + 1",
    "dpmpp-sde": "SDE-DPM-Solver++(2M), stochastic: NFE = steps + 1",
    "regression": "the SR encoder's one-pass output: NFE 1, the fastest preview, no uncertainty",
}
SAMPLERS = tuple(SAMPLER_HELP)
#: samplers that inject noise at each step, i.e. the ones τ_d acts on
NOISY_SAMPLERS = ("ancestral", "respaced", "dpmpp-sde")
#: old sampler names → new ones (refused with a message that names the new one)
RENAMED_SAMPLERS = {"ddpm": "respaced"}
START_CHOICES = ("renoised", "flow")  # where super-resolve's chains start (sampling also has "noise"); default first
#: the automatic chain start of start="renoised": the flow's mode re-noised to this index (chosen on fold 0's
#: validation patients, bench/short_chain_validation.json; lowered to the model's Ttrunc when that is smaller)
RENOISED_T_TRUNC = 10
SPACINGS = ("uniform", "logsnr")  # solver steps uniform in index, or uniform in λ = log(α/σ)
DEVICES = ("auto", "cpu", "cuda", "mps")  # "auto": CUDA, then Apple MPS, then CPU; also "cuda:N"
PRECISIONS = ("auto", "fp32", "bf16")  # "auto": bf16 where native and paying (device.choose_precision), else fp32
#: factors s (and F) the shipped models are trained for (FTDDMConfig.scale_range); outside needs `force`
TRAINED_SCALES = next(f.default for f in dataclasses.fields(FTDDMConfig) if f.name == "scale_range")
MAX_FACTOR = 64.0  # sanity bound of F and s even with `force`
MAX_STEPS = 1000  # the diffusion has 1000 indices; a chain from Ttrunc allows at most Ttrunc steps
MAX_SAMPLES = 64
MAX_SEED = 2**31 - 1


def option(default, help: str, *, bounds=None, trained=None, automatic=None, choices=None):
    """A dataclass field with its CLI help (ftddm_core.cli shows it) and its valid values (bounds inclusive; `automatic`: the value meaning "choose
    for me", allowed outside the bounds; `trained`: a narrower range that needs `force` to leave)."""
    return field(default=default, metadata={"help": help, "bounds": bounds, "trained": trained,
                                            "automatic": automatic, "choices": choices})


_SAMPLER_LIST = "; ".join(f"{name}: {text}" for name, text in SAMPLER_HELP.items())
_TRAINED = f"{TRAINED_SCALES[0]:g} … {TRAINED_SCALES[1]:g}"


@dataclass
class SuperResolveOptions:
    """Sampling and geometry options of one run (CLI flag = field name with '_' → '-')."""

    factor: float = option(
        0.0, "in-plane output factor F: each in-plane LR axis of m voxels becomes round(F·m) voxels, field of "
        "view kept. 0 = automatic: a square m×m map (m = 8 … 32) goes onto the model's 64×64 (F = 64/m). "
        f"F = {_TRAINED} "
        "(the trained range; --force allows 1 … 64). Set it for rectangular or odd matrices, or for an output "
        "smaller than 64×64", bounds=(1.0, MAX_FACTOR), trained=TRAINED_SCALES, automatic=0.0)
    scale: float = option(
        0.0, "upscaling factor s the model is conditioned on. 0 = automatic: the output grid's own factor (F, or "
        f"√(n1/m1·n2/m2) when rounding makes the two axes differ). {_TRAINED} (--force allows 1 … 64). Change it only "
        "to study a mismatched conditioning; the output grid is set by --factor",
        bounds=(1.0, MAX_FACTOR), trained=TRAINED_SCALES, automatic=0.0)
    tau_d: float = option(
        0.9, "diffusion noise temperature τ_d, 0 … 2: scales the noise the ancestral, respaced and dpmpp-sde "
        "samplers inject at each step (no effect on dpmpp, dpmpp-3m and regression). Lower = smoother maps and higher PSNR, "
        "1 = the trained noise level, higher = sharper but noisier", bounds=(0.0, 2.0))
    tau_f: float = option(
        0.7, "flow temperature τ_f, 0 … 2, for --start flow only (the default re-noised start uses the flow's "
        "mode): spread of the truncated start x_Ttrunc around the encoder's estimate. 1 = the spread the flow is "
        "trained for (1.1–1.5 dB below the encoder's PSNR); 0.7, chosen on validation patients, costs 0.2 dB; 0 = "
        "the flow's mode. Raise it when the uncertainty map matters more than the last dB", bounds=(0.0, 2.0))
    sampler: str = option("ancestral", f"reverse-diffusion sampler: {_SAMPLER_LIST}", choices=SAMPLERS)
    start: str = option(
        "renoised", "where each chain starts: renoised (default) = the flow's mode re-noised to --t-trunc "
        f"(automatic: t = {RENOISED_T_TRUNC}), a short chain chosen on the validation patients "
        "(bench/short_chain_validation.json: with the ancestral sampler, NFE 11, within 0.3 dB of the regression's "
        "PSNR and sharper than it); flow = a τ_f draw of the flow at the model's Ttrunc (the paper's start, 100 for "
        "the shipped model)", choices=START_CHOICES)
    t_trunc: int = option(
        0, "index a re-noised chain starts at, 1 … the model's Ttrunc (100 for the shipped model); NFE = t + 1 "
        f"for ancestral. 0 = automatic: {RENOISED_T_TRUNC} for --start renoised (or the model's Ttrunc if smaller), "
        "the model's Ttrunc for --start flow, the only index a flow draw exists at",
        bounds=(1, MAX_STEPS), automatic=0)
    steps: int = option(
        10, "solver steps K from the chain's start to 0 for dpmpp, dpmpp-3m, dpmpp-sde and respaced (NFE = K + 1; "
        "time grows linearly); ignored by ancestral (every index) and regression. 1 … the start index (10 for the "
        "default re-noised start, 100 for --start flow with the shipped model)",
        bounds=(1, MAX_STEPS))
    spacing: str = option(
        "uniform", "where the K solver steps sit between Ttrunc and 0: uniform (in timestep index) or logsnr "
        "(uniform in λ = log(α/σ), denser near the end); the step-based samplers only", choices=SPACINGS)
    samples: int = option(
        8, f"draws per map, 1 … {MAX_SAMPLES}: the SR map is their mean, the uncertainty map their per-voxel "
        "standard deviation (times the model's calibration factor, if it has one). Time grows linearly; 1 gives "
        "no uncertainty (a zero map), 4–8 is usual",
        bounds=(1, MAX_SAMPLES))
    data_consistency: float = option(
        0.0, "λ, 0 … 1: at every step the central (measured) k-space block of the estimate becomes "
        "(1−λ)·estimate + λ·measured; 0 = off. Off by default because it lowered fidelity in the benchmark "
        "(README, Data consistency); try it on clean maps whose mask covers the whole brain", bounds=(0.0, 1.0))
    seed: int = option(
        0, f"seed of the sampling noise, 0 … {MAX_SEED}: the same seed, inputs and device give the same maps; "
        "change it to draw another set of samples", bounds=(0, MAX_SEED))
    device: str = option(
        "auto", "where the networks run: auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps",
        choices=DEVICES)
    slice_axis: int = option(
        -1, "voxel axis (0, 1, 2 = i, j, k) through the MRSI slab; maps are super-resolved slice by slice in the "
        "other two. -1 = automatic (the through-slab rule, README Geometry; run.json records the axis used). "
        "Set it when the automatic axis is wrong", bounds=(0, 2), automatic=-1)
    max_batch: int = option(
        0, "images per network call, 1 … 4096: bounds memory (RAM or GPU), never changes the maps. 0 = automatic: "
        "16 on a CPU (faster per image than larger batches, bench/profile_v2.txt), about half the free memory on a "
        "GPU. Lower it when a run runs out of memory", bounds=(1, 4096), automatic=0)
    precision: str = option(
        "auto", "arithmetic of the networks: auto = bf16 only where it is native and pays (a CUDA GPU with bf16, a "
        "CPU with AMX), else fp32; fp32; bf16 = bfloat16 autocast where the hardware has it (maps differ by up to "
        "~1 % of their maximum; ~1.3× faster on AVX512-BF16 CPUs), a warning and fp32 elsewhere. run.json records "
        "the choice", choices=PRECISIONS)
    bf16: bool = option(
        False, "the same as --precision bf16 (kept for existing scripts)")
    force: bool = option(
        False, f"run with a factor F or s (given, or 64/m by default) outside the trained range {_TRAINED}; the "
        "model has never seen such factors, so check the result")

    def __post_init__(self):
        self.validate()

    def validate(self) -> "SuperResolveOptions":
        """Return self, or raise ValueError naming the option, its flag and the values it takes."""
        for f in dataclasses.fields(self):
            _check_value(f, getattr(self, f.name), self.force)
        if self.start == "flow" and self.t_trunc:
            raise ValueError("t_trunc (--t-trunc) needs start 'renoised' (--start renoised): the flow draws x at "
                             "the model's own Ttrunc")
        step_based = self.sampler not in ("ancestral", "regression")
        if step_based and self.start == "renoised" and self.steps > (self.t_trunc or RENOISED_T_TRUNC):
            raise ValueError(f"steps (--steps) {self.steps} do not fit the re-noised chain, which starts at index "
                             f"t = {self.t_trunc or RENOISED_T_TRUNC} (--t-trunc): use at most that many steps, a "
                             "larger --t-trunc, or --start flow for a chain from the model's Ttrunc")
        return self

    def chain_start(self, model_t_trunc: int) -> int:
        """The index the chains start at for a model whose flow sits at index model_t_trunc (its Ttrunc)."""
        if self.start == "flow":
            return int(model_t_trunc)
        return int(self.t_trunc or min(RENOISED_T_TRUNC, model_t_trunc))

    def sample_kwargs(self, model_t_trunc: int) -> dict:
        """The keywords of FTDDM.sample (sampling.sample_ftddm) these options mean, the start index resolved."""
        return dict(sampler=self.sampler, start=self.start, t_trunc=self.chain_start(model_t_trunc),
                    steps=self.steps, spacing=self.spacing, tau_d=self.tau_d, tau_f=self.tau_f,
                    n_samples=self.samples)

    def tau_d_has_effect(self) -> bool:
        """τ_d scales the injected noise of the noisy samplers only (DPM-Solver++ here is deterministic)."""
        return self.sampler in NOISY_SAMPLERS

    def cli_arguments(self) -> list[str]:
        """Flags for `ftddm super-resolve`: every field (so a run never depends on CLI defaults) but those left
        automatic (factor 0, scale 0, slice_axis −1), whose flags default to that same value (generated from this
        class): the command line shows only the factors and the axis the user set."""
        self.validate()
        args = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["automatic"] is not None and value == f.metadata["automatic"]:
                continue
            if isinstance(value, bool):
                args.append(cli_flag(f.name) if value else "--no-" + cli_flag(f.name)[2:])
            else:
                args += [cli_flag(f.name), repr(float(value)) if isinstance(value, float) else str(value)]
        return args

    @classmethod
    def from_dict(cls, values: dict) -> "SuperResolveOptions":
        """Build from a dict, refusing unknown names (typos would otherwise be silently ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown super-resolution option(s) {unknown}; expected some of {sorted(names)}")
        return cls(**values)


def _check_value(f: dataclasses.Field, value, force: bool) -> None:
    """ValueError unless value is valid for field f (see option for the metadata)."""
    meta, who = f.metadata, f"{f.name} ({cli_flag(f.name)})"
    if isinstance(f.default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{who} must be True or False, got {value!r}")
    elif meta["choices"] is not None:
        if f.name == "device" and isinstance(value, str) and re.fullmatch(r"cuda:\d+", value):
            return
        if f.name == "sampler" and value in RENAMED_SAMPLERS:
            raise ValueError(f"{who}: {value!r} was renamed {RENAMED_SAMPLERS[value]!r} (respaced ancestral "
                             "sampling); use that name")
        if value not in meta["choices"]:
            extra = " (or cuda:N)" if f.name == "device" else ""
            raise ValueError(f"{who} must be one of {meta['choices']}{extra}, got {value!r}")
    else:
        _check_number(f.name, value, meta, integer=isinstance(f.default, int), force=force)


def _check_number(name: str, value, meta, *, integer: bool, force: bool) -> None:
    who = f"{name} ({cli_flag(name)})"
    lo, hi = meta["bounds"]
    automatic = meta["automatic"]
    kind = "an integer" if integer else "a number"
    allowed = f"[{lo:g}, {hi:g}]" + (f" or {automatic:g} (automatic)" if automatic is not None else "")
    valid_type = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    if not valid_type or not math.isfinite(value):
        raise ValueError(f"{who} must be {kind} in {allowed}, got {value!r}")
    if automatic is not None and value == automatic:
        return
    if not lo <= value <= hi:
        raise ValueError(f"{who} must be in {allowed}, got {value!r}")
    trained = meta["trained"]
    if trained is not None and not force and not trained[0] <= value <= trained[1]:
        raise ValueError(f"{cli_flag(name)} {value:g} is outside the trained range {trained[0]:g} … "
                         f"{trained[1]:g}; pick a value inside it or {automatic:g} (automatic), or pass --force "
                         "(force=True) to run anyway")
