"""How the default τ_f was chosen: on fold 0's VALIDATION patients (never the test ones or the held-out kinds).

Prints, per factor F = 2 and 4, PSNR / SSIM / (RMSE ÷ mean std inside the mask) of the regression (the encoder)
and of the default sampler at τ_f = 1, 0.7, 0.5, 0.3 (4 samples, 12 maps of 4 validation patients).
Run: PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python scripts/choose_tau_f.py   (about 3 minutes on one core)
Output of 2026-12-01 (AMD EPYC, one core), bench/choose_tau_f.txt.
"""
import json, torch, numpy as np
from ftddm_core.data import load_dataset, SliceDataset
from ftddm_core.model import load_model
from ftddm_core import metrics
from ftddm_core.device import generator as make_generator
torch.set_num_threads(1)
model = load_model(device="cpu")
val_ids = json.loads(open("runs/v2_fold0/run.json").read())["data"]["validation"]
ds = SliceDataset(load_dataset("runs/invivo50", val_ids[:4]), image_size=None, augment=False)
idx = np.linspace(0, len(ds) - 1, 12).round().astype(int)
rows = {}
for F in (2.0, 4.0):
    exs = [ds[(int(i), F)] for i in idx]
    def run(**kw):
        ps, ss, err, sd = [], [], [], []
        for ex in exs:
            c = ex["cond"][None]; s = torch.tensor([ex["scale"]])
            r = model.sample(c, s, force_scale=True, generator=make_generator(torch.device("cpu"), 0), **kw)
            out = r.mean[0, 0].numpy(); gt = ex["x0"][0].numpy(); m = ex["mask"][0].numpy() > 0
            mm = metrics.all_metrics(gt, out); ps.append(mm["psnr"]); ss.append(mm["ssim"])
            err.append(np.sqrt(np.mean((out - gt)[m] ** 2))); sd.append(r.std[0, 0].numpy()[m].mean())
        return round(float(np.mean(ps)), 2), round(float(np.mean(ss)), 4), round(float(np.mean(err) / max(np.mean(sd), 1e-9)), 2)
    print(F, "regression", run(sampler="regression"), flush=True)
    for tau in (1.0, 0.7, 0.5, 0.3):
        print(F, "tau_f", tau, run(sampler="dpmpp", n_samples=4, tau_f=tau), flush=True)
