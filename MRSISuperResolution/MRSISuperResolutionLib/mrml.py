"""MRML-level operations of the module: volume nodes ↔ arrays and geometry, output nodes, display, layouts.

Only Slicer's MRML libraries and ``slicer.util`` array helpers are used — no ``slicer.app``, Qt or widgets — so
these functions run unchanged inside Slicer and on the ``slicer-core`` wheel in the test suite.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from . import display, geometry

ROLE_ATTRIBUTE = "MRSISuperResolution.Role"  # on output nodes: "sr" | "zerofilled" | "uncertainty"
SOURCE_ATTRIBUTE = "MRSISuperResolution.Source"  # on output nodes: id of the LR input node
SETTINGS_ATTRIBUTE = "MRSISuperResolution.Settings"  # on output nodes: JSON of the options of the run
OUTPUT_SUFFIX = {"sr": "_SR", "zerofilled": "_ZeroFilled", "uncertainty": "_Uncertainty"}


def _slicer():
    import slicer  # deferred: importing this module must not need Slicer (pure tests import the package)

    return slicer


def _vtk():
    import vtk

    return vtk


def reference_role(kind: str) -> str:
    """Node-reference role on the LR input that points to its output of `kind`."""
    if kind not in OUTPUT_SUFFIX:
        raise ValueError(f"output kind must be one of {tuple(OUTPUT_SUFFIX)}, got {kind!r}")
    return f"MRSISuperResolution.{kind}"


# --------------------------------------------------------------------------------------- geometry/data
def node_world_affine(volumeNode) -> np.ndarray:
    """IJK → world RAS of a volume node, its linear parent transform applied; ValueError if non-linear."""
    slicer, vtk = _slicer(), _vtk()
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    ijk_to_ras = slicer.util.arrayFromVTKMatrix(m)
    transform = volumeNode.GetParentTransformNode()
    if transform is None:
        return geometry.world_affine(ijk_to_ras)
    if not transform.IsTransformToWorldLinear():
        raise ValueError(f"{volumeNode.GetName()}: is under a non-linear transform; harden it first "
                         "(Data module → right-click → Harden transform)")
    w = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(w)
    return geometry.world_affine(ijk_to_ras, slicer.util.arrayFromVTKMatrix(w))


def volume_arrays(volumeNode) -> tuple[np.ndarray, np.ndarray]:
    """(copy of the voxels in (i, j, k) order, world affine) of a scalar volume node."""
    if volumeNode is None or volumeNode.GetImageData() is None:
        raise ValueError("expected a volume node with image data, got "
                         + ("None" if volumeNode is None else f"{volumeNode.GetName()} without voxels"))
    array = _slicer().util.arrayFromVolume(volumeNode)
    if array.ndim != 3:
        raise ValueError(f"{volumeNode.GetName()}: expected a scalar 3D volume, got array shape {array.shape}")
    return np.array(geometry.kji_to_ijk(array)), node_world_affine(volumeNode)


def set_volume_from_arrays(volumeNode, data_ijk: np.ndarray, affine: np.ndarray) -> None:
    """Fill a volume node with float32 (i, j, k) data and IJKToRAS = affine (geometry set explicitly:
    updateVolumeFromArray never touches it)."""
    slicer = _slicer()
    data = np.asarray(data_ijk)
    if data.ndim != 3:
        raise ValueError(f"expected a 3D (i, j, k) array, got shape {data.shape}")
    volumeNode.SetAndObserveTransformNodeID(None)  # outputs are written in world coordinates
    volumeNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(geometry.check_affine(affine)))
    slicer.util.updateVolumeFromArray(volumeNode, np.ascontiguousarray(geometry.ijk_to_kji(data), dtype=np.float32))


# ------------------------------------------------------------------------------------------ output nodes
def output_node(scene, inputNode, kind: str):
    """The output node of `kind` for an LR input: the one referenced by the input if still in the scene
    (a re-run updates it), else a new scalar volume named <input><suffix>."""
    role = reference_role(kind)
    node = inputNode.GetNodeReference(role)
    if node is None or scene.GetNodeByID(node.GetID()) is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", inputNode.GetName() + OUTPUT_SUFFIX[kind])
        inputNode.SetNodeReferenceID(role, node.GetID())
    node.SetAttribute(ROLE_ATTRIBUTE, kind)
    node.SetAttribute(SOURCE_ATTRIBUTE, inputNode.GetID())
    return node


def outputs_of(inputNode) -> dict:
    """{kind: node} of the outputs an LR input already has."""
    out = {}
    for kind in OUTPUT_SUFFIX:
        node = inputNode.GetNodeReference(reference_role(kind))
        if node is not None:
            out[kind] = node
    return out


def is_output_node(node) -> bool:
    return node is not None and node.GetAttribute(ROLE_ATTRIBUTE) is not None


def place_beside(scene, inputNode, nodes: Iterable) -> None:
    """Put nodes in the subject hierarchy under the same parent (study/patient folder) as inputNode."""
    sh = _slicer().vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    input_item = sh.GetItemByDataNode(inputNode)
    parent = sh.GetItemParent(input_item) if input_item else sh.GetSceneItemID()
    for node in nodes:
        item = sh.GetItemByDataNode(node)
        if not item:  # inside Slicer the SH plugins add new nodes automatically; bare MRML does not
            item = sh.CreateItem(parent, node)
        sh.SetItemParent(item, parent)


def same_grid_volumes(scene, reference, exclude: Sequence = ()) -> list:
    """Scalar volumes (not label maps, not outputs of this module) on exactly the grid of `reference`."""
    if reference is None or reference.GetImageData() is None:
        return []
    ref_shape = reference.GetImageData().GetDimensions()
    ref_affine = node_world_affine(reference)
    skip = {n.GetID() for n in exclude if n is not None}
    out = []
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        if node.IsA("vtkMRMLLabelMapVolumeNode") or is_output_node(node) or node.GetID() in skip:
            continue
        image = node.GetImageData()
        if image is None or image.GetNumberOfScalarComponents() != 1:
            continue
        try:
            affine = node_world_affine(node)
        except ValueError:
            continue
        if geometry.same_grid(image.GetDimensions(), affine, ref_shape, ref_affine):
            out.append(node)
    return out


# --------------------------------------------------------------------------------------------- display
def color_id(scene, preferred: Sequence[str]) -> str:
    """First colour table of `preferred` present in the scene (file tables exist only in the application)."""
    return display.first_existing(preferred, lambda node_id: scene.GetNodeByID(node_id) is not None)


def show_map(volumeNode, window: tuple[float, float], colorNodeId: str, *, interpolate: bool = True,
             transparent_below: float | None = None) -> None:
    """Fixed window/level, colour table and interpolation; voxels below transparent_below are not drawn."""
    if volumeNode.GetDisplayNode() is None:
        volumeNode.CreateDefaultDisplayNodes()
    d = volumeNode.GetDisplayNode()
    lo, hi = float(window[0]), float(window[1])
    d.AutoWindowLevelOff()
    d.SetWindowLevelMinMax(lo, hi)
    d.SetAndObserveColorNodeID(colorNodeId)
    d.SetInterpolate(1 if interpolate else 0)
    if transparent_below is None:
        d.SetApplyThreshold(0)
    else:
        d.SetApplyThreshold(1)
        d.SetThreshold(float(transparent_below), max(hi, float(transparent_below)) * 1e6 + 1.0)


def display_state(displayNode) -> dict:
    """What show_map changes on a scalar volume display node, to put it back with restore_display_state."""
    return {"auto_window_level": displayNode.GetAutoWindowLevel(),
            "window": (displayNode.GetWindowLevelMin(), displayNode.GetWindowLevelMax()),
            "color": displayNode.GetColorNodeID(), "interpolate": displayNode.GetInterpolate(),
            "apply_threshold": displayNode.GetApplyThreshold(),
            "threshold": (displayNode.GetLowerThreshold(), displayNode.GetUpperThreshold())}


def restore_display_state(displayNode, state: dict) -> None:
    """Undo show_map: the display a node had when display_state was taken."""
    disabled = displayNode.StartModify()
    displayNode.SetAndObserveColorNodeID(state["color"])
    displayNode.SetInterpolate(state["interpolate"])
    displayNode.SetThreshold(*state["threshold"])
    displayNode.SetApplyThreshold(state["apply_threshold"])
    displayNode.SetWindowLevelMinMax(*state["window"])
    displayNode.SetAutoWindowLevel(state["auto_window_level"])
    displayNode.EndModify(disabled)


def show_outputs(scene, outputs: dict, *, interpolate: bool = True) -> tuple[float, float]:
    """Matched display of one map's outputs: SR and zero-filled share one window and colour table,
    uncertainty gets its own colour table; returns the shared window."""
    slicer = _slicer()
    maps = [slicer.util.arrayFromVolume(outputs[k]) for k in ("sr", "zerofilled") if k in outputs]
    window = display.shared_window(maps)
    tiny = 1e-6 * (window[1] - window[0])
    for kind in ("sr", "zerofilled"):
        if kind in outputs:
            show_map(outputs[kind], window, color_id(scene, display.METABOLITE_COLORS), interpolate=interpolate,
                     transparent_below=tiny)
    if "uncertainty" in outputs:
        unc = display.shared_window([slicer.util.arrayFromVolume(outputs["uncertainty"])])
        show_map(outputs["uncertainty"], unc, color_id(scene, display.UNCERTAINTY_COLORS), interpolate=interpolate,
                 transparent_below=1e-6 * (unc[1] - unc[0]))
    return window


def store_outputs(scene, inputNode, maps: dict, settings: str = "", *, interpolate: bool = True) -> dict:
    """Put one map's run outputs ({kind: (array (i, j, k), affine)}) into its output nodes, beside the input
    in the subject hierarchy, with matched display; returns {kind: node}. Existing outputs are updated."""
    nodes = {}
    for kind in OUTPUT_SUFFIX:
        if kind not in maps:
            raise ValueError(f"missing output {kind!r}; expected {tuple(OUTPUT_SUFFIX)}")
        node = output_node(scene, inputNode, kind)
        data, affine = maps[kind]
        set_volume_from_arrays(node, data, affine)
        node.SetAttribute(SETTINGS_ATTRIBUTE, settings)
        nodes[kind] = node
    place_beside(scene, inputNode, nodes.values())
    show_outputs(scene, nodes, interpolate=interpolate)
    return nodes



def load_map_outputs(scene, files: dict, name: str) -> dict:
    """Nodes for one map's saved outputs ({kind: NIfTI path}, e.g. bidsoutputs.MapOutputs.files), named
    <name><suffix>, with the matched display of show_outputs; returns {kind: node}."""
    from . import niftiio

    nodes = {}
    for kind, path in files.items():
        if kind not in OUTPUT_SUFFIX:
            raise ValueError(f"output kind must be one of {tuple(OUTPUT_SUFFIX)}, got {kind!r}")
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name + OUTPUT_SUFFIX[kind])
        set_volume_from_arrays(node, *niftiio.read_nifti(path))
        node.SetAttribute(ROLE_ATTRIBUTE, kind)
        nodes[kind] = node
    show_outputs(scene, nodes)
    return nodes

# --------------------------------------------------------------------------------------- layouts/views
def register_layout(layoutNode, layoutId: int, xml: str) -> None:
    """Add (or, after a module reload, replace) a layout description under a fixed id."""
    if not layoutNode.SetLayoutDescription(layoutId, xml):
        layoutNode.AddLayoutDescription(layoutId, xml)


def composite_node(scene, viewName: str):
    """The slice composite node of the view named viewName (its layout name / singleton tag), or None."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        if node.GetLayoutName() == viewName:
            return node
    return None


