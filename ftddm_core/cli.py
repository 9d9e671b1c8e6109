"""The `ftddm` command line: phantom, train, super-resolve, bids, demo, evaluate.

Each subcommand is a thin layer over the Python API; errors a user can fix are printed as one clear line
(exit code 2) instead of a traceback.
"""
from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
import warnings
from pathlib import Path

from . import __version__
from .flags import add_dataclass_flags, dataclass_from_args
from .options import SuperResolveOptions


# --- helpers ---------------------------------------------------------------------------------------
class ProgressPrinter:
    """A tqdm bar for people, or one parseable line per update (--progress-lines) for the Slicer module."""

    def __init__(self, desc: str, lines: bool):
        self.desc, self.lines, self.bar = desc, lines, None

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if self.lines:
            print(f"PROGRESS {done}/{total} {message}".rstrip(), file=sys.stderr, flush=True)
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="step", file=sys.stderr)
        self.bar.total = total
        self.bar.n = done
        self.bar.set_postfix_str(message, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- subcommands -------------------------------------------------------------------------------------
def cmd_phantom(args) -> int:
    from .data import write_phantom_dataset

    progress = ProgressPrinter("patients", args.progress_lines)
    write_phantom_dataset(args.out, patients=args.patients, seed=args.seed, overwrite=args.overwrite,
                          progress=lambda i, n, pid: progress(i, n, pid), realism=args.realism, kind=args.kind)
    progress.close()
    what = "synthetic" if args.realism == "legacy" else f"in-vivo-like ({args.kind})"
    print(f"wrote {args.patients} {what} patients to {args.out}")
    return 0


def cmd_train(args) -> int:
    from .config import preset
    from .data import training_sources
    from .train import TrainOptions, train

    opts = dataclass_from_args(TrainOptions, args)
    init = None
    if args.init is not None:  # fine-tune a trained model (e.g. the shipped default) on the user's data
        from .model import DEFAULT_MODEL, FTDDM

        init = FTDDM.load(DEFAULT_MODEL if str(args.init) == "default" else args.init)
        config = init.config
    else:
        config = preset(args.config)
    if args.t_trunc is not None:
        if init is not None and args.t_trunc != config.diffusion.t_trunc:
            raise ValueError(f"--t-trunc {args.t_trunc}: --init {args.init} was trained for Ttrunc = "
                             f"{config.diffusion.t_trunc}; fine-tuning keeps it")
        config.diffusion.t_trunc = args.t_trunc
    src, val, info = training_sources(args.data, fold=args.fold, seed=args.seed)
    progress = ProgressPrinter("train", args.progress_lines)

    def report(row):
        msg = " ".join(f"{k}={row[k]:.4g}" for k in ("encoder", "diffusion", "nll", "guide") if k in row)
        progress(int(row["step"]), int(row["iterations"]), msg)

    summary = train(config, src, args.out, opts, val_source=val, resume=args.resume, force=args.force,
                    progress=report, data_info=info, init=init)
    progress.close()
    print(f"trained {summary['step']} iterations in {summary['seconds']:.0f} s → {args.out}/model.safetensors "
          f"(best validation loss {summary['best_val']:.4g})")
    return 0


def cmd_super_resolve(args) -> int:
    from .pipeline import run_super_resolve

    opts = dataclass_from_args(SuperResolveOptions, args)
    progress = ProgressPrinter("super-resolve", args.progress_lines)
    report = run_super_resolve(args.lr, args.out, t1=args.t1, flair=args.flair, mask=args.mask,
                               model_path=args.model, options=opts, ratios=args.ratio,
                               overwrite=args.overwrite, progress=progress, nan_policy=args.nan_policy)
    progress.close()
    for path in report["outputs"]:
        print(path)
    return 0


def cmd_bids(args) -> int:
    """A BIDS App: `participant` super-resolves sessions (exit 1 if any failed), `group` writes the report."""
    from .bids import load_filter_file

    query = dict(participants=args.participant_label, sessions=args.session_label, mets=args.met,
                 mrsi_derivatives=args.mrsi_derivatives, filters=load_filter_file(args.bids_filter_file),
                 mrsi_desc=None if args.mrsi_desc.lower() == "none" else args.mrsi_desc)
    if args.analysis_level == "group":
        from .bids_report import run_group

        run_group(args.bids_dir, args.output_dir, **query)
        return 0
    from .bids import run_participants

    opts = dataclass_from_args(SuperResolveOptions, args)
    bars = []

    def progress_for(label):
        bars.append(ProgressPrinter(label, args.progress_lines))
        return bars[-1]

    try:
        outcome = run_participants(args.bids_dir, args.output_dir, model_path=args.model, options=opts,
                                   overwrite=args.overwrite, nan_policy=args.nan_policy,
                                   report=lambda line: print(line, flush=True), progress_factory=progress_for,
                                   **query)
    finally:
        for bar in bars:
            bar.close()
    failed = outcome["failed"]
    print(f"{len(outcome['done'])} done, {len(outcome['skipped'])} skipped (finished earlier), {len(failed)} failed")
    if failed:
        print("ftddm bids: failed: " + "; ".join(f"{k} ({v})" for k, v in failed.items()), file=sys.stderr)
        return 1
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, model_path=args.model, overwrite=args.overwrite, seed=args.seed,
             samples=args.samples, progress=ProgressPrinter("demo", args.progress_lines))
    return 0


