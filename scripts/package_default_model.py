"""Package a training run as the shipped default model: weights + config + model card in one safetensors file,
and the same card as JSON beside it (ftddm_core/weights/ftddm_compact.{safetensors,json}).

Run: .venv/bin/python scripts/package_default_model.py --run runs/v2_fold0
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from ftddm_core.atomic import atomic_write_text
from ftddm_core.model import DEFAULT_MODEL, FTDDM, file_sha256
from ftddm_core.nnutil import count_parameters


def training_summary(run: Path) -> dict:
    info = json.loads((run / "run.json").read_text())
    with open(run / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    logged = [r for r in rows if r.get("seconds_per_iter")]
    last = logged[-1]
    vals = [(int(float(r["step"])), float(r["val"])) for r in rows if r.get("val")]
    data = dict(info["data"])
    if "dataset" in data:  # never a machine-specific path in the shipped card: relative to the repository
        root = Path(__file__).resolve().parents[1]
        data["dataset"] = str(Path(data["dataset"]).resolve().relative_to(root)) \
            if Path(data["dataset"]).resolve().is_relative_to(root) else Path(data["dataset"]).name
    return {"iterations": int(float(last["step"])),
            "wall_time_hours": round(float(last["seconds_per_iter"]) * int(float(last["step"])) / 3600, 2),
            "options": info["options"], "data": data,
            "final_train_losses": {k: round(float(last[k]), 4) for k in ("encoder", "diffusion", "nll", "guide")
                                   if last.get(k)},
            "validation_loss": {"first": vals[0], "best": min(vals, key=lambda v: v[1]), "last": vals[-1]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--checkpoint", default="model.safetensors", help="model.safetensors (final EMA) or best")
    ap.add_argument("--out", type=Path, default=DEFAULT_MODEL)
    args = ap.parse_args()
    model = FTDDM.load(args.run / args.checkpoint)
    card = {
        "name": "ftddm_compact",
        "description": "FTDDM v2 (SR encoder + residual conditional flow + truncated diffusion, Ttrunc = 100) in "
                       "the compact CPU-trainable config, trained on in-vivo-like synthetic glioma patients "
                       "(ftddm phantom --realism invivo) only.",
        "config": model.config.name,
        "parameters": {part: count_parameters(getattr(model, part)) for part in ("encoder", "unet", "flow")},
        "training": training_summary(args.run),
        "source_checkpoint": {"file": args.checkpoint, "sha256": file_sha256(args.run / args.checkpoint)},
        # the evaluations of this exact file (its sha256 is in them), kept beside the code, not inside the weights
        "evaluation": {"fold0_report": "bench/evaluate_v2_fold0/report.md",
                       "heldout_kinds": "bench/invivo_kinds.md",
                       "reproduce": "scripts/evaluate_default_model.sh"},
        "training_data": "50 synthetic patients of ftddm_core.invivo (kind mixed): MNI152 anatomy with glioma "
                         "lesions, oblique slabs, HR matrices 24–80 per axis at 2.5–7 mm, k-space-limited maps "
                         "(none/Hamming) with k-space noise (in-brain SNR 5–40), scalp lipid, B0 dropout, "
                         "realistic quality masks, arbitrary units; fold 0 of 5 (30/10/10 patients).",
        "not_trained_on": "any real (in vivo) MRSI acquisition; non-glioma pathology; 7T-specific metabolites "
                          "beyond the simulated ones; upscaling factors outside 2 … 8.",
        "intended_use": "research use only, not for diagnosis; super-resolution of 2D metabolite maps by an "
                        "in-plane factor 2 … 8, conditioned on T1 and FLAIR. Trained on synthetic data only: "
                        "validate on your own acquisitions (or fine-tune with `ftddm train --data`) before "
                        "drawing conclusions.",
        "reproduce": "scripts/train_default_model.sh",
    }
    model.save(args.out, overwrite=True, extra={"model_card": card})
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(card, indent=2, ensure_ascii=False))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
