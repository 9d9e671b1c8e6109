"""The fixed prose of report.md, in one place: format strings (str.format) filled by report and studies.

Names in braces are filled at writing time; everything else is the report's wording. Keep a sentence whole
here instead of assembling it in code, so the report reads as written.
"""

TITLE = "# FTDDM evaluation report"
RUNS = "ftddm {version} · device `{device}`{bf16} · {runs} runs ({cached} from the cache)"
BF16 = " (bf16 autocast)"
COMPUTE = ("Compute: {minutes:.1f} min of wall time summed over the runs (as recorded when each was computed), "
           "{machine}.")

# --- data and models
DATA_HEADING = "## Data and models"
DATASET = ("- Dataset `{data_dir}`: {patients} patients; fold {fold} of {folds} (split seed {split_seed}); "
           "test patients: {test}.")
MAPS = "- Maps (slice × metabolite) per scale: {counts} ({subset})."
SUBSET = "at most {max_slices} maps per scale, evenly spread (--max-slices)"
SUBSET_ALL = "all maps"
SAMPLES = ("- Samples per map for stochastic methods: {samples}; seed {seed}; τ_d = {tau_d:g} (FTDDM), "
           "τ_f = {tau_f:g}.")
SPLIT_WARNING = ("- **Warning**: the model records test patients {recorded} for fold {fold}, this split gives {test} "
                 "(another dataset or split seed?).")
NO_DDPM_MODEL = "\n{flag} not given: methods that need it are skipped (see below)."
NO_REGRESSION_MODEL = "\n{flag} not given: the one-pass regression is the FTDDM model's SR encoder."
NO_TRAINING_RECORD = "no training data recorded in the file"
TRAINING = "trained on {dataset}, fold {fold}, split seed {split_seed}, {step} iterations"

# --- headline
HEADLINE_HEADING = "## Headline: fast FTDDM vs full-chain DDPM"
QUESTION = ("Question: is FTDDM with the fast default sampler (the flow's mode re-noised to t = 10, ancestral, "
            "`{reference}`) "
            "within {margin} SSIM of the full-chain DDPM of the same training at ≥ {factor:g}× fewer NFE?")
NOT_ANSWERED = ("**Not answered**: {reason}. Full-chain DDPM needs a UNet trained on every index t ∈ [0, T − 1]; "
                "the FTDDM model's UNet only saw the truncated chain t ∈ [0, Ttrunc], so running it from pure noise "
                "would measure a network outside its training range, not DDPM.")
ANSWER = ("**Answer: {answer}.** (Δ SSIM = FTDDM − DDPM, mean over maps; 'within' means Δ ≥ −{margin}; the NFE "
          "ratio must be ≥ {factor:g} at every scale.)")
BOTH_MODELS = "Both models: FTDDM — {ftddm}; DDPM — {ddpm}{caveat}."
NOT_SAME_TRAINING = " (**not** verified to be the same training data/iterations)"
MEANS_OVER = "Means over {counts} maps per scale; with few maps the answer is indicative only."
GAP = ("Where the gap comes from (Δ SSIM, mean over maps; ≈ 0 for a longer chain means the chain has converged, "
       "so the gap lies in the start the chain inherits):")

# --- methods and statistics
METHODS_HEADING = "## Methods"
METHODS_LEGEND = ("NFE = UNet evaluations per sample chain (a chain from index t evaluates t + 1 times, the last "
                  "giving x̂0); flow = flow passes per chain; s/map = wall seconds per map for all its samples "
                  "(batched, see notes); params = parameters of the networks the method uses. Metrics: mean ± std "
                  "over maps. Sharpness: ∇ ratio = mean |∇ output| / mean |∇ truth| inside M, HF ratio = k-space "
                  "energy outside the measured block, output / truth (1 = as sharp as the truth, < 1 smoother).")
SCALE_HEADING = "### s = {scale:g} ({lr_text}, {n} maps)"
GROUND_TRUTH_ROW = "*ground truth (reference)*"
SKIPPED = "Skipped methods:"
WILCOXON_HEADING = "## Wilcoxon signed-rank tests"
WILCOXON_NOT_COMPUTED = ("Not computed: `{reference}` (the reference) and at least one other method must be "
                         "evaluated.")
WILCOXON = ("`{reference}` against each method, paired per map (scipy.stats.wilcoxon, two-sided); Δ = median of "
            "reference − method. All tests in `wilcoxon.csv`.")

# --- studies, panels, notes, files
STUDIES_HEADING = "## Studies"
NO_STUDIES = "None run (--studies none)."
TAU_D_HEADING = "### τ_d sweep: fidelity vs sharpness (paper Fig. 7)"
TAU_D = ("FTDDM ancestral chain from the flow at the model's Ttrunc. Sharpness: mean |∇| in M relative to the ground "
         "truth, and k-space energy outside the measured m×m block relative to the ground truth (1 = as sharp as "
         "the truth; below 1 = smoother).")
