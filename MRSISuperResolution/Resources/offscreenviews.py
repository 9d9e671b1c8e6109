"""Slicer slice views without Qt: Slicer's real slice logic, displayable managers and interactor style, rendered
offscreen (EGL or OSMesa) on the ``slicer-core`` wheel.

Used by make_screenshots.py (the extension's screenshots) and by the tests that render views and send mouse
events. It stands in for the two Qt pieces slicer-core lacks:
- the image actor of a slice view: in Slicer, CTK's vtkLightBoxRendererManager shows the slice logic's blended
  RGBA image; here a vtkImageMapper / vtkActor2D pair shows the same image;
- the layout manager (qSlicerLayoutManager): only what the module calls (layout logic, setLayout, slice widgets
  with their slice node, composite node, slice logic and fit), so resultviews.py and readerstudylogic.py run
  unchanged.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import types

import numpy as np

from ftddm_core.atomic import atomic_write

VIEW_SIZE = (400, 400)  # pixels of each offscreen view: one tile of a screenshot
# Displayable managers of a slice view in Slicer (qMRMLSliceView) that slicer-core ships and that need no Qt.
SLICE_DISPLAYABLE_MANAGERS = ("vtkMRMLCrosshairDisplayableManager", "vtkMRMLScalarBarDisplayableManager",
                              "vtkMRMLOrientationMarkerDisplayableManager", "vtkMRMLRulerDisplayableManager",
                              "vtkMRMLModelSliceDisplayableManager")


def choose_offscreen_backend() -> None:
    """Without an X display, make VTK create an EGL window (Mesa's or a GPU's) unless the user chose one.

    VTK's wheel otherwise falls back from X to OSMesa only, which most systems lack."""
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


_PROBE = """
import vtk
w = vtk.vtkRenderWindow(); w.SetOffScreenRendering(1); w.SetSize(8, 8)
r = vtk.vtkRenderer(); r.SetBackground(1, 0, 0); w.AddRenderer(r); w.Render()
g = vtk.vtkWindowToImageFilter(); g.SetInput(w); g.Update()
s = g.GetOutput().GetPointData().GetScalars()
print("RENDERED" if s is not None and s.GetTuple(0)[0] > 200 else "BLANK", w.GetClassName())
"""


def offscreen_rendering_problem() -> str | None:
    """None if VTK renders offscreen here, else why not. Probed in a child process: a missing GL library can
    abort the process that tries it."""
    choose_offscreen_backend()
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60,
                              env=dict(os.environ))
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"offscreen render probe failed: {e}"
    if done.returncode == 0 and done.stdout.startswith("RENDERED"):
        return None
    text = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)  # VTK colours its log lines
    tail = text.strip().splitlines()[-3:]
    return ("VTK cannot render offscreen (set VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow or "
            "vtkOSOpenGLRenderWindow and install libEGL/libOSMesa): " + " | ".join(tail))


