"""MRML-level behaviour on Slicer's real MRML libraries (the `slicer-core` wheel, no Slicer application)."""
import json

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")
vtk = pytest.importorskip("vtk")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

from MRSISuperResolutionLib import display, layouts, mrml, niftiio  # noqa: E402


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    slicer.mrmlScene = s  # slicer.util helpers default to it
    yield s
    s.Clear(1)


def oblique_affine(seed=0, spacing=(13.75, 13.75, 10.0)):
    a = np.eye(4)
    a[:3, :3] = Rotation.from_euler("xyz", [12, -7, 25], degrees=True).as_matrix() * np.asarray(spacing)
    a[:3, 3] = (-103.0, -95.5, -23.9)
    return a


def vtk_matrix_array(get):
    m = vtk.vtkMatrix4x4()
    get(m)
    return slicer.util.arrayFromVTKMatrix(m)


def new_volume(scene, data_ijk, affine, name="v", cls="vtkMRMLScalarVolumeNode"):
    node = scene.AddNewNodeByClass(cls, name)
    mrml.set_volume_from_arrays(node, data_ijk, affine)
    node.CreateDefaultDisplayNodes()
    return node


# --- volume node ↔ array ↔ geometry -------------------------------------------------------------------------
def test_oblique_volume_round_trip_and_slicer_geometry(scene, tmp_path):
    rng = np.random.default_rng(0)
    data = rng.random((16, 12, 6)).astype(np.float32)  # (i, j, k)
    affine = oblique_affine()
    node = new_volume(scene, data, affine)
    assert node.GetImageData().GetDimensions() == (16, 12, 6)
    kji = slicer.util.arrayFromVolume(node)
    assert kji.shape == (6, 12, 16) and kji[5, 11, 15] == data[15, 11, 5]
    np.testing.assert_allclose(node.GetSpacing(), np.linalg.norm(affine[:3, :3], axis=0))  # Slicer's decomposition
    np.testing.assert_allclose(node.GetOrigin(), affine[:3, 3])
    directions = np.zeros((3, 3))
    node.GetIJKToRASDirections(directions)
    np.testing.assert_allclose(directions, affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0), atol=1e-12)
    np.testing.assert_allclose(vtk_matrix_array(node.GetRASToIJKMatrix), np.linalg.inv(affine), atol=1e-10)
    back, back_affine = mrml.volume_arrays(node)
    np.testing.assert_array_equal(back, data)
    np.testing.assert_allclose(back_affine, affine, atol=1e-10)
    # Slicer's own NRRD writer/reader (ITK, LPS on disk) keeps the same geometry
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "v.nrrd"))
    assert storage.WriteData(node) and (tmp_path / "v.nrrd").exists()
    reader = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    reader.SetFileName(str(tmp_path / "v.nrrd"))
    reread = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "r")
    assert reader.ReadData(reread)
    np.testing.assert_allclose(vtk_matrix_array(reread.GetIJKToRASMatrix), affine, atol=1e-5)
    np.testing.assert_array_equal(mrml.volume_arrays(reread)[0], data)


def test_parent_transforms_linear_applied_nonlinear_refused(scene):
    affine = oblique_affine()
    node = new_volume(scene, np.ones((4, 4, 2), np.float32), affine)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    to_parent = np.eye(4)
    to_parent[:3, :3] = Rotation.from_euler("z", 30, degrees=True).as_matrix()
    to_parent[:3, 3] = (5, -3, 12)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(to_parent))
    node.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_allclose(mrml.node_world_affine(node), to_parent @ affine, atol=1e-10)
    node.HardenTransform()  # Slicer's own hardening gives the same world geometry
    np.testing.assert_allclose(vtk_matrix_array(node.GetIJKToRASMatrix), to_parent @ affine, atol=1e-8)

    warp = scene.AddNewNodeByClass("vtkMRMLTransformNode")
    tps = vtk.vtkThinPlateSplineTransform()
    src, dst = vtk.vtkPoints(), vtk.vtkPoints()
    for p in [(0, 0, 0), (10, 0, 0), (0, 10, 0), (0, 0, 10)]:
        src.InsertNextPoint(p)
        dst.InsertNextPoint(p[0] + 1, p[1], p[2] + p[0] / 10)
    tps.SetSourceLandmarks(src)
    tps.SetTargetLandmarks(dst)
    warp.SetAndObserveTransformToParent(tps)
    node.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(ValueError, match="non-linear"):
        mrml.node_world_affine(node)