SCALE_MISMATCH_HEADING = "### Conditioned vs actual upscaling factor (paper Fig. 6)"
SCALE_MISMATCH = "`{reference}` with the network conditioned on s' while the input was made with s (rows: actual s)."
T_TRUNC_HEADING = "### Truncation index (paper Fig. 5)"
T_TRUNC = ("Ancestral FTDDM from different Ttrunc (0 = flow only). Indices below the model's Ttrunc use the "
           "re-noised flow start (see notes); indices above it are skipped.")
CALIBRATION_HEADING = "### Uncertainty calibration"
CALIBRATION = ("Per-voxel std over {samples} samples of `{reference}` vs absolute error |mean − GT|, voxels in M. A "
               "calibrated std has RMSE ≈ std in every bin (identity line of the reliability plot).")
CALIBRATION_FITTED = ("c (column c) is the model file's uncertainty calibration at each s (σ-scaling per factor, "
                      "linear in log s between them, times c4({samples}) / c4(n) for n samples; "
                      "ftddm_core.uncertainty), fitted on {fitted_on} with {samples} samples per map, never on these "
                      "test maps: the uncertainty map `ftddm super-resolve` writes is c × std. It rescales the map, "
                      "it does not change Pearson r or Spearman ρ.")
CALIBRATION_NONE = "The model file has no uncertainty calibration (c = 1: the map is the raw std of the samples)."
PANELS_HEADING = "## Qualitative panels"
PANELS = ("The map with the largest mask per scale, in model space (normalised units: HR ⊙ M over the map's "
          "intensity scale); maps on 0 … max of the ground truth, the signed error and the calibrated uncertainty "
          "on one stated scale ±x / 0 … x.")
NOTES_HEADING = "## Notes: what is approximate, and how to read this report"
FILES_HEADING = "## Files"
FILES = ("`methods.csv` (one row per method and scale), `per_map.csv` (every metric of every map), `wilcoxon.csv`, "
         "`study_*.csv`, `summary.json`, `figures/*.png`, `cache/*.npz` (outputs per run; delete to recompute).")

NOTES = (
    "The FTDDM model's UNet is trained only on the truncated chain t ∈ [0, {t_trunc}]. Methods that start from pure "
    "noise (DDPM full chain, DDPM respaced, DPM-Solver++ from noise) use the --ddpm-model (trained with `ftddm train "
    "--t-trunc 999`) and are skipped without one; they are never run with a UNet outside its trained range. The "
    "`model` column says which file each method used.",
    "FTDDM at Ttrunc' < {t_trunc} ('re-noised flow start') is an approximation: the flow is trained to produce x at "
    "index {t_trunc}; its mode / √ᾱ_{t_trunc} (clamped, masked) is taken as x̂0 and re-noised to t' with the forward "
    "process, ε ⊙ M. The paper trains one flow per Ttrunc. The mode is used rather than a τ_f sample because a "
    "sample already carries the forward noise of index Ttrunc, which re-noising would add twice.",
    "Flow only (Ttrunc = 0): x̂0 = flow mode / √ᾱ_{t_trunc}, clamped and masked: 0 UNet evaluations, one flow pass, "
    "deterministic (std 0).",
    "Ground truth = HR map ⊙ M in model space (divided by the LR-derived scale of data.make_example); outputs are "
    "masked by M, including zero-filling and bicubic, so outside M both are 0 as in the published metrics. PSNR "
    "(data range = GT max − min) and SSIM are invariant to the per-map scale; NRMSE is a ratio.",
    "k-space consistency error = ‖central m×m k-space of the output − that of the measured LR map‖ / ‖measurement‖ "
    "in model space. The measurement is |LR| of the whole slab while outputs are masked, so even the ground truth "
    "has a nonzero error (the 'ground truth (reference)' row is the floor).",
    "FTDDM chains use τ_d = {tau_d:g} and τ_f = {tau_f:g} (paper defaults); DDPM chains use τ_d = 1 (standard DDPM). "
    "DPM-Solver++ is deterministic given its start (only τ_f or the start noise vary).",
    "Timings: wall time of each run divided by its maps, all samples included, with up to --max-batch {max_batch} "
    "chains per network call, on the device of the run that filled the cache entry (re-runs report the cached "
    "time).",
    "p-values are not corrected for multiple comparisons; with few maps (--max-slices) they are weak.",
    "Test split: data.patient_folds(k = min(5, patients), fold, seed {split_seed}) — the split `ftddm train` uses "
    "with the same seed.",
)
TILES_NOTE = (
    "In-vivo-like data (maps not {tile}×{tile}): maps are {tile}×{tile} tiles around the mask centre "
    "(data.tile_example without rng, as training derives its examples). The LR map is derived on the full slice "
    "(m_a = round(n_a / s), at least 4), its scale and y too, and only then cut; zero-filling and bicubic are "
    "computed from the full slice's LR and cut at the same place, so every method sees the same pixels. Metrics are "
    "over the tile; networks are conditioned on the factor the slice actually got, √((n1/m1)·(n2/m2)). The k-space "
    "error and the HF energy ratio place the tile on its full slice and are left out (NaN) for maps whose mask "
    "reaches outside the tile ({outside} of {total} maps over all scales).")
BF16_NOTE = "bf16 autocast was on: expect differences of about 1% from float32."