class SliceView:
    """One slice view: render window + slice logic + Slicer's slice displayable managers + interactor style."""

    def __init__(self, scene, appLogic, sliceNode, size=VIEW_SIZE):
        import slicer
        import vtk

        choose_offscreen_backend()
        self.name = sliceNode.GetLayoutName()
        self.window = vtk.vtkRenderWindow()
        self.window.SetOffScreenRendering(1)
        self.window.SetSize(*size)
        self.window.SetMultiSamples(0)
        self.renderer = vtk.vtkRenderer()
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.window.AddRenderer(self.renderer)
        self.interactor = vtk.vtkGenericRenderWindowInteractor()  # events come from the caller, no event loop
        self.interactor.SetRenderWindow(self.window)

        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(appLogic)
        self.logic.SetMRMLScene(scene)
        self.sliceNode = sliceNode  # created by the layout logic, as in Slicer
        self.logic.SetSliceNode(sliceNode)  # finds or creates the view's composite node
        appLogic.GetSliceLogics().AddItem(self.logic)
        if sliceNode.GetInteractionNode() is None:  # Slicer's views share the application's mouse mode
            sliceNode.SetInteractionNode(appLogic.GetInteractionNode())

        # the blended slice image (background, foreground, label with their window/level, LUT and threshold)
        self.imageMapper = vtk.vtkImageMapper()
        self.imageMapper.SetColorWindow(255)  # the slice logic's output is already RGBA 0..255
        self.imageMapper.SetColorLevel(127.5)
        self.imageActor = vtk.vtkActor2D()
        self.imageActor.SetMapper(self.imageMapper)
        self.imageActor.GetProperty().SetDisplayLocationToBackground()
        self.renderer.AddViewProp(self.imageActor)

        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        factory.SetMRMLApplicationLogic(appLogic)
        for manager in SLICE_DISPLAYABLE_MANAGERS:
            if not factory.IsDisplayableManagerRegistered(manager):
                factory.RegisterDisplayableManager(manager)
        self.displayableManagers = factory.InstantiateDisplayableManagers(self.renderer)
        self.displayableManagers.SetMRMLDisplayableNode(self.sliceNode)

        # Slicer's style observes the interactor itself; VTK's own style must do nothing (as in qMRMLSliceView)
        self.interactor.SetInteractorStyle(vtk.vtkInteractorStyleUser())
        self.style = slicer.vtkMRMLSliceViewInteractorStyle()
        self.style.SetDisplayableManagers(self.displayableManagers)
        self.style.SetSliceLogic(self.logic)  # as qMRMLSliceWidget does
        self.style.SetInteractor(self.interactor)
        self.interactor.Initialize()
        self.logic.ResizeSliceNode(*size)

    # --- what qMRMLSliceWidget offers the module --------------------------------------------------------------
    def mrmlSliceNode(self):
        return self.sliceNode

    def mrmlSliceCompositeNode(self):
        return self.logic.GetSliceCompositeNode()

    def sliceLogic(self):
        return self.logic

    def fitSliceToBackground(self):
        self.logic.FitSliceToBackground()

    def sliceController(self):
        return self  # only `visible` / setVisible are used

    visible = True

    def setVisible(self, visible):
        self.visible = bool(visible)

    def close(self) -> None:
        """Detach from the scene before it is cleared (Slicer's views do this when they are destroyed)."""
        self.style.SetInteractor(None)
        self.displayableManagers.SetMRMLDisplayableNode(None)
        self.imageMapper.SetInputConnection(None)
        self.logic.SetMRMLScene(None)
        self.window.Finalize()

    # --- rendering and events -------------------------------------------------------------------------------
    def render(self) -> np.ndarray:
        """The view as an (height, width, 3) uint8 array, top row first."""
        import vtk
        from vtkmodules.util.numpy_support import vtk_to_numpy

        self.imageMapper.SetInputConnection(self.logic.GetImageDataConnection())
        self.window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.window)
        grab.SetInputBufferTypeToRGB()
        grab.ReadFrontBufferOff()
        grab.Update()
        image = grab.GetOutput()
        width, height, _ = image.GetDimensions()
        rgb = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)[:, :, :3]
        return np.ascontiguousarray(rgb[::-1])

    def left_drag(self, start, end, steps: int = 5) -> None:
        """A real left-button drag in display coordinates (pixels, origin bottom left) through the interactor."""
        import vtk

        self.window.Render()
        self.interactor.SetEventInformation(int(start[0]), int(start[1]), 0, 0)
        self.interactor.InvokeEvent(vtk.vtkCommand.MouseMoveEvent)
        self.interactor.InvokeEvent(vtk.vtkCommand.LeftButtonPressEvent)
        for t in np.linspace(0, 1, steps + 1)[1:]:
            x, y = (1 - t) * np.asarray(start, float) + t * np.asarray(end, float)
            self.interactor.SetEventInformation(int(round(x)), int(round(y)), 0, 0)
            self.interactor.InvokeEvent(vtk.vtkCommand.MouseMoveEvent)
        self.interactor.InvokeEvent(vtk.vtkCommand.LeftButtonReleaseEvent)


