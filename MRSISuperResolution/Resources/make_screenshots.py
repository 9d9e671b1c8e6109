"""Regenerate the extension's screenshots from a real run, rendered by Slicer's own slice views (offscreen).

    OMP_NUM_THREADS=1 python MRSISuperResolution/Resources/make_screenshots.py [--overwrite] [--model PATH]

Needs the slicer-core wheel, torch, and an offscreen OpenGL (EGL, e.g. Mesa's libEGL, or OSMesa). What it does
is what the module does in Slicer: the sample patient's T1, FLAIR, NAA and tCho become volume nodes; the
background `ftddm super-resolve` run of MRSISuperResolutionLib.runner produces the outputs; mrml.store_outputs
puts them into the scene with the module's display; resultviews.show_overlay and show_compare_layout set the
views up; Slicer's slice logic and displayable managers render them (offscreenviews.py stands in for Qt).
Writes Resources/Screenshots/overlay.png and compare_layout.png at the top of the repository.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

RESOURCES = Path(__file__).resolve().parent
MODULE = RESOURCES.parent
REPO = MODULE.parent
SCREENSHOTS = REPO / "Resources" / "Screenshots"
sys.path[:0] = [str(RESOURCES), str(MODULE), str(REPO)]

import offscreenviews  # noqa: E402

CAPTION_HEIGHT = 28
HEADER_HEIGHT = 24


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None,
                   help="FTDDM model file (default: the shipped ftddm_core/weights/ftddm_compact.safetensors; "
                        "a random-weights 'tiny' model if it cannot be loaded)")
    p.add_argument("--out", type=Path, default=SCREENSHOTS, help="folder of the PNGs (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="solver steps of the run (default: %(default)s)")
    p.add_argument("--samples", type=int, default=8, help="draws per map (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace existing screenshots")
    return p.parse_args(argv)


def frozen_model(requested: Path | None, folder: Path) -> tuple[Path, str]:
    """A private copy of the model, loaded once to check it (the shipped file may be replaced meanwhile);
    a random-weights tiny model if it does not load. Returns (path, description for the caption)."""
    from ftddm_core.config import preset
    from ftddm_core.model import DEFAULT_MODEL, FTDDM

    source = Path(requested) if requested is not None else DEFAULT_MODEL
    copy = folder / source.name
    try:
        shutil.copyfile(source, copy)
        FTDDM.load(copy)
        return copy, f"model {source.name}"
    except (OSError, ValueError) as exc:
        print(f"warning: {source} does not load ({exc}); using a random-weights tiny model", file=sys.stderr)
    import torch

    torch.manual_seed(0)  # the same random weights every time: screenshots regenerate identically
    tiny = folder / "tiny.safetensors"
    FTDDM(preset("tiny")).save(tiny)
    return tiny, "untrained tiny model (random weights)"


def scene_with_patient():
    import slicer
    from MRSISuperResolutionLib import sampledata

    app = offscreenviews.install_application(slicer.vtkMRMLScene())
    nodes = {}
    for key, (data, affine) in sampledata.synthetic_patient().items():
        kji = np.ascontiguousarray(np.transpose(data, (2, 1, 0)), np.float32)
        nodes[key] = slicer.util.addVolumeFromArray(kji, affine, name="Sample_" + key)
    return app, nodes


def super_resolve(nodes: dict, model: Path, steps: int, samples: int, folder: Path) -> dict:
    """The logic's path: inputs from the nodes, the background CLI, outputs stored beside each input."""
    import slicer
    from MRSISuperResolutionLib import mrml, runner
    from MRSISuperResolutionLib.options import SuperResolveOptions

    maps = [nodes["NAA"], nodes["tCho"]]
    params = SuperResolveOptions(steps=steps, samples=samples, device="cpu", seed=0)
    job = runner.SuperResolveJob([sys.executable], REPO, temp_parent=str(folder))
    try:
        job.prepare([mrml.volume_arrays(n) for n in maps], mrml.volume_arrays(nodes["T1"]),
                    mrml.volume_arrays(nodes["FLAIR"]), model=str(model), parameters=params)
        state = job.wait(on_line=lambda line: print(line, file=sys.stderr))
        if state != runner.COMPLETED:
            raise RuntimeError(f"super-resolution {state}: {job.error_message}")
        settings = json.dumps({"steps": steps, "samples": samples, "model": model.name})
        return {node.GetName(): mrml.store_outputs(slicer.mrmlScene, node, outputs, settings)
                for node, outputs in zip(maps, job.outputs())}
    finally:
        job.cleanup()