def cmd_evaluate(args) -> int:
    from .evaluation import EvaluateOptions, run_evaluation
    from .evaluation.methods import NFE_FACTOR, REFERENCE, SSIM_MARGIN

    opts = dataclass_from_args(EvaluateOptions, args)  # every EvaluateOptions field has its generated flag
    progress = ProgressPrinter("evaluate", args.progress_lines)
    summary = run_evaluation(args.data, args.model, args.out, opts, ddpm_model=args.ddpm_model,
                             regression_model=args.regression_model, progress=progress)
    progress.close()
    head = summary["headline"]
    print(f"headline (the default sampler {REFERENCE} within {SSIM_MARGIN:g} SSIM of full-chain DDPM at "
          f"≥{NFE_FACTOR:g}× fewer NFE): {head['answer']}"
          + (f" — {head['reason']}" if head.get("reason") else ""))
    print(f"{summary['jobs']} runs ({summary['jobs_from_cache']} from the cache) → {summary['report']}")
    return 0


# --- parser --------------------------------------------------------------------------------------------
def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser (command=None), or one whose only fully built subcommand is `command`.

    Building a subcommand's flags imports its options class; `train`'s pulls in the training losses
    (pytorch_msssim), which a Slicer install that only runs inference does not have.
    """
    from .config import PRESETS

    def wanted(name: str) -> bool:
        return command is None or command == name

    p = argparse.ArgumentParser(prog="ftddm", description="FTDDM super-resolution for MR spectroscopic imaging. "
                                "`ftddm COMMAND --help` explains every flag of a command.")
    p.add_argument("--version", action="version", version=f"ftddm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp):
        sp.add_argument("--progress-lines", action="store_true",
                        help="print 'PROGRESS done/total message' lines on stderr instead of a progress bar "
                             "(for programs that read the progress, such as the Slicer module)")
        return sp

    def overwrite(sp, what):
        sp.add_argument("--overwrite", action="store_true", help=f"replace {what} (never done without it)")

    def nan_policy(sp):
        sp.add_argument("--nan-policy", choices=("raise", "zero"), default="raise",
                        help="NaN/inf voxels in an input: raise = refuse the input (default); zero = set them "
                             "to 0 with a warning (for maps whose fit failed in a few voxels)")

    def model(sp, what="the FTDDM model"):
        sp.add_argument("--model", type=Path, help=f"{what}: a .safetensors file from `ftddm train` "
                                                   "(default: the shipped model, ftddm_core/weights)")

    sp = common(sub.add_parser("phantom", help="write a synthetic glioma dataset (training or test data)"))
    sp.add_argument("--out", required=True, type=Path, help="dataset folder to write (one sub-NNN folder per "
                                                            "patient, docs/dataset_format.md)")
    sp.add_argument("--patients", type=int, default=25,
                    help="number of patients, ≥ 1; `ftddm train` needs at least 3 (train/validation/test; the "
                         "shipped model's cohort had 50) (default: 25)")
    sp.add_argument("--seed", type=int, default=0,
                    help="cohort seed: the same seed gives the same patients; use disjoint seeds for held-out "
                         "cohorts (default: 0)")
    sp.add_argument("--realism", choices=("legacy", "invivo"), default="legacy",
                    help="legacy: 64×64 maps in mM (paper); invivo: scanner-like maps (any matrix, noise, lipid, a.u.)")
    sp.add_argument("--kind", choices=("mixed", "rectangular", "noisy", "5mm", "factor2"), default="mixed",
                    help="invivo only: mixed = everything drawn (the training default); held-out kinds "
                         "rectangular (matrices differing by ≥ 6), noisy (SNR 5–10), 5mm (5 mm voxels), factor2 "
                         "(as mixed, evaluated at F = 2)")
    overwrite(sp, "an existing dataset folder")
    sp.set_defaults(func=cmd_phantom)

    sp = common(sub.add_parser("train", help="train an FTDDM model on a dataset folder"))
    sp.add_argument("--data", required=True, type=Path, help="dataset folder (docs/dataset_format.md), "
                                                             "at least 3 patients")
    sp.add_argument("--config", choices=PRESETS, default="compact",
                    help="network sizes: compact (default, trainable on CPU), paper (the published sizes, needs "
                         "a GPU), regression (the SR encoder alone: the one-pass baseline), ddpm (a full-chain "
                         "conditional DDPM for comparisons), tiny (tests only)")
    sp.add_argument("--out", required=True, type=Path, help="run folder: model.safetensors, best/last "
                                                            "checkpoints, log.csv, run.json, loss.png")
    sp.add_argument("--fold", type=int, default=0,
                    help="patient-level cross-validation fold 0 … 4 (5 folds; fewer with < 5 patients) whose "
                         "test patients are held out; the split is drawn with --seed (default: 0)")
    sp.add_argument("--t-trunc", type=int, default=None,
                    help="truncation index Ttrunc, 1 … 999: where the flow hands over to the reverse chain "
                         "(paper: 100); 999 trains a full-chain DDPM (default: the config's)")
    sp.add_argument("--init", type=Path, default=None,
                    help="fine-tune: start from this model's weights and config ('default' = the shipped model)")
    sp.add_argument("--resume", action="store_true", help="continue OUT/last.safetensors bit for bit "
                                                          "(after an interruption)")
    sp.add_argument("--force", action="store_true", help="overwrite an earlier run in OUT")
    if wanted("train"):
        from .train import TrainOptions

        add_dataclass_flags(sp, TrainOptions)
    sp.set_defaults(func=cmd_train)

    sp = common(sub.add_parser("super-resolve", help="super-resolve low-resolution metabolite maps"))
    sp.add_argument("--lr", required=True, action="append", type=Path,
                    help="low-resolution metabolite map (NIfTI or any SimpleITK format; 3D, or 4D with "
                         "metabolites last); repeat for each metabolite, all on one grid")
    sp.add_argument("--t1", type=Path, help="the patient's T1-weighted MRI, any grid (required)")
    sp.add_argument("--flair", type=Path, help="the patient's FLAIR MRI, any grid (required)")
    sp.add_argument("--mask", type=Path, help="quality mask, non-zero = usable spectra, any grid (default: "
                                              "automatic from the T1 and the MRSI signal, see README)")
    sp.add_argument("--out", required=True, type=Path, help="output folder: <stem>_sr, _zerofilled, "
                                                            "_uncertainty .nii.gz and <stem>_run.json per map")
    model(sp)
    sp.add_argument("--ratio", action="append", default=[],
                    help="also write a ratio of two super-resolved maps, e.g. tCho/NAA (file stems of two --lr "
                         "inputs); repeat for more")
    overwrite(sp, "existing outputs in --out")
    nan_policy(sp)
    add_dataclass_flags(sp, SuperResolveOptions)
    sp.set_defaults(func=cmd_super_resolve)

    sp = common(sub.add_parser("bids", help="BIDS App: super-resolve a BIDS dataset (docs/bids.md)"))
    sp.add_argument("bids_dir", type=Path, help="the BIDS dataset (raw, with anat/ T1w and FLAIR)")
    sp.add_argument("output_dir", type=Path, help="the derivatives dataset to write (e.g. BIDS_DIR/derivatives/ftddm)")
    sp.add_argument("analysis_level", choices=("participant", "group"),
                    help="participant: super-resolve the selected sessions; group: one TSV and an overview "
                         "over the participants already done")
    sp.add_argument("--participant-label", nargs="+", default=[], help="labels (01 or sub-01); default: all")
    sp.add_argument("--session-label", nargs="+", default=[], help="labels (V1 or ses-V1); default: all")
    sp.add_argument("--mrsi-derivatives", help="the MRSI derivatives dataset: a folder name in BIDS_DIR/derivatives "
                                               "or a path (default: every derivatives dataset there)")
    sp.add_argument("--mrsi-desc", default="signal", help="desc- of the metabolite maps (default: signal; "
                                                          "'none' for maps without desc)")
    sp.add_argument("--met", nargs="+", default=[], help="metabolites (met- labels, e.g. NAA tCho); default: all")
    sp.add_argument("--bids-filter-file", type=Path, help='JSON {"t1w"|"flair"|"mrsi"|"mask": {entity: value}} to '
                                                          "pick one image where several match")
    model(sp)
    overwrite(sp, "finished sessions (redo them)")
    nan_policy(sp)
    add_dataclass_flags(sp, SuperResolveOptions)
    sp.set_defaults(func=cmd_bids)

    sp = common(sub.add_parser("evaluate", help="compare methods on a fold's test patients: metrics, "
                                                "statistics, studies, report"))
    sp.add_argument("--data", required=True, type=Path,
                    help="dataset folder (docs/dataset_format.md), normally the one the model was trained on: its "
                         "fold's test patients are evaluated")
    sp.add_argument("--model", type=Path, help="the FTDDM model .safetensors to evaluate (default: the shipped model)")
    sp.add_argument("--out", required=True, type=Path,
                    help="report folder; a re-run into it reuses the runs in its cache/ (delete it to recompute)")
    sp.add_argument("--ddpm-model", type=Path,
                    help="a full-chain model (trained with `ftddm train --t-trunc 999`) for the methods that start "
                         "from pure noise (DDPM, DPM-Solver++ from noise) and the headline; they are skipped "
                         "without it")
    sp.add_argument("--regression-model", type=Path,
                    help="a UNet regression baseline (`ftddm train --config regression`); default: the FTDDM "
                         "model's own SR encoder, the one-pass regression of the same training")
    if wanted("evaluate"):
        from .evaluation.options import EvaluateOptions

        add_dataclass_flags(sp, EvaluateOptions)
    sp.set_defaults(func=cmd_evaluate)

    sp = common(sub.add_parser("demo", help="synthetic patient → LR → super-resolved, with a figure"))
    sp.add_argument("--out", type=Path, default=Path("ftddm_demo"),
                    help="folder for the inputs, outputs, demo_figure.png and demo_metrics.json (default: ftddm_demo)")
    model(sp)
    sp.add_argument("--seed", type=int, default=1234,
                    help="seed of the synthetic patient: another seed, another patient (default: 1234)")
    sp.add_argument("--samples", type=int, default=4,
                    help="draws per map, 1 … 64 (as super-resolve --samples; 1 gives no uncertainty) (default: 4)")
    overwrite(sp, "the files of an earlier demo in --out")
    sp.set_defaults(func=cmd_demo)
    return p


#: Python-API wording in error messages → the CLI flag that does the same (the API is shared with Slicer).
_CLI_WORDING = (("pass force=True", "pass --force"), ("pass nan_policy='zero'", "pass --nan-policy zero"),
                ("pass overwrite=True", "pass --overwrite"))


def cli_message(text: str) -> str:
    """An error or warning as a CLI user needs it: flags instead of keyword arguments."""
    text = re.sub(r" \(Python: [^)]*\)", "", text)  # messages that already name the flag
    for python, flag in _CLI_WORDING:
        text = text.replace(python, flag)
    return text


def _interrupt_on_sigterm(received: list) -> None:
    """SIGTERM (schedulers, Slicer's Cancel) takes the same way out as Ctrl-C: cleanup, one line, no traceback."""
    def handler(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _one_line_warnings(command: str) -> None:
    """Warnings as one 'ftddm <command>: warning: …' line each, not Python's file:line form."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"ftddm {command}: warning: {cli_message(str(message))}", file=file or sys.stderr, flush=True)

    warnings.showwarning = show


#: What an interrupt leaves, per command (the demo reports its own cleanup).
_INTERRUPT_NOTE = {"super-resolve": "no partial outputs were left",
                   "bids": "finished sessions are kept, the interrupted one left no partial outputs; rerun to resume",
                   "train": "rerun with --resume to continue from the last checkpoint"}


def _requested_command(argv) -> str:
    """The subcommand named in argv ("" when none): its first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), "")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_requested_command(argv)).parse_args(argv)
    received: list[int] = []
    previous = (signal.getsignal(signal.SIGTERM), warnings.showwarning)
    _interrupt_on_sigterm(received)
    _one_line_warnings(args.command)
    try:
        return _run(args, received)
    finally:  # main() is also called in-process (tests, scripts): leave the process as it was
        warnings.showwarning = previous[1]
        if threading.current_thread() is threading.main_thread() and previous[0] is not None:
            signal.signal(signal.SIGTERM, previous[0])


def _run(args, received: list) -> int:
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"ftddm {args.command}: error: {cli_message(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        sig = signal.SIGTERM if signal.SIGTERM in received else signal.SIGINT
        detail = str(exc) if str(exc) and str(exc) not in ("SIGTERM", "SIGINT") else _INTERRUPT_NOTE.get(args.command)
        print(f"ftddm {args.command}: interrupted ({sig.name})" + (f"; {detail}" if detail else ""),
              file=sys.stderr)
        return 128 + int(sig)


if __name__ == "__main__":
    sys.exit(main())
