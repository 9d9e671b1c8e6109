"""Training: a few CPU steps on a tiny phantom, finite losses, checkpoint round trip, resume, no silent overwrite."""
import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ftddm_core.config import preset
from ftddm_core.data import training_sources
from ftddm_core.model import FTDDM
from ftddm_core.train import TrainOptions, ema_decay_at, lr_factor, train

OPTS = dict(batch_size=2, val_every=2, val_batches=1, log_every=1, device="cpu")


def run(tiny_dataset, out, iterations, **kw):
    src, val, info = training_sources(tiny_dataset, fold=0, seed=0)
    opts = TrainOptions(iterations=iterations, **{**OPTS, **kw.pop("opts", {})})
    return train(preset(kw.pop("config", "tiny")), src, out, opts, val_source=val, data_info=info, **kw)


def read_log(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_a_few_steps_give_finite_losses_and_loadable_models(tiny_dataset, tmp_path):
    summary = run(tiny_dataset, tmp_path / "run", 3)
    assert summary["step"] == 3
    rows = read_log(tmp_path / "run" / "log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("diffusion", "nll", "guide", "total"):
            assert torch.isfinite(torch.tensor(float(r[key])))
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    for name in ("model.safetensors", "best.safetensors"):
        model = FTDDM.load(tmp_path / "run" / name)
        assert model.config.name == "tiny"
        with safe_open(str(tmp_path / "run" / name), framework="pt") as fh:  # the split travels with the model
            assert json.loads(fh.metadata()["training"])["data"]["test"] == info["data"]["test"]
    assert info["data"]["train"] and not set(info["data"]["train"]) & set(info["data"]["test"])
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0


def test_training_changes_both_networks(tiny_dataset, tmp_path):
    torch.manual_seed(0)
    before = FTDDM(preset("tiny")).state_dict()
    run(tiny_dataset, tmp_path / "run", 2, opts={"ema_decay": 0.0})
    after = FTDDM.load(tmp_path / "run" / "model.safetensors").state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"unet", "flow"}


class Interrupt(Exception):
    pass


def test_resume_continues_the_step_count_and_matches_an_uninterrupted_run(tiny_dataset, tmp_path):
    run(tiny_dataset, tmp_path / "a", 4)

    def stop_at_3(row):
        if row["step"] == 3:
            raise Interrupt  # like Ctrl-C after step 3's update, before its checkpoint

    with pytest.raises(Interrupt):
        run(tiny_dataset, tmp_path / "b", 4, progress=stop_at_3)
    summary = run(tiny_dataset, tmp_path / "b", 4, resume=True)
    assert summary["step"] == 4
    assert [int(r["step"]) for r in read_log(tmp_path / "b" / "log.csv")] == [1, 2, 3, 4]
    a = FTDDM.load(tmp_path / "a" / "model.safetensors").state_dict()
    b = FTDDM.load(tmp_path / "b" / "model.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # weights, EMA, optimisers and RNG all restored


def test_no_silent_overwrite(tiny_dataset, tmp_path):
    run(tiny_dataset, tmp_path / "run", 1)
    with pytest.raises(FileExistsError, match="--resume"):
        run(tiny_dataset, tmp_path / "run", 1)
    run(tiny_dataset, tmp_path / "run", 1, force=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(tiny_dataset, tmp_path / "fresh", 1, resume=True)


def test_resume_refuses_a_different_config(tiny_dataset, tmp_path):
    run(tiny_dataset, tmp_path / "run", 1)
    with pytest.raises(ValueError, match="different config"):
        run(tiny_dataset, tmp_path / "run", 2, resume=True, config="regression")


def test_regression_baseline_trains_only_the_unet(tiny_dataset, tmp_path):
    cfg = preset("tiny")
    cfg.kind, cfg.name = "regression", "tiny-regression"
    src, val, _ = training_sources(tiny_dataset, fold=0, seed=0)
    train(cfg, src, tmp_path / "reg", TrainOptions(iterations=2, **OPTS), val_source=val)
    rows = read_log(tmp_path / "reg" / "log.csv")
    assert "regression" in rows[0] and "nll" not in rows[0]
    model = FTDDM.load(tmp_path / "reg" / "model.safetensors")
    cond = torch.rand(2, 4, 64, 64)
    cond[:, 1] = 1
    result = model.sample(cond, torch.tensor([4.0, 4.0]))
    assert result.nfe == 1 and torch.equal(result.std, torch.zeros_like(result.std))


def test_flow_step_decay():
    assert [flow_lr_factor(s, 100) for s in (0, 49, 50, 75, 90, 99)] == [1, 1, 0.5, 0.25, 0.125, 0.125]


def test_options_are_validated():
    with pytest.raises(ValueError, match="stage"):
        TrainOptions(stage="gan")
    with pytest.raises(ValueError):
        TrainOptions(iterations=0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_on_cpu(tiny_dataset, tmp_path):
    """torchrun-style launch of 2 gloo processes: both ranks step, rank 0 writes, weights stay in sync."""
    script = tmp_path / "ddp_main.py"
    script.write_text(
        "import sys, torch\n"
        "from ftddm_core.config import preset\n"
        "from ftddm_core.data import training_sources\n"
        "from ftddm_core.train import TrainOptions, train\n"
        "src, val, info = training_sources(sys.argv[1], fold=0, seed=0)\n"
        "train(preset('tiny'), src, sys.argv[2], TrainOptions(iterations=2, batch_size=2, val_every=2,"
        " val_batches=1, log_every=1, device='cpu'), val_source=val)\n"
        "import torch.distributed as dist\n"
        "from ftddm_core.model import FTDDM\n"
        "m = FTDDM.load(sys.argv[2] + '/model.safetensors') if dist.get_rank() == 0 else None\n"
        "print('rank', dist.get_rank(), 'world', dist.get_world_size(), flush=True)\n"
        "dist.destroy_process_group()\n"
    )
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [subprocess.Popen([sys.executable, str(script), str(tiny_dataset), str(tmp_path / "ddp")],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "rank 0 world 2" in outs[0] and "rank 1 world 2" in outs[1]
    assert (tmp_path / "ddp" / "model.safetensors").exists()
