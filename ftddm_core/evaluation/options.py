"""What `ftddm evaluate` computes: EvaluateOptions, whose fields are the CLI flags (help text in field metadata)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .methods import METHOD_NAMES

STUDIES = ("tau_d", "scale_mismatch", "t_trunc", "calibration")


def parse_scales(text: str) -> tuple[float, ...]:
    """'8,4,2' → (8.0, 4.0, 2.0)."""
    try:
        values = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError as exc:
        raise ValueError(f"--scales expects comma-separated numbers such as 8,4,2, got {text!r}") from exc
    if not values or any(not v > 0 for v in values):
        raise ValueError(f"--scales expects positive numbers such as 8,4,2, got {text!r}")
    return values


def parse_names(text: str | None, choices: Sequence[str], what: str) -> tuple[str, ...]:
    """'all' (or None) → every choice, 'none' → (), else a comma-separated subset checked against choices."""
    if text is None or str(text).strip().lower() == "all":
        return tuple(choices)
    if str(text).strip().lower() == "none":
        return ()
    names = tuple(n.strip() for n in str(text).split(",") if n.strip())
    unknown = [n for n in names if n not in choices]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; expected 'all', 'none' or some of {', '.join(choices)}")
    return names


def _flag(help: str, *, text: str | None = None, parse=None) -> dict:
    """Field metadata of a CLI flag (ftddm_core.flags): its help, and for a list-valued field the flag's text
    default and parser."""
    return {"help": help, "text": text, "parse": parse}


@dataclass
class EvaluateOptions:
    """What `ftddm evaluate` computes (CLI flags map one to one: ftddm_core.flags.add_dataclass_flags)."""

    fold: int = field(default=0, metadata=_flag(
        "cross-validation fold whose test patients are evaluated: 0 … k−1 with k = min(5, patients); use the fold "
        "the model was trained on, or its test patients were seen in training"))
    scales: tuple[float, ...] = field(default=(8.0, 4.0, 2.0), metadata=_flag(
        "comma-separated upscaling factors s (HR matrix / LR matrix, e.g. 64 / 8 for s = 8); each must lie in the "
        "model's trained range, and for 64×64 maps 64 / s must be a whole number", text="8,4,2", parse=parse_scales))
    methods: tuple[str, ...] = field(default=METHOD_NAMES, metadata=_flag(
        f"'all', 'none' or a comma-separated list of compared methods: {', '.join(METHOD_NAMES)} (see "
        "docs/evaluation.md); fewer methods cost less CPU", text="all",
        parse=lambda text: parse_names(text, METHOD_NAMES, "method(s)")))
    studies: tuple[str, ...] = field(default=STUDIES, metadata=_flag(
        f"'all', 'none' or a comma-separated list of studies: {', '.join(STUDIES)} (paper Figs. 5–7 and the "
        "uncertainty calibration)", text="all", parse=lambda text: parse_names(text, STUDIES, "stud(y/ies)")))
    max_slices: int | None = field(default=None, metadata=_flag(
        "at most N maps (slice × metabolite) per scale, evenly spread over the test maps (N ≥ 1; default: all); "
        "set it for CPU budgets, and expect weaker statistics"))
    samples: int = field(default=4, metadata=_flag(
        "samples per map for stochastic methods (≥ 1): their mean is the output, their per-voxel std the "
        "uncertainty; the calibration study needs ≥ 2; cost grows linearly"))
    seed: int = field(default=0, metadata=_flag(
        "random seed of the samplers (any integer); change it to check that a result does not hinge on one draw"))
    device: str = field(default="auto", metadata=_flag(
        "auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps; results are reproducible per device type "
        "and cached per device type"))
    bf16: bool = field(default=False, metadata=_flag(
        "bfloat16 autocast where the hardware has it (device.choose_precision: a CUDA GPU, an AMX or AVX512-BF16 "
        "CPU; elsewhere a warning and float32): ~1.4× faster on this project's AVX512-BF16 EPYC, maps differ by up "
        "to ~1% from float32"))
    max_batch: int = field(default=64, metadata=_flag(
        "at most N chains per network call (≥ 1); lower it when memory runs out; outputs do not depend on it"))
    tau_d: float = field(default=0.9, metadata=_flag(
        "τ_d ≥ 0: temperature of the noise added per step of the FTDDM ancestral chains (paper default 0.9; 1 = "
        "standard DDPM, lower = smoother); DDPM chains always use 1"))
    tau_f: float = field(default=0.7, metadata=_flag(
        "τ_f ≥ 0: temperature of the flow's draw of the chain start x_Ttrunc (0.7 as super-resolve, chosen on "
        "validation patients; the paper's 0.9; 0 = the flow's mode)"))
    split_seed: int | None = field(default=None, metadata=_flag(
        "seed of the patient split into folds (default: the one recorded in the model file, else 0); change it "
        "only to evaluate a model trained with another --seed"))

    def __post_init__(self):
        self.scales = tuple(float(s) for s in self.scales)
        unknown = [m for m in self.methods if m not in METHOD_NAMES]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; expected some of {', '.join(METHOD_NAMES)}")
        unknown = [s for s in self.studies if s not in STUDIES]
        if unknown:
            raise ValueError(f"unknown stud(y/ies) {unknown}; expected 'all', 'none' or some of {', '.join(STUDIES)}")
        if not self.scales:
            raise ValueError("expected at least one upscaling factor in scales")
        for name in ("samples", "max_batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.max_slices is not None and int(self.max_slices) < 1:
            raise ValueError(f"max_slices must be ≥ 1, got {self.max_slices}")
        if self.tau_d < 0 or self.tau_f < 0:
            raise ValueError("tau_d and tau_f must be ≥ 0")