class LayoutManager:
    """The part of qSlicerLayoutManager the module uses, over Slicer's real vtkMRMLLayoutLogic."""

    def __init__(self, scene, appLogic, size=VIEW_SIZE):
        import slicer

        self.scene, self.appLogic, self.size = scene, appLogic, size
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)  # Axial/Sagittal/Coronal, as Slicer's
        self._layoutLogic = slicer.vtkMRMLLayoutLogic()
        self._layoutLogic.SetMRMLScene(scene)
        self._views: dict[str, SliceView] = {}
        self.threeDViewCount = self.tableViewCount = self.plotViewCount = 0
        self.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalView)  # Slicer's start-up layout

    def layoutLogic(self):
        return self._layoutLogic

    @property
    def layout(self):
        return self._layoutLogic.GetLayoutNode().GetViewArrangement()

    def setLayout(self, layoutId: int) -> None:
        """Switch layouts; the layout logic creates the slice nodes the description names."""
        self._layoutLogic.GetLayoutNode().SetViewArrangement(int(layoutId))
        for node in self._layout_slice_nodes():
            if node.GetLayoutName() not in self._views:
                self._views[node.GetLayoutName()] = SliceView(self.scene, self.appLogic, node, self.size)

    def _layout_slice_nodes(self) -> list:
        nodes = self._layoutLogic.GetViewNodes()
        found = [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]
        return [n for n in found if n.IsA("vtkMRMLSliceNode")]

    def sliceViewNames(self) -> list[str]:
        """Slice views of the current layout, in layout order (left to right)."""
        return [n.GetLayoutName() for n in self._layout_slice_nodes()]

    def sliceWidget(self, name: str):
        return self._views.get(name) if name in self.sliceViewNames() else None

    def mrmlSliceLogics(self):
        return self.appLogic.GetSliceLogics()

    def close(self) -> None:
        for view in self._views.values():
            view.close()
        self._views.clear()
        self.appLogic.GetSliceLogics().RemoveAllItems()
        self._layoutLogic.SetMRMLScene(None)


def install_application(scene):
    """slicer.mrmlScene / slicer.app for the module's display code, with this file's layout manager and
    Slicer's real application logic (interaction and selection nodes); slicer.i18n if the wheel lacks it."""
    import slicer
    import vtk

    stub_i18n = "slicer.i18n" not in sys.modules and not hasattr(slicer, "i18n")
    if stub_i18n:
        i18n = types.ModuleType("slicer.i18n")  # Slicer's translation helpers are Qt; identity here
        i18n.tr = lambda text: text
        i18n.translate = lambda context, text: text
        sys.modules["slicer.i18n"] = i18n
    slicer.mrmlScene = scene
    for cls in ("vtkMRMLInteractionNode", "vtkMRMLSelectionNode"):  # singletons the application adds
        if scene.GetFirstNodeByClass(cls) is None:
            node = getattr(slicer, cls)()
            node.SetSingletonTag("Singleton")
            scene.AddNode(node)
    colorLogic = slicer.vtkMRMLColorLogic()  # Slicer's built-in colour tables (Grey, Iron, Rainbow, ...)
    colorLogic.SetMRMLScene(scene)
    appLogic = slicer.vtkMRMLApplicationLogic()
    appLogic.SetMRMLScene(scene)
    if appLogic.GetSliceLogics() is None:
        appLogic.SetSliceLogics(vtk.vtkCollection())  # Slicer's application fills it; here each SliceView
    layoutManager = LayoutManager(scene, appLogic)
    def close():
        """Views, then logics, then the scene: the order Slicer's application tears them down."""
        layoutManager.close()
        appLogic.SetMRMLScene(None)
        colorLogic.SetMRMLScene(None)
        scene.Clear(1)
        if stub_i18n:
            sys.modules.pop("slicer.i18n", None)

    slicer.app = types.SimpleNamespace(layoutManager=lambda: layoutManager, applicationLogic=lambda: appLogic,
                                       close=close,
                                       processEvents=lambda *a: None, topLevelWidgets=lambda: [],
                                       colorLogic=colorLogic)
    return slicer.app


def tile(images, gap: int = 4, background=(0, 0, 0)) -> np.ndarray:
    """Views side by side (same height), separated by gap pixels, as one RGB image."""
    height = max(im.shape[0] for im in images)
    width = sum(im.shape[1] for im in images) + gap * (len(images) - 1)
    out = np.empty((height, width, 3), np.uint8)
    out[:] = background
    x = 0
    for im in images:
        out[:im.shape[0], x:x + im.shape[1]] = im
        x += im.shape[1] + gap
    return out


def write_png(path, rgb: np.ndarray) -> None:
    """PNG via VTK's writer, through ftddm_core.atomic.atomic_write (never a half-written file)."""
    import vtk
    from vtkmodules.util.numpy_support import numpy_to_vtk

    rgb = np.ascontiguousarray(np.asarray(rgb, np.uint8)[::-1])  # VTK images start at the bottom row
    image = vtk.vtkImageData()
    image.SetDimensions(rgb.shape[1], rgb.shape[0], 1)
    image.GetPointData().SetScalars(numpy_to_vtk(rgb.reshape(-1, 3), deep=True))
    def write(tmp: str) -> None:
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(tmp)
        writer.SetInputData(image)
        writer.Write()
        if writer.GetErrorCode():
            raise OSError(f"{path}: could not write the PNG (VTK error code {writer.GetErrorCode()})")

    atomic_write(path, write)