def text_strip(labels, widths, height, gap, font_size=15):
    """One row of centred white labels on black, rendered by VTK (one label per column of the given widths)."""
    import vtk

    total = sum(widths) + gap * (len(widths) - 1)
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(total, height)
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0, 0, 0)
    window.AddRenderer(renderer)
    x = 0
    for label, width in zip(labels, widths):
        actor = vtk.vtkTextActor()
        actor.SetInput(label)
        prop = actor.GetTextProperty()
        prop.SetFontSize(font_size)
        prop.SetColor(1, 1, 1)
        prop.SetJustificationToCentered()
        prop.SetVerticalJustificationToCentered()
        actor.SetDisplayPosition(x + width // 2, height // 2)
        renderer.AddViewProp(actor)
        x += width + gap
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.SetInputBufferTypeToRGB()
    grab.Update()
    from vtkmodules.util.numpy_support import vtk_to_numpy

    image = grab.GetOutput()
    w, h, _ = image.GetDimensions()
    rgb = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[::-1, :, :3]
    window.Finalize()
    return np.ascontiguousarray(rgb)


def figure(views, labels, caption, gap=4):
    """Views side by side with their labels above and a caption below."""
    tiles = [v.render() for v in views]
    widths = [t.shape[1] for t in tiles]
    header = text_strip(labels, widths, HEADER_HEIGHT, gap)
    footer = text_strip([caption], [sum(widths) + gap * (len(widths) - 1)], CAPTION_HEIGHT, 0, font_size=13)
    return np.vstack([header, offscreenviews.tile(tiles, gap), footer])


def main(argv=None) -> int:
    args = parse_args(argv)
    targets = {"overlay": args.out / "overlay.png", "compare": args.out / "compare_layout.png"}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not args.overwrite:
        print(f"error: {', '.join(existing)} exist; pass --overwrite to replace them", file=sys.stderr)
        return 2
    problem = offscreenviews.offscreen_rendering_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mrsisr-shots-") as tmp:
        model, model_text = frozen_model(args.model, Path(tmp))
        app, nodes = scene_with_patient()
        try:
            outputs = super_resolve(nodes, model, args.steps, args.samples, Path(tmp))
            from MRSISuperResolutionLib import display, layouts, resultviews

            naa = outputs["Sample_NAA"]
            note = (f"Synthetic sample patient, {model_text}, {args.steps} steps × {args.samples} samples; "
                    "shows the module's display and layout, not model quality.")
            lm = app.layoutManager()
            resultviews.show_overlay(naa["sr"], nodes["T1"], display.OVERLAY_OPACITY)
            names = lm.sliceViewNames()
            offscreenviews.write_png(targets["overlay"], figure(
                [lm.sliceWidget(n) for n in names], [f"{n}: SR NAA over T1" for n in names], note))
            resultviews.show_compare_layout(naa["zerofilled"], naa["sr"], naa["uncertainty"], nodes["FLAIR"])
            views = [lm.sliceWidget(v.name) for v in layouts.COMPARE_VIEWS]
            offscreenviews.write_png(targets["compare"], figure(
                views, ["Zero-filled NAA", "FTDDM SR NAA", "Uncertainty (SD)", "FLAIR"], note))
        finally:
            app.close()
    for path in targets.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