def test_output_nodes_take_the_cli_nifti_affine(scene, tmp_path):
    """What the CLI writes (ftddm_core's NIfTI writer) becomes the node's IJKToRAS, as Slicer's reader sees it."""
    vol = pytest.importorskip("ftddm_core.volume")
    affine = oblique_affine(spacing=(3.4375, 3.4375, 10.0))
    data = np.random.default_rng(1).random((64, 64, 5)).astype(np.float32)
    path = vol.save_volume(vol.Volume(data, affine), tmp_path / "map0_sr.nii.gz")
    lr = new_volume(scene, np.ones((16, 16, 5), np.float32), oblique_affine(), name="NAA")
    maps = {kind: niftiio.read_nifti(path) for kind in mrml.OUTPUT_SUFFIX}
    nodes = mrml.store_outputs(scene, lr, maps, json.dumps({"tau_d": 0.9}))
    sr = nodes["sr"]
    np.testing.assert_allclose(vtk_matrix_array(sr.GetIJKToRASMatrix), affine, atol=1e-4)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(sr), np.transpose(data, (2, 1, 0)))
    # independent path: Slicer's ITK-based NIfTI reader (LPS → RAS internally) gives the same grid and voxels
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    itk_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "itk")
    assert storage.ReadData(itk_node)
    np.testing.assert_allclose(vtk_matrix_array(itk_node.GetIJKToRASMatrix),
                               vtk_matrix_array(sr.GetIJKToRASMatrix), atol=1e-4)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(itk_node), slicer.util.arrayFromVolume(sr))
    assert sr.GetName() == "NAA_SR" and sr.GetAttribute(mrml.ROLE_ATTRIBUTE) == "sr"
    assert json.loads(sr.GetAttribute(mrml.SETTINGS_ATTRIBUTE)) == {"tau_d": 0.9}
    # a re-run updates the same nodes instead of adding new ones
    count = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    again = mrml.store_outputs(scene, lr, maps)
    assert {k: n.GetID() for k, n in again.items()} == {k: n.GetID() for k, n in nodes.items()}
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == count


def test_outputs_sit_beside_the_input_in_the_subject_hierarchy(scene):
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1")
    study = sh.CreateStudyItem(patient, "MRSI study")
    lr = new_volume(scene, np.ones((16, 16, 4), np.float32), oblique_affine(), name="NAA")
    sh.CreateItem(study, lr)
    a = np.eye(4)
    nodes = mrml.store_outputs(scene, lr, {k: (np.ones((8, 8, 4), np.float32), a) for k in mrml.OUTPUT_SUFFIX})
    for node in nodes.values():
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study
    assert mrml.outputs_of(lr) == nodes


def test_same_grid_volumes_finds_other_metabolites_only(scene):
    a = oblique_affine()
    naa = new_volume(scene, np.ones((16, 16, 4), np.float32), a, "NAA")
    cho = new_volume(scene, np.ones((16, 16, 4), np.float32), a, "tCho")
    new_volume(scene, np.ones((16, 16, 4), np.float32), a @ np.diag([1, 1, 1.01, 1]), "shifted")
    new_volume(scene, np.ones((16, 16, 4), np.float32), a, "mask", cls="vtkMRMLLabelMapVolumeNode")
    new_volume(scene, np.ones((16, 16, 5), np.float32), a, "bigger")
    out = new_volume(scene, np.ones((16, 16, 4), np.float32), a, "old output")
    out.SetAttribute(mrml.ROLE_ATTRIBUTE, "sr")
    assert [n.GetName() for n in mrml.same_grid_volumes(scene, naa)] == ["NAA", "tCho"]
    assert [n.GetName() for n in mrml.same_grid_volumes(scene, naa, exclude=[naa])] == ["tCho"]
    assert mrml.same_grid_volumes(scene, None) == []
    assert cho


# --- display ----------------------------------------------------------------------------------------------------
def test_compared_maps_share_window_colour_and_interpolation(scene):
    rng = np.random.default_rng(2)
    a = np.eye(4)
    sr = new_volume(scene, rng.uniform(0, 12, (8, 8, 3)).astype(np.float32), a, "sr")
    zf = new_volume(scene, rng.uniform(0, 6, (8, 8, 3)).astype(np.float32), a, "zf")
    unc = new_volume(scene, rng.uniform(0, 1, (8, 8, 3)).astype(np.float32), a, "unc")
    color_logic = slicer.vtkMRMLColorLogic()  # creates the built-in tables, as in the application
    color_logic.SetMRMLScene(scene)
    window = mrml.show_outputs(scene, {"sr": sr, "zerofilled": zf, "uncertainty": unc}, interpolate=False)
    expected = display.shared_window([slicer.util.arrayFromVolume(sr), slicer.util.arrayFromVolume(zf)])
    assert window == pytest.approx(expected)
    d_sr, d_zf, d_unc = (n.GetDisplayNode() for n in (sr, zf, unc))
    for d in (d_sr, d_zf):
        assert not d.GetAutoWindowLevel()
        assert (d.GetWindowLevelMin(), d.GetWindowLevelMax()) == pytest.approx(window)
        assert d.GetColorNodeID() == "vtkMRMLColorTableNodeIron"  # Viridis file table absent here → fallback
        assert d.GetInterpolate() == 0 and d.GetApplyThreshold() == 1
        assert 0 < d.GetLowerThreshold() < 1e-3 * window[1]  # zero background is transparent
    assert d_unc.GetColorNodeID() == "vtkMRMLColorTableNodeRainbow" and d_unc.GetInterpolate() == 0
    # the application's file-based table is preferred when it exists
    viridis = slicer.vtkMRMLColorTableNode()
    viridis.SetSingletonTag("FileViridis.txt")
    viridis.SetTypeToGrey()
    scene.AddNode(viridis)
    mrml.show_outputs(scene, {"sr": sr, "zerofilled": zf})
    assert d_sr.GetColorNodeID() == d_zf.GetColorNodeID() == "vtkMRMLColorTableNodeFileViridis.txt"
    assert d_sr.GetInterpolate() == 1


