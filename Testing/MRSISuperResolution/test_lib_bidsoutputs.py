"""bidsoutputs (a participant's `ftddm bids` outputs) and loading them with matched display on slicer-core."""
import json

import numpy as np
import pytest

from MRSISuperResolutionLib import bidsoutputs, niftiio


def write_outputs(root, sub="01", ses="V1", mets=("NAA", "Cr"), skip=()):
    folder = root / f"sub-{sub}" / f"ses-{ses}" / "mrs"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for met in mets:
        for desc in bidsoutputs.KIND_OF_DESC:
            if (met, desc) in skip:
                continue
            stem = f"sub-{sub}_ses-{ses}_space-orig_met-{met}_desc-{desc}_mrsi"
            niftiio.write_nifti(folder / f"{stem}.nii.gz", rng.random((6, 5, 2)).astype(np.float32) * 3, np.eye(4))
            (folder / f"{stem}.json").write_text(json.dumps({"Inputs": [{"role": "T1w", "path": "anat/t1.nii.gz"}]}))
    return folder


def test_maps_are_grouped_by_session_and_metabolite(tmp_path):
    write_outputs(tmp_path, ses="V1")
    write_outputs(tmp_path, ses="V2", mets=("NAA",))
    (tmp_path / "anat").mkdir()
    niftiio.write_nifti(tmp_path / "anat/t1.nii.gz", np.ones((2, 2, 2), np.float32), np.eye(4))
    (tmp_path / "dataset_description.json").write_text(json.dumps({"DatasetLinks": {"raw": tmp_path.as_uri()}}))
    maps = bidsoutputs.participant_outputs(tmp_path, "sub-01")
    assert [(m.session, m.metabolite, m.name) for m in maps] == [
        ("V1", "Cr", "sub-01_ses-V1_Cr"), ("V1", "NAA", "sub-01_ses-V1_NAA"), ("V2", "NAA", "sub-01_ses-V2_NAA")]
    assert set(maps[0].files) == {"sr", "zerofilled", "uncertainty"}
    assert maps[0].anatomy == {"T1w": tmp_path / "anat/t1.nii.gz"}
    assert set(bidsoutputs.SHARED_WINDOW) | set(bidsoutputs.OWN_WINDOW) == set(maps[0].files)


def test_incomplete_or_absent_outputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="no outputs of sub-01"):
        bidsoutputs.participant_outputs(tmp_path, "01")
    write_outputs(tmp_path, mets=("NAA",), skip={("NAA", "zerofilled")})
    with pytest.raises(ValueError, match="zerofilled"):
        bidsoutputs.participant_outputs(tmp_path, "01")


def test_loading_a_map_gives_the_matched_display(tmp_path):
    slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' package is not slicer-core")
    from MRSISuperResolutionLib import display, mrml

    write_outputs(tmp_path, mets=("NAA",))
    entry = bidsoutputs.participant_outputs(tmp_path, "01")[0]
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    try:
        nodes = mrml.load_map_outputs(scene, entry.files, entry.name)
        assert nodes["sr"].GetName() == "sub-01_ses-V1_NAA_SR"
        arrays = [niftiio.read_nifti(entry.files[k])[0] for k in ("sr", "zerofilled")]
        window = display.shared_window(arrays)
        for kind in ("sr", "zerofilled"):
            d = nodes[kind].GetDisplayNode()
            assert (d.GetWindowLevelMin(), d.GetWindowLevelMax()) == pytest.approx(window)
        unc = display.shared_window([niftiio.read_nifti(entry.files["uncertainty"])[0]])
        d = nodes["uncertainty"].GetDisplayNode()
        assert (d.GetWindowLevelMin(), d.GetWindowLevelMax()) == pytest.approx(unc)
        assert d.GetColorNodeID() != nodes["sr"].GetDisplayNode().GetColorNodeID()
        np.testing.assert_array_equal(mrml.volume_arrays(nodes["sr"])[0], arrays[0])
    finally:
        scene.Clear(1)
