"""Slicer layout descriptions (XML) for comparing results and for blinded reading.

Layout ids are fixed, above Slicer's built-in ids (< 100), and unusual enough not to collide with other
extensions. Views of one layout share a view group, so linked slice offsets reach only them.
Only the four view properties vtkMRMLLayoutLogic understands are used: orientation, viewlabel, viewcolor,
viewgroup.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

COMPARE_LAYOUT_ID = 6501
READER_LAYOUT_ID = 6502
COMPARE_VIEW_GROUP = 65
READER_VIEW_GROUP = 66
ORIENTATIONS = ("Axial", "Sagittal", "Coronal")
VIEW_PROPERTIES = ("orientation", "viewlabel", "viewcolor", "viewgroup")


@dataclass(frozen=True)
class ViewSpec:
    """A slice view of a custom layout: singleton tag (= view name), corner label and colour."""

    name: str
    label: str
    color: str


# zero-filled | SR | uncertainty | FLAIR, left to right
COMPARE_VIEWS = (
    ViewSpec("MRSIZeroFilled", "ZF", "#8C8C8C"),
    ViewSpec("MRSISR", "SR", "#3C8CDC"),
    ViewSpec("MRSIUncertainty", "U", "#DC8C3C"),
    ViewSpec("MRSIFLAIR", "FL", "#64B464"),
)
# neutral A/B labels and one colour: nothing in the view tells which image is which
READER_VIEWS = (
    ViewSpec("ReaderA", "A", "#808080"),
    ViewSpec("ReaderB", "B", "#808080"),
)


def _row_layout(views, orientation: str, group: int) -> str:
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    if not isinstance(group, int) or group < 1:
        raise ValueError(f"view group must be a positive integer, got {group!r}")
    root = ET.Element("layout", type="horizontal")
    for view in views:
        item = ET.SubElement(root, "item")
        node = ET.SubElement(item, "view", {"class": "vtkMRMLSliceNode", "singletontag": view.name})
        for name, value in (("orientation", orientation), ("viewlabel", view.label),
                            ("viewcolor", view.color), ("viewgroup", str(group))):
            prop = ET.SubElement(node, "property", name=name, action="default")
            prop.text = value
    return ET.tostring(root, encoding="unicode")


def compare_layout_xml(orientation: str = "Axial") -> str:
    """One row: zero-filled | SR | uncertainty | FLAIR, all in view group COMPARE_VIEW_GROUP."""
    return _row_layout(COMPARE_VIEWS, orientation, COMPARE_VIEW_GROUP)


def reader_layout_xml(orientation: str = "Axial") -> str:
    """Two views labelled A and B (no method names), in view group READER_VIEW_GROUP."""
    return _row_layout(READER_VIEWS, orientation, READER_VIEW_GROUP)


def layout_views(xml: str) -> list[dict]:
    """The slice views of a layout description: [{"name", "orientation", "viewlabel", "viewcolor", "viewgroup"}]."""
    root = ET.fromstring(xml)
    out = []
    for view in root.iter("view"):
        entry = {"name": view.get("singletontag"), "class": view.get("class")}
        for prop in view.findall("property"):
            entry[prop.get("name")] = (prop.text or "").strip()
        out.append(entry)
    return out
