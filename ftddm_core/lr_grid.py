"""Rules on the low-resolution MRSI grid that the engine (volume.py) and the Slicer module share: the slice
axis, the trained LR matrix range, the --factor check and the in-plane output matrix. Standard library only
(the Slicer module imports it before the engine's packages are installed); arguments are plain sequences.
"""
from __future__ import annotations

import math

#: Relative tolerance for "same field of view" comparisons.
FOV_RTOL = 1e-3
#: Slice-axis rule, step 3: the thickest axis is the slab axis when its spacing is ≥ this × every other
#: candidate's (a 5.25 mm slice among 5 mm in-plane voxels is not "clearly thicker"; a 10 mm slab among 5 mm is).
THICK_RATIO = 1.2
#: Step 4: the axis with the fewest voxels is the slab axis when it has ≤ this × every other candidate's count.
SHORT_RATIO = 0.8
#: Step 5: the axis most aligned with superior–inferior wins when its |S| direction component exceeds the
#: runner-up's by this much (an axial slab tilted by up to ~35° still wins; a 45° tie does not).
SI_MARGIN = 0.1


def check_axis(axis: int) -> int:
    if axis not in (0, 1, 2):
        raise ValueError(f"slice axis must be 0, 1 or 2, got {axis!r}")
    return int(axis)


def inplane_axes(axis: int) -> tuple[int, int]:
    """The two in-plane voxel axes (increasing order) for a slice axis."""
    return tuple(a for a in range(3) if a != check_axis(axis))


def slice_axis_rule(shape, spacing, superior) -> int:
    """The through-slab voxel axis of an MRSI grid: shape (i, j, k), voxel spacing (mm) and |S| (the
    superior–inferior component of each voxel axis' unit direction).

    Steps are applied in order to the remaining candidate axes; a step that leaves exactly one axis decides,
    one that leaves several narrows the candidates to those, one that leaves none is skipped:

    1. the other two axes form a square matrix;
    2. the other two axes have the same field of view (to FOV_RTOL);
    3. the spacing is clearly the largest (≥ THICK_RATIO × every other candidate's): slab thickness;
    4. the voxel count is clearly the smallest (≤ SHORT_RATIO × every other candidate's): the slab is short.
       Before the S–I step because a sagittal or coronal slab has superior–inferior *in* plane;
    5. the axis most aligned with superior–inferior (|S| ≥ SI_MARGIN above every other candidate's);
    6. still tied: the fewest voxels, then the most superior–inferior, then the lowest index.

    E.g. 16×16×10 → 2 (square pair); 16×12×4 at 3×4×5 mm → 2 (equal FOVs 48×48); 32×42×8 at 5×5×10 mm → 2
    (thicker); the oblique 32×42×22 at 5×5×5.25 mm scan of issue 11 → 2 (22 voxels); a sagittal 24×32×12 at
    5 mm with voxel axis 1 along S–I → 2 (fewest voxels, although axis 1 is superior–inferior); an axial
    30×28×26 at 5 mm → 2 (superior–inferior).
    """
    shape = tuple(int(n) for n in shape[:3])
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"expected a 3D shape, got {shape}")
    spacing, superior = [float(s) for s in spacing], [abs(float(s)) for s in superior]
    fov = [n * s for n, s in zip(shape, spacing)]

    def pair(values, a):
        return [values[b] for b in inplane_axes(a)]

    steps = (
        lambda a, c: pair(shape, a)[0] == pair(shape, a)[1],
        lambda a, c: math.isclose(*pair(fov, a), rel_tol=FOV_RTOL),
        lambda a, c: all(spacing[a] >= THICK_RATIO * spacing[b] for b in c if b != a),
        lambda a, c: all(shape[a] <= SHORT_RATIO * shape[b] for b in c if b != a),
        lambda a, c: all(superior[a] >= superior[b] + SI_MARGIN for b in c if b != a),
        lambda a, c: shape[a] == min(shape[b] for b in c),
    )
    candidates = [0, 1, 2]
    for test in steps:
        passing = [a for a in candidates if test(a, candidates)]
        if len(passing) == 1:
            return passing[0]
        if passing:
            candidates = passing
    return max(candidates, key=lambda a: (superior[a], -a))  # the first index on an exact tie


def refined_size(m: int, factor: float) -> int:
    """N = round(F·m), halves rounded up (Python's round() would send 52.5 to 52 but 57.5 to 58)."""
    return int(math.floor(factor * m + 0.5))


