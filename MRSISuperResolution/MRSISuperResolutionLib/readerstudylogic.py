"""Reader-study display inside Slicer: LR/SR pairs from the scene, one blinded trial at a time, and putting the
user's views back afterwards (layout, mouse mode, view controllers, data probe, corner annotations, display).

Needs Slicer (layout manager, application logic); the pure planning/scoring lives in ``readerstudy``.
"""
import slicer
import vtk

from . import display, geometry, inputs, layouts, mrml, readerstudy


class ReaderStudyDisplay:
    """Shows trials blinded and restores, at the end, exactly what the reading changed."""

    def __init__(self):
        self._state = None  # what to restore; None while no reading is shown

    @property
    def reading(self):
        return self._state is not None

    # --- pairs --------------------------------------------------------------------------------------------
    @staticmethod
    def readerSources(slicesPerMap=0, seed=0):
        """LR (zero-filled) / SR pairs of every super-resolved map in the scene, slices with signal."""
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        sources = []
        for srNode in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            if srNode.GetAttribute(mrml.ROLE_ATTRIBUTE) != "sr":
                continue
            lrNode = slicer.mrmlScene.GetNodeByID(srNode.GetAttribute(mrml.SOURCE_ATTRIBUTE) or "")
            zfNode = lrNode.GetNodeReference(mrml.reference_role("zerofilled")) if lrNode else None
            if zfNode is None:
                continue
            axis = geometry.detect_slice_axis(lrNode.GetImageData().GetDimensions(), mrml.node_world_affine(lrNode))
            data, _affine = mrml.volume_arrays(srNode)
            item = sh.GetItemByDataNode(lrNode)
            patientItem = sh.GetItemAncestorAtLevel(item, "Patient") if item else 0
            patient = sh.GetItemName(patientItem) if patientItem else "patient"
            chosen = readerstudy.choose_slices(readerstudy.slices_with_signal(data, axis), slicesPerMap,
                                               f"{seed}:{lrNode.GetName()}")
            sources += [readerstudy.PairSource(patient, lrNode.GetName(), k, zfNode.GetID(), srNode.GetID())
                        for k in chosen]
        if not sources:
            raise ValueError("No super-resolved maps in the scene: run Super-resolve first.")
        return sources

    # --- one trial ------------------------------------------------------------------------------------------
    def showTrial(self, trial, orientation="Axial"):
        """Show one pair blinded: views labelled A and B, identical display, names and W/L dragging disabled."""
        scene = slicer.mrmlScene
        nodes = {side: scene.GetNodeByID(trial.ref(side)) for side in readerstudy.SIDES}
        if any(n is None for n in nodes.values()):
            raise ValueError(f"The images of case {trial.case_id} are not in the scene; load the scene the study "
                             "was started with.")
        lm = slicer.app.layoutManager()
        if self._state is None:
            self._state = self._saveViewState(lm)
        pair = [nodes[s] for s in readerstudy.SIDES]
        for node in pair:  # the outputs' own display (threshold, window, colours) comes back at the end
            self._state["display"].setdefault(node.GetID(), mrml.display_state(node.GetDisplayNode()))
        mrml.register_layout(lm.layoutLogic().GetLayoutNode(), layouts.READER_LAYOUT_ID,
                             layouts.reader_layout_xml(orientation))
        lm.setLayout(layouts.READER_LAYOUT_ID)
        self._hideNames()  # after the layout switch: the reader views' own controllers would name the nodes
        window = display.shared_window([slicer.util.arrayFromVolume(n) for n in pair])
        colorId = mrml.color_id(scene, display.METABOLITE_COLORS)
        for node in pair:
            mrml.show_map(node, window, colorId, interpolate=True)
        self._lockWindowLevel(pair, window)
        srNode = nodes[trial.sr_side]
        lrNode = scene.GetNodeByID(srNode.GetAttribute(mrml.SOURCE_ATTRIBUTE) or "")
        axis = geometry.detect_slice_axis(lrNode.GetImageData().GetDimensions(), mrml.node_world_affine(lrNode))
        centre = geometry.slice_centre_ras(srNode.GetImageData().GetDimensions(), mrml.node_world_affine(srNode),
                                           axis, trial.source.slice_index)
        composites = []
        for view, node in zip(layouts.READER_VIEWS, pair):
            widget = lm.sliceWidget(view.name)
            mrml.assign_layers(widget.mrmlSliceCompositeNode(), background=node)
            composites.append(widget.mrmlSliceCompositeNode())
            widget.mrmlSliceNode().RotateToVolumePlane(srNode)
            widget.fitSliceToBackground()
            widget.mrmlSliceNode().JumpSliceByCentering(*centre)
        mrml.link_views(composites)

    @staticmethod
    def itemLabels(trial):
        """Scored-item labels naming only the metabolite kind (a node name can identify the patient)."""
        kind = inputs.metabolite_kind(trial.source.metabolite) or "Metabolite"
        return [readerstudy.ITEM_LABELS[i].format(metabolite=kind) for i in readerstudy.ITEMS]

    # --- saving and restoring the user's views ------------------------------------------------------------------
    def _saveViewState(self, lm):
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        annotations = self._sliceAnnotations()
        probe = self._dataProbeWidget()
        return {"layout": lm.layout, "interaction": mrml.disable_window_level_dragging(interaction),
                "controllers": self._controllersVisible(lm),
                "probe": probe.visible if probe is not None else None,
                "annotations": annotations.sliceViewAnnotationsEnabled if annotations is not None else None,
                "observers": [], "display": {}}

    def _hideNames(self):
        slicer.util.setViewControllersVisible(False)
        slicer.util.setDataProbeVisible(False)
        annotations = self._sliceAnnotations()
        if annotations is not None:
            annotations.sliceViewAnnotationsEnabled = False
            annotations.updateSliceViewFromGUI()

    @staticmethod
    def _controllersVisible(lm):
        names = list(lm.sliceViewNames())
        return any(lm.sliceWidget(n).sliceController().visible for n in names) if names else True

    @staticmethod
    def _dataProbeWidget():
        mainWindow = slicer.util.mainWindow()
        return slicer.util.findChild(mainWindow, "DataProbeCollapsibleWidget") if mainWindow else None

    @staticmethod
    def _sliceAnnotations():
        """Corner annotations list volume names (DataProbe module); None without the DataProbe module."""
        try:
            return slicer.modules.DataProbeInstance.infoWidget.sliceAnnotations
        except AttributeError:
            return None

    def _lockWindowLevel(self, volumeNodes, window):
        """Put back the shared window if anything changes it during the reading."""
        for displayNode, tag in self._state["observers"]:
            displayNode.RemoveObserver(tag)
        self._state["observers"] = []
        tolerance = 1e-6 * max(abs(window[0]), abs(window[1]), 1.0)

        def restore(displayNode, event):
            current = (displayNode.GetWindowLevelMin(), displayNode.GetWindowLevelMax())
            if max(abs(current[0] - window[0]), abs(current[1] - window[1])) > tolerance:
                displayNode.SetWindowLevelMinMax(*window)

        for node in volumeNodes:
            d = node.GetDisplayNode()
            self._state["observers"].append((d, d.AddObserver(vtk.vtkCommand.ModifiedEvent, restore)))

    def endReading(self):
        """Restore what the reading changed, to the values the user had before it started."""
        state, self._state = self._state, None
        if state is None:
            return
        for displayNode, tag in state["observers"]:
            displayNode.RemoveObserver(tag)
        for nodeId, saved in state["display"].items():
            node = slicer.mrmlScene.GetNodeByID(nodeId)
            if node is not None and node.GetDisplayNode() is not None:
                mrml.restore_display_state(node.GetDisplayNode(), saved)
        slicer.app.applicationLogic().GetInteractionNode().SetCurrentInteractionMode(state["interaction"])
        slicer.app.layoutManager().setLayout(state["layout"])
        slicer.util.setViewControllersVisible(state["controllers"])  # after the layout: its views get it
        if state["probe"] is not None:
            slicer.util.setDataProbeVisible(state["probe"])
        annotations = self._sliceAnnotations()
        if annotations is not None and state["annotations"] is not None:
            annotations.sliceViewAnnotationsEnabled = state["annotations"]
            annotations.updateSliceViewFromGUI()
