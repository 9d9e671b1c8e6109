"""Showing a run's outputs in Slicer's views: SR over T1/FLAIR, and the Compare layout (needs the layout manager)."""
import slicer
from slicer.i18n import tr as _

from . import layouts, mrml

def align_views_to(volumeNode, viewNames):
    """Rotate the named slice views to the volume's planes (the oblique MRSI slab) and fit them."""
    lm = slicer.app.layoutManager()
    for name in viewNames:
        widget = lm.sliceWidget(name)
        if widget is None:
            continue
        widget.mrmlSliceNode().RotateToVolumePlane(volumeNode)
        widget.fitSliceToBackground()


def show_overlay(srNode, backgroundNode, opacity=0.6):
    """SR over T1 (or FLAIR) in the standard views, rotated to the MRSI slab, linked."""
    if srNode is None:
        raise ValueError(_("No super-resolved map yet: run Super-resolve first."))
    slicer.util.setSliceViewerLayers(background=backgroundNode, foreground=srNode, foregroundOpacity=opacity)
    lm = slicer.app.layoutManager()
    names = list(lm.sliceViewNames())
    align_views_to(srNode, names)
    mrml.link_views([lm.sliceWidget(n).mrmlSliceCompositeNode() for n in names])


def show_compare_layout(zeroFilledNode, srNode, uncertaintyNode, flairNode, orientation="Axial"):
    """Zero-filled | SR | uncertainty | FLAIR in one row, linked: one slice offset moves all four."""
    if srNode is None:
        raise ValueError(_("No super-resolved map yet: run Super-resolve first."))
    lm = slicer.app.layoutManager()
    mrml.register_layout(lm.layoutLogic().GetLayoutNode(), layouts.COMPARE_LAYOUT_ID,
                         layouts.compare_layout_xml(orientation))
    lm.setLayout(layouts.COMPARE_LAYOUT_ID)
    names = [v.name for v in layouts.COMPARE_VIEWS]
    composites = []
    for name, node in zip(names, (zeroFilledNode, srNode, uncertaintyNode, flairNode)):
        widget = lm.sliceWidget(name)
        mrml.assign_layers(widget.mrmlSliceCompositeNode(), background=node)
        composites.append(widget.mrmlSliceCompositeNode())
    mrml.link_views(composites)
    align_views_to(srNode, names)
    first = lm.sliceWidget(names[0]).sliceLogic()
    mrml.move_linked_offset(first, first.GetSliceOffset())  # start every view on the same slice
