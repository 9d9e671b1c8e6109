"""`ftddm evaluate`: methods compared on a fold's test patients (paper Tables 1–2, Figs. 5–7, reference §6).

Plan → run every (method, scale) once, cached under REPORT_DIR/cache → per-map metrics → tables, CSVs, figures
and report.md. Everything is compared in model space: the ground truth is x0 = HR·M / scale with the scale
derived from the LR input (data.make_example), outputs are masked by M, so metrics on the whole 64×64 map are
the published ones (PSNR/SSIM use the ground truth's range, hence are invariant to the per-map scale). Maps on
any other grid (in-vivo-like data) are evaluated on the T×T tiles around the mask centre that the training
derivation cuts after deriving the LR map on the full slice; the baselines are cut from the same full slice.

Modules: methods (RunSpecs), options (EvaluateOptions = the CLI flags), maps (the test maps), stats (measures
and statistics), runs (models, running one method, the cache), studies (one object per study), plan (the
entry point), report and markdown (rows, figures, report.md from the prose templates in prose).
"""
from .methods import METHOD_NAMES, RunSpec, method_specs
from .options import STUDIES, EvaluateOptions, parse_names, parse_scales
from .plan import run_evaluation

__all__ = ["METHOD_NAMES", "STUDIES", "EvaluateOptions", "RunSpec", "method_specs", "parse_names", "parse_scales",
           "run_evaluation"]