def slice_node(scene, viewName: str):
    """The slice node of the view named viewName, or None."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
        if node.GetLayoutName() == viewName:
            return node
    return None


def assign_layers(compositeNode, background=None, foreground=None, opacity: float = 0.0) -> None:
    """Background/foreground volumes of one view, kept there (no propagation of later volume selections)."""
    compositeNode.SetDoPropagateVolumeSelection(False)
    compositeNode.SetBackgroundVolumeID(background.GetID() if background is not None else None)
    compositeNode.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
    compositeNode.SetForegroundOpacity(float(opacity) if foreground is not None else 0.0)
    compositeNode.SetLabelVolumeID(None)


def link_views(compositeNodes: Iterable, linked: bool = True) -> None:
    """Link the views (slice offset, zoom, pan), continuously while dragging."""
    for node in compositeNodes:
        node.SetLinkedControl(1 if linked else 0)
        node.SetHotLinkedControl(1 if linked else 0)


def move_linked_offset(sliceLogic, offset_mm: float) -> None:
    """Set the slice offset of one view so that every view linked to it follows (links act on interaction)."""
    sliceLogic.StartSliceOffsetInteraction()
    sliceLogic.SetSliceOffset(float(offset_mm))
    sliceLogic.EndSliceOffsetInteraction()


def disable_window_level_dragging(interactionNode) -> int:
    """Mouse mode that cannot adjust window/level (replaces the deprecated no-op SetWindowLevelLocked);
    returns the previous mode so it can be restored."""
    previous = interactionNode.GetCurrentInteractionMode()
    interactionNode.SetCurrentInteractionMode(_slicer().vtkMRMLInteractionNode.ViewTransform)
    return previous
