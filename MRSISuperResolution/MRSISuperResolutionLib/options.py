"""Super-resolution parameters of the module and the `ftddm super-resolve` command line built from them.

The fields mirror ftddm_core.pipeline.SuperResolveOptions (a test checks the two stay in step) so that the
GUI, console scripting and the CLI share one set of names; validation happens here, before any process starts.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

SAMPLERS = ("dpmpp", "ancestral", "ddpm", "dpmpp-3m", "dpmpp-sde")  # DPM-Solver++ (default), Alg. 1, respaced, 3M, SDE
SPACINGS = ("uniform", "logsnr")  # solver steps uniform in index or in λ = log(α/σ)
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")
SCALE_RANGE = (2.0, 8.0)  # upscaling factors the shipped models are trained for (64 / LR matrix 8 … 32)
FACTOR_RANGE = (2.0, 8.0)  # in-plane output factors F the engine accepts (0 = automatic)
# `--factor` is new in the engine: left out while automatic, so the module also drives an engine without it
OMITTED_WHEN_AUTOMATIC = ("factor",)
MAX_STEPS = 1000
MAX_SAMPLES = 64


@dataclass
class SuperResolveParameters:
    """Sampling options of one run (names = `ftddm super-resolve` flags with '-' → '_')."""

    tau_d: float = 0.9  # diffusion noise temperature τ_d (ancestral and ddpm samplers)
    tau_f: float = 0.7  # flow temperature τ_f of the truncated start point (chosen on validation data)
    sampler: str = "dpmpp"
    steps: int = 10  # solver steps (dpmpp, dpmpp-sde, ddpm)
    spacing: str = "uniform"
    samples: int = 8  # draws per map: mean = SR, standard deviation = uncertainty
    data_consistency: float = 0.0  # λ ∈ [0, 1], blend of the measured central k-space
    seed: int = 0
    device: str = "auto"
    scale: float = 0.0  # conditioned upscaling factor; 0 = detected from the LR matrix
    factor: float = 0.0  # in-plane output factor F: matrix round(F·m) per axis; 0 = automatic (the model grid)
    slice_axis: int = -1  # −1 = automatic (through-slab axis)
    max_batch: int = 0  # 0 = automatic (16 on a CPU, fills a GPU)
    precision: str = "auto"  # auto | fp32 | bf16 (bf16 only where the hardware has it)
    bf16: bool = False
    force: bool = False  # run outside the trained scale range

    def validate(self) -> "SuperResolveParameters":
        """Return self, or raise ValueError naming the offending parameter and its expected range."""
        def number(name, lo, hi, integer=False):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    (integer and not float(value).is_integer()) or not math.isfinite(value):
                kind = "an integer" if integer else "a number"
                raise ValueError(f"{name} must be {kind} in [{lo}, {hi}], got {value!r}")
            if not lo <= value <= hi:
                raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")

        number("tau_d", 0.0, 2.0)
        number("tau_f", 0.0, 2.0)
        number("steps", 1, MAX_STEPS, integer=True)
        number("samples", 1, MAX_SAMPLES, integer=True)
        number("data_consistency", 0.0, 1.0)
        number("seed", 0, 2**31 - 1, integer=True)
        number("max_batch", 0, 4096, integer=True)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        number("slice_axis", -1, 2, integer=True)
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {self.spacing!r}")
        device = str(self.device)
        if device.split(":")[0] not in DEVICES or (":" in device and not device.startswith("cuda:")):
            raise ValueError(f"device must be one of {DEVICES} (or cuda:N), got {self.device!r}")
        number("factor", 0.0, 64.0)
        if self.factor and not self.force and not SCALE_RANGE[0] <= self.factor <= SCALE_RANGE[1]:
            raise ValueError(f"factor must be 0 (automatic) or in {list(SCALE_RANGE)}, got {self.factor!r}; "
                             "enable 'force' to run outside the trained range")
        number("scale", 0.0, 64.0)
        if self.scale and not self.force and not SCALE_RANGE[0] <= self.scale <= SCALE_RANGE[1]:
            raise ValueError(f"scale must be 0 (automatic) or in {list(SCALE_RANGE)}, got {self.scale!r}; "
                             "enable 'force' to condition outside the trained range")
        number("factor", 0.0, FACTOR_RANGE[1])
        if self.factor and not FACTOR_RANGE[0] <= self.factor <= FACTOR_RANGE[1]:
            raise ValueError(f"factor must be 0 (automatic) or in {list(FACTOR_RANGE)}, got {self.factor!r}")
        return self

    def notes(self) -> list[str]:
        """Hints for the user about settings that have no effect or cost a lot (never errors)."""
        out = []
        if self.samples == 1:
            out.append("One sample gives no uncertainty estimate (the uncertainty map will be zero).")
        if self.sampler == "ancestral":
            out.append("The ancestral sampler runs every truncated diffusion step: expect it to be slow on CPU.")
        return out

    def tau_d_has_effect(self) -> bool:
        """τ_d scales the injected noise of the stochastic samplers only (DPM-Solver++ here is deterministic)."""
        return self.sampler != "dpmpp"

    def cli_arguments(self) -> list[str]:
        """Flags for `ftddm super-resolve` (every field, so a run never depends on CLI defaults)."""
        self.validate()
        args = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in OMITTED_WHEN_AUTOMATIC and not value:
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + f.name.replace("_", "-"))
            else:
                args += [flag, repr(float(value)) if isinstance(value, float) else str(value)]
        return args

    @classmethod
    def from_dict(cls, values: dict) -> "SuperResolveParameters":
        """Build from a dict, refusing unknown names (typos would otherwise be silently ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown super-resolution parameter(s) {unknown}; expected some of {sorted(names)}")
        return cls(**values).validate()


def engine_bootstrap(engine_dir: str | Path) -> str:
    """`python -c` code that runs `python -m ftddm_core.cli` with ftddm_core imported from engine_dir.

    Passing the folder inside the command (not through PYTHONPATH) keeps it working behind Slicer's launcher,
    which rewrites the environment of PythonSlicer.
    """
    return ("import sys; sys.path.insert(0, %r); from ftddm_core.cli import main; "
            "sys.argv[0] = 'ftddm'; sys.exit(main())" % str(engine_dir))


def super_resolve_command(python: Sequence[str], engine_dir, lr_paths: Sequence, t1, flair, out_dir, *,
                          mask=None, model=None, parameters: SuperResolveParameters | None = None) -> list[str]:
    """argv running `ftddm super-resolve` with progress lines, for one or more LR maps (one file each)."""
    if not python or not all(isinstance(p, str) and p for p in python):
        raise ValueError(f"python must be a non-empty list of strings (the interpreter command), got {python!r}")
    if not lr_paths:
        raise ValueError("expected at least one LR metabolite map")
    if t1 is None or flair is None:
        raise ValueError("FTDDM is conditioned on the patient's T1 and FLAIR: both are required")
    params = (parameters or SuperResolveParameters()).validate()
    cmd = [*python, "-c", engine_bootstrap(engine_dir), "super-resolve"]
    for p in lr_paths:
        cmd += ["--lr", str(p)]
    cmd += ["--t1", str(t1), "--flair", str(flair), "--out", str(out_dir)]
    if mask is not None:
        cmd += ["--mask", str(mask)]
    if model is not None and str(model) not in ("", "."):
        cmd += ["--model", str(model)]
    return cmd + params.cli_arguments() + ["--overwrite", "--progress-lines"]