# --- layouts and linked views ---------------------------------------------------------------------------------
def application(scene):
    """Slice views of a registered layout with their logics and composite nodes, as the layout manager makes."""
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    app = slicer.vtkMRMLApplicationLogic()
    app.SetMRMLScene(scene)
    layout_logic = slicer.vtkMRMLLayoutLogic()
    layout_logic.SetMRMLScene(scene)
    return app, layout_logic


def make_slice_logics(scene, app):
    logics, collection = {}, vtk.vtkCollection()
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        logic.SetSliceNode(node)
        logics[node.GetLayoutName()] = logic
        collection.AddItem(logic)
    app.SetSliceLogics(collection)
    return logics


def test_layout_registration_survives_a_module_reload(scene):
    app, layout_logic = application(scene)
    layout_node = layout_logic.GetLayoutNode()
    assert layouts.COMPARE_LAYOUT_ID > slicer.vtkMRMLLayoutNode.SlicerLayoutUserView
    mrml.register_layout(layout_node, layouts.COMPARE_LAYOUT_ID, layouts.compare_layout_xml("Sagittal"))
    mrml.register_layout(layout_node, layouts.COMPARE_LAYOUT_ID, layouts.compare_layout_xml())  # reload
    assert layout_node.GetLayoutDescription(layouts.COMPARE_LAYOUT_ID) == layouts.compare_layout_xml()
    layout_node.SetViewArrangement(layouts.COMPARE_LAYOUT_ID)
    for spec in layouts.COMPARE_VIEWS:
        node = mrml.slice_node(scene, spec.name)
        assert node is not None, spec.name
        assert node.GetLayoutLabel() == spec.label
        assert node.GetViewGroup() == layouts.COMPARE_VIEW_GROUP
        assert node.GetOrientation() == "Axial"


def test_linked_views_move_together_and_only_within_their_group(scene):
    app, layout_logic = application(scene)
    layout_node = layout_logic.GetLayoutNode()
    mrml.register_layout(layout_node, layouts.COMPARE_LAYOUT_ID, layouts.compare_layout_xml())
    layout_node.SetViewArrangement(layouts.COMPARE_LAYOUT_ID)
    logics = make_slice_logics(scene, app)
    a = np.diag([3.4, 3.4, 10.0, 1.0])
    sr = new_volume(scene, np.ones((64, 64, 6), np.float32), a, "sr")
    flair = new_volume(scene, np.ones((64, 64, 6), np.float32), a, "flair")
    names = [v.name for v in layouts.COMPARE_VIEWS]
    comps = [mrml.composite_node(scene, n) for n in names]
    assert all(c is not None for c in comps)
    for comp in comps:
        mrml.assign_layers(comp, background=flair, foreground=sr, opacity=0.6)
    mrml.link_views(comps)
    red = mrml.composite_node(scene, "Red")
    red.SetLinkedControl(1)  # linked, but in the default view group
    for comp in comps:
        assert comp.GetBackgroundVolumeID() == flair.GetID() and comp.GetForegroundVolumeID() == sr.GetID()
        assert comp.GetForegroundOpacity() == pytest.approx(0.6)
        assert comp.GetLinkedControl() and comp.GetHotLinkedControl() and not comp.GetDoPropagateVolumeSelection()
    logics[names[0]].SetSliceOffset(7.0)  # a plain offset change moves only that view …
    assert logics[names[1]].GetSliceOffset() == pytest.approx(0.0)
    mrml.move_linked_offset(logics[names[0]], 20.0)  # … an interaction moves every linked view of the group
    assert [logics[n].GetSliceOffset() for n in names] == pytest.approx([20.0] * 4)
    assert logics["Red"].GetSliceOffset() == pytest.approx(0.0)
    mrml.link_views(comps, linked=False)
    mrml.move_linked_offset(logics[names[0]], -10.0)
    assert logics[names[1]].GetSliceOffset() == pytest.approx(20.0)


def test_window_level_dragging_is_disabled_through_the_interaction_mode(scene):
    node = scene.AddNewNodeByClass("vtkMRMLInteractionNode")
    node.SetCurrentInteractionMode(slicer.vtkMRMLInteractionNode.AdjustWindowLevel)
    previous = mrml.disable_window_level_dragging(node)
    assert previous == slicer.vtkMRMLInteractionNode.AdjustWindowLevel
    assert node.GetCurrentInteractionMode() == slicer.vtkMRMLInteractionNode.ViewTransform