def lr_matrix_range(model_size: int = 64, scale_range: tuple[float, float] = (2.0, 8.0)) -> tuple[int, int]:
    """Smallest and largest LR matrix m with s = model_size/m inside the trained scale range."""
    s_min, s_max = scale_range
    return math.ceil(model_size / s_max - 1e-9), math.floor(model_size / s_min + 1e-9)


def check_lr_matrix(m: int, model_size: int = 64, scale_range=(2.0, 8.0), *, force: bool = False,
                    name: str | None = None) -> float:
    """Default factor (no --factor) of a square m×m matrix: s = model_size/m; ValueError naming the file and
    --factor when outside the trained range (unless force) or when m > model_size."""
    who = f"{name}: " if name else ""
    lo_s, hi_s = scale_range
    example = f"--factor {lo_s:g} gives {refined_size(m, lo_s)}×{refined_size(m, lo_s)}"
    if m > model_size or m < 1:
        raise ValueError(f"{who}in-plane LR matrix {m}×{m} cannot be zero-filled onto the default "
                         f"{model_size}×{model_size} grid; pass --factor F (F = {lo_s:g} … {hi_s:g}, each axis "
                         f"m → round(F·m); {example})")
    lo, hi = lr_matrix_range(model_size, scale_range)
    if not lo <= m <= hi and not force:
        raise ValueError(f"{who}in-plane LR matrix {m}×{m} (s = {model_size / m:.2f} onto the default {model_size}×"
                         f"{model_size}) is outside the trained range {lo} … {hi} (s = {lo_s:g} … {hi_s:g}); "
                         f"pass --factor F with F in {lo_s:g} … {hi_s:g} ({example}), or --force to run anyway")
    return model_size / m


def default_factor(lr_inplane, model_size: int = 64, scale_range=(2.0, 8.0), *, force: bool = False,
                   name: str | None = None) -> float:
    """The factor without --factor: a square m×m in-plane matrix goes onto model_size² (check_lr_matrix);
    anything else is refused with a message naming --factor."""
    m1, m2 = (int(m) for m in lr_inplane)
    if m1 != m2:
        lo = scale_range[0]
        raise ValueError(f"{name + ': ' if name else ''}in-plane matrix {m1}×{m2} is not square, so there is no "
                         f"default {model_size}×{model_size} output; pass --factor F (F = {lo:g} … "
                         f"{scale_range[1]:g}, each axis m → round(F·m); e.g. --factor {lo:g} gives "
                         f"{refined_size(m1, lo)}×{refined_size(m2, lo)})")
    return check_lr_matrix(m1, model_size, scale_range, force=force, name=name)


def check_factor(factor: float, scale_range=(2.0, 8.0), *, force: bool = False) -> float:
    """The in-plane upscaling F of --factor: ≥ 1 always, inside the trained range unless --force."""
    lo, hi = scale_range
    if not math.isfinite(factor) or factor < 1.0:
        raise ValueError(f"--factor {factor:g}: the in-plane upscaling must be ≥ 1 (zero-filling cannot coarsen); "
                         f"the model is trained for {lo:g} … {hi:g}")
    if not lo - 1e-9 <= factor <= hi + 1e-9 and not force:
        raise ValueError(f"--factor {factor:g} is outside the model's trained range {lo:g} … {hi:g}; "
                         "pick a factor inside it, or pass --force to run anyway")
    return float(factor)


def inplane_target(lr_inplane, model_size: int = 64, *, factor: float = 0.0, scale_range=(2.0, 8.0),
                   force: bool = False, name: str | None = None) -> tuple[float, tuple[int, int]]:
    """(requested F, output in-plane matrix (n1, n2)) of an m1×m2 LR matrix: F > 0 → each axis round(F·m);
    F = 0 → model_size² for a square matrix in the trained range (default_factor), refused otherwise."""
    if factor:
        requested = check_factor(factor, scale_range, force=force)
        return requested, tuple(refined_size(int(m), requested) for m in lr_inplane)
    return default_factor(lr_inplane, model_size, scale_range, force=force, name=name), (model_size, model_size)


def realised_factor(lr_inplane, inplane) -> float:
    """s = √((n1/m1)·(n2/m2)): one number for the model's conditioning when round() makes the two axes differ."""
    r1, r2 = (n / m for n, m in zip(inplane, lr_inplane))
    return r1 if r1 == r2 else math.sqrt(r1 * r2)
