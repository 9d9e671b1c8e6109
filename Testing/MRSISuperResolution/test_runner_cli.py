"""The module's background runner driving the real `ftddm super-resolve` (ftddm_core.cli) without Slicer."""
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from MRSISuperResolutionLib import geometry, runner
from MRSISuperResolutionLib.options import SuperResolveOptions
from MRSISuperResolutionLib.process import _descendants, pid_alive

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("torch")


def make_job(tmp_path, patient, model, **params):
    job = runner.SuperResolveJob([sys.executable], REPO, temp_parent=str(tmp_path))
    job.prepare([patient["NAA"], patient["tCho"]], patient["T1"], patient["FLAIR"], model=str(model),
                parameters=SuperResolveOptions(device="cpu", **params))
    return job


def test_run_parses_progress_reads_outputs_and_removes_temporary_files(tmp_path, sample_patient, tiny_model):
    job = make_job(tmp_path, sample_patient, tiny_model, steps=1, samples=2, seed=3)
    assert job.folder.parent == tmp_path and (job.folder / "in" / "map0.nii").exists()
    progress = []
    state = job.wait(timeout=120, on_line=lambda line: progress.append(job.progress))
    assert state == runner.COMPLETED, job.error_message
    seen = [p for p in progress if p is not None]
    assert seen and all(0 <= p.done <= p.total for p in seen) and seen[-1].total > 0
    assert not any(line.startswith("PROGRESS") for line in job.log)  # progress goes to the bar, not the log

    outputs = job.outputs()
    assert len(outputs) == 2 and set(outputs[0]) == set(runner.OUTPUT_KINDS)
    lr_data, lr_affine = sample_patient["NAA"]
    axis, m, factor = geometry.detect_upscaling_factor(lr_data.shape, lr_affine)
    assert (axis, m, factor) == (2, 16, 4.0)
    expected = lr_affine.copy()
    expected[:3, :2] /= factor  # sample-aligned model grid: same origin and directions, in-plane spacing / s
    for maps in outputs:
        for kind, (data, affine) in maps.items():
            assert data.shape == (64, 64, 6) and data.dtype == np.float32, kind
            np.testing.assert_allclose(affine, expected, atol=1e-4)
            assert np.all(np.isfinite(data))
    zf = outputs[0]["zerofilled"][0]
    np.testing.assert_allclose(zf[::4, ::4, :], np.abs(lr_data), rtol=1e-3, atol=1e-3)  # ZF keeps LR samples
    assert np.all(outputs[0]["uncertainty"][0] >= 0)
    report = job.run_report()
    assert report["options"]["steps"] == 1 and report["grid"]["factor"] == 4.0

    job.cleanup()
    assert not job.folder.exists()
    assert list(tmp_path.iterdir()) == []


def test_user_errors_surface_as_one_line(tmp_path, sample_patient, tiny_model):
    bad_t1 = (np.zeros_like(sample_patient["T1"][0]), sample_patient["T1"][1])
    job = runner.SuperResolveJob([sys.executable], REPO, temp_parent=str(tmp_path))
    job.prepare([sample_patient["NAA"]], bad_t1, sample_patient["FLAIR"], model=str(tiny_model),
                parameters=SuperResolveOptions(device="cpu", steps=1, samples=1))
    with job:
        assert job.wait(timeout=120) == runner.FAILED
        assert job.returncode == 2
        assert job.error_message and "\n" not in job.error_message
        with pytest.raises(RuntimeError, match="failed"):
            job.outputs()
    assert not job.folder.exists()


def test_cancel_kills_the_process_tree_and_cleans_up(tmp_path, sample_patient, tiny_model):
    job = make_job(tmp_path, sample_patient, tiny_model, sampler="respaced", start="flow", steps=100, samples=32)
    job.start()
    deadline = time.monotonic() + 60
    while job.progress is None and job.state == runner.RUNNING and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    assert job.progress is not None and job.state == runner.RUNNING  # sampling has started
    tree = [job.pid, *_descendants(job.pid)]
    job.cancel()
    assert job.state == runner.CANCELLED
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(p) for p in tree)
    with pytest.raises(RuntimeError, match="cancelled"):
        job.outputs()
    job.cleanup()
    assert not job.folder.exists()
