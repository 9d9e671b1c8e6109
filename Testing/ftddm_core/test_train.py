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
        for key in ("encoder", "diffusion", "nll", "guide", "total"):
            assert torch.isfinite(torch.tensor(float(r[key])))
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    for name in ("model.safetensors", "best.safetensors"):
        model = FTDDM.load(tmp_path / "run" / name)
        assert model.config.name == "tiny"
        with safe_open(str(tmp_path / "run" / name), framework="pt") as fh:  # the split travels with the model
            assert json.loads(fh.metadata()["training"])["data"]["test"] == info["data"]["test"]
    assert info["data"]["train"] and not set(info["data"]["train"]) & set(info["data"]["test"])
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0


@pytest.mark.parametrize("stage, networks", [("all", {"encoder", "unet", "flow"}), ("encoder", {"encoder"}),
                                             ("diffusion", {"unet"}), ("flow", {"flow"})])
def test_each_stage_trains_exactly_its_networks(tiny_dataset, tmp_path, stage, networks):
    torch.manual_seed(0)
    before = FTDDM(preset("tiny")).state_dict()
    run(tiny_dataset, tmp_path / "run", 2, opts={"ema_decay": 0.0, "stage": stage, "warmup": 1})
    after = FTDDM.load(tmp_path / "run" / "model.safetensors").state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == networks
    row = read_log(tmp_path / "run" / "log.csv")[-1]
    assert all(torch.isfinite(torch.tensor(float(row[k]))) for k in ("encoder", "total"))
    assert ("nll" in row) == ("flow" in networks) and ("diffusion" in row) == ("unet" in networks)
    with safe_open(str(tmp_path / "run" / "last.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "ftddm-training-state/2" and set(json.loads(meta["optimizers"])) == networks


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


def test_regression_baseline_trains_only_the_encoder(tiny_dataset, tmp_path):
    cfg = preset("tiny")
    cfg.kind, cfg.name = "regression", "tiny-regression"
    src, val, _ = training_sources(tiny_dataset, fold=0, seed=0)
    train(cfg, src, tmp_path / "reg", TrainOptions(iterations=2, **OPTS), val_source=val)
    rows = read_log(tmp_path / "reg" / "log.csv")
    assert "encoder" in rows[0] and "nll" not in rows[0] and "diffusion" not in rows[0]
    model = FTDDM.load(tmp_path / "reg" / "model.safetensors")
    assert model.unet is None and model.flow is None
    cond = torch.rand(2, 4, 64, 64)
    cond[:, 1] = 1
    result = model.sample(cond, torch.tensor([4.0, 4.0]))
    assert result.nfe == 1 and torch.equal(result.std, torch.zeros_like(result.std))


def test_learning_rate_warms_up_linearly_then_decays_linearly_to_zero():
    # min(1, (s+1)/warmup)·(1 − s/iterations), by hand for warmup 10 over 100 iterations
    expected = {0: 0.1, 4: 0.5 * 0.96, 9: 0.91, 10: 0.90, 50: 0.5, 99: 0.01}
    for step, value in expected.items():
        assert lr_factor(step, 100, 10) == pytest.approx(value)
    assert lr_factor(0, 100, 0) == pytest.approx(1.0)  # no warm-up


def test_logged_learning_rates_follow_the_schedule(tiny_dataset, tmp_path):
    run(tiny_dataset, tmp_path / "run", 3, opts={"warmup": 2, "lr": 1e-3})
    lrs = [float(r["lr"]) for r in read_log(tmp_path / "run" / "log.csv")]
    assert lrs == pytest.approx([1e-3 * 0.5, 1e-3 * (1 - 1 / 3), 1e-3 * (1 - 2 / 3)])


def test_ema_decay_warms_up():
    # min(d, (1 + step)/(10 + step)): 0.1 at the first step, the configured decay once (1+s)/(10+s) exceeds it
    assert [ema_decay_at(s, 0.999) for s in (0, 1, 90)] == pytest.approx([0.1, 2 / 11, 0.91])
    assert ema_decay_at(100_000, 0.999) == 0.999 and ema_decay_at(5, 0.0) == 0.0


def test_resume_refuses_a_v1_checkpoint_and_a_different_stage(tiny_dataset, tmp_path):
    from safetensors.torch import save_file

    run(tiny_dataset, tmp_path / "run", 1)
    with pytest.raises(ValueError, match="same --stage"):
        run(tiny_dataset, tmp_path / "run", 2, resume=True, opts={"stage": "flow"})
    save_file({"w": torch.zeros(1)}, str(tmp_path / "run" / "last.safetensors"),
              metadata={"format": "ftddm-training-state/1"})
    with pytest.raises(ValueError, match="not an ftddm v2 training checkpoint"):
        run(tiny_dataset, tmp_path / "run", 2, resume=True)


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


def test_cli_fine_tunes_from_an_initial_model(tiny_dataset, tmp_path):
    """`ftddm train --init MODEL` starts from that model's weights and config (fine-tuning on one's own data)."""
    from ftddm_core.cli import main

    run(tiny_dataset, tmp_path / "base", 2)
    base = FTDDM.load(tmp_path / "base" / "model.safetensors")
    args = ["train", "--data", str(tiny_dataset), "--out", str(tmp_path / "tuned"), "--init",
            str(tmp_path / "base" / "model.safetensors"), "--iterations", "1", "--batch-size", "2", "--val-every", "1",
            "--val-batches", "1", "--lr", "0", "--flow-lr", "0", "--device", "cpu", "--config", "compact"]
    assert main(args) == 0
    tuned = FTDDM.load(tmp_path / "tuned" / "model.safetensors")
    assert tuned.config.name == "tiny"  # the initial model's config wins over --config
    # learning rate 0 and EMA: the weights are the initial model's (actnorm is not re-initialised either)
    for (name, a), b in zip(base.state_dict().items(), tuned.state_dict().values()):
        assert torch.equal(a, b), name
    other = [str(tmp_path / "tuned2") if a == str(tmp_path / "tuned") else a for a in args]
    assert main([*other, "--t-trunc", "50"]) == 2  # fine-tuning keeps the initial model's Ttrunc
