"""Static checks of the Slicer module that need no Slicer: CMake lists, Slicer API names, .ui wiring, imports."""
import ast
import json
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import shared_folder

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "MRSISuperResolution"
MODULE_FILE = MODULE / "MRSISuperResolution.py"
UI_FILE = MODULE / "Resources" / "UI" / "MRSISuperResolution.ui"
SHARED = shared_folder() or REPO.parent / "shared"
CHECKER = SHARED / "tools" / "check_slicer_api.py"
API = SHARED / "reference" / "slicer_api.json"


def cmake_list(text: str, variable: str, module_name: str = "MRSISuperResolution") -> list[str]:
    match = re.search(r"set\(\s*%s\b(.*?)\)" % variable, text, re.S)
    assert match, f"{variable} not set"
    body = re.sub(r"#.*", "", match.group(1)).replace("${MODULE_NAME}", module_name)
    return body.split()


def files_under(folder: Path, pattern: str = "*") -> set[str]:
    return {p.relative_to(MODULE).as_posix() for p in folder.rglob(pattern)
            if p.is_file() and "__pycache__" not in p.parts}


# --- CMake ---------------------------------------------------------------------------------------------------
def test_every_module_file_is_listed_in_cmake():
    text = (MODULE / "CMakeLists.txt").read_text()
    assert re.search(r"set\(MODULE_NAME MRSISuperResolution\)", text)
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES")
    on_disk_py = {p for p in files_under(MODULE, "*.py") if not p.startswith(("Testing/", "Resources/"))}
    assert set(scripts) == on_disk_py
    assert set(resources) == files_under(MODULE / "Resources")
    assert len(scripts) == len(set(scripts)) and len(resources) == len(set(resources))
    # helpers live in the Lib sub-package: a .py directly in the module folder would load as a Slicer module
    assert [p for p in on_disk_py if "/" not in p] == ["MRSISuperResolution.py"]
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    testing = (MODULE / "Testing" / "Python" / "CMakeLists.txt").read_text()
    for script in files_under(MODULE / "Testing", "*.py"):
        assert Path(script).name in testing, f"{script} not registered in Testing/Python/CMakeLists.txt"


def test_extension_cmake_declares_name_dependency_and_embeds_the_engine():
    text = (REPO / "CMakeLists.txt").read_text()
    assert re.search(r"^project\(MRSISuperResolution\)", text, re.M)
    depends = re.search(r'set\(EXTENSION_DEPENDS "([^"]*)"\)', text).group(1).split()
    assert "PyTorch" in depends
    for var in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert re.search(rf"set\(EXTENSION_{var} \"[^\"]+\"\)", text), var
    assert "add_subdirectory(MRSISuperResolution)" in text and "## NEXT_MODULE" in text
    assert "ctkMacroCompilePythonScript" in text and "ftddm_core/*.py" in text
    assert text.index("include(${Slicer_USE_FILE})") < text.index("ctkMacroCompilePythonScript")
    assert (REPO / "ftddm_core" / "__init__.py").exists() and (REPO / "ftddm_core" / "cli.py").exists()
    icon = REPO / "Resources" / "Icons" / "MRSISuperResolution.png"
    assert icon.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(icon.read_bytes()[16:20], "big"), int.from_bytes(icon.read_bytes()[20:24], "big")
    assert (width, height) == (128, 128)


# --- Slicer API names ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("min_version", [None, "v5.10.0"])
def test_slicer_names_pass_the_static_checker(min_version):
    if not (CHECKER.exists() and API.exists()):
        pytest.skip("shared/tools/check_slicer_api.py not available beside the repository")
    files = [str(MODULE_FILE), *map(str, sorted((MODULE / "MRSISuperResolutionLib").glob("*.py"))),
             *map(str, sorted((MODULE / "Testing" / "Python").glob("*.py")))]
    cmd = [sys.executable, str(CHECKER), str(API), *files] + (["--min-version", min_version] if min_version else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    errors = [line for line in done.stdout.splitlines() if line.startswith("ERROR")]
    assert done.returncode == 0 and not errors, "\n".join(errors)


# --- .ui ↔ code ↔ parameter node -------------------------------------------------------------------------------
def ui_widgets():
    root = ET.parse(UI_FILE).getroot()
    return root, {w.get("name"): w for w in root.iter("widget")}


DUMP_PARAMETERS = """
import json, typing
import MRSISuperResolution as m
def render(hint):
    if typing.get_origin(hint) is typing.Annotated:
        base, *extras = typing.get_args(hint)
        return "Annotated[%s, %s]" % (render(base), ", ".join("%s%r" % marker for marker in extras))
    local = hint.__module__ in ("builtins", "__main__")  # __main__: the stand-in vtkMRMLScalarVolumeNode
    return hint.__qualname__ if local else hint.__module__ + "." + hint.__qualname__
hints = typing.get_type_hints(m.MRSISuperResolutionParameterNode, include_extras=True)
print(json.dumps({name: render(hint) for name, hint in hints.items()}))
"""


def parameter_fields():
    """Parameter name → annotation as text, e.g. "Annotated[int, WithinRange(1, 1000)]", of the module's
    parameter node (hand-written and generated from SuperResolveOptions), imported with stand-in Slicer modules."""
    done = subprocess.run([sys.executable, "-c", STUB_MODULES + DUMP_PARAMETERS, str(MODULE)], capture_output=True,
                          text=True, cwd=str(MODULE.parent.parent))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


COMPATIBLE = {  # widget class → test on the annotation (see slicer.parameterNodeWrapper.guiConnectors)
    "qMRMLNodeComboBox": lambda a: a == "vtkMRMLScalarVolumeNode",
    "QCheckBox": lambda a: a == "bool",
    "QSpinBox": lambda a: a.startswith("Annotated[int") and "WithinRange" in a,
    "QDoubleSpinBox": lambda a: a.startswith("Annotated[float") and "WithinRange" in a,
    "ctkSliderWidget": lambda a: a.startswith("Annotated[float") and "WithinRange" in a,  # unbounded → RuntimeError
    "QComboBox": lambda a: "Choice(" in a,
    "QLineEdit": lambda a: a == "str",
    "ctkPathLineEdit": lambda a: a == "pathlib.Path",
    "ctkDirectoryButton": lambda a: a == "pathlib.Path",
}


def test_ui_widgets_bind_to_parameter_fields_of_compatible_types():
    root, widgets = ui_widgets()
    assert root.find("widget").get("class") == "qMRMLWidget"
    fields = parameter_fields()
    bound = {}
    for name, w in widgets.items():
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                assert prop.get("stdset") == "0"
                bound[prop.find("string").text] = w.get("class")
    assert set(bound) <= set(fields), set(bound) - set(fields)
    for parameter, cls in bound.items():
        assert COMPATIBLE[cls](fields[parameter]), f"{parameter}: {cls} cannot show {fields[parameter]}"


def test_output_grid_controls_bind_factor_and_autoFactor_with_the_trained_range():
    """The Output grid row: a checkbox on autoFactor, a spin box on factor whose range is the node's WithinRange
    (the engine's trained F range, so the GUI offers exactly what a run accepts without --force)."""
    from ftddm_core.options import TRAINED_SCALES

    _, widgets = ui_widgets()
    fields = parameter_fields()

    def props(name):
        return {p.get("name"): p[0].text for p in widgets[name].findall("property")}

    checkbox, spin = props("autoFactorCheckBox"), props("factorSpinBox")
    assert (widgets["autoFactorCheckBox"].get("class"), checkbox["SlicerParameterName"]) == ("QCheckBox", "autoFactor")
    assert (widgets["factorSpinBox"].get("class"), spin["SlicerParameterName"]) == ("QDoubleSpinBox", "factor")
    assert fields["autoFactor"] == "bool"
    assert fields["factor"] == "Annotated[float, WithinRange(%r, %r)]" % tuple(map(float, TRAINED_SCALES))
    assert (float(spin["minimum"]), float(spin["maximum"])) == tuple(TRAINED_SCALES)
    assert float(spin["singleStep"]) == 0.5 and "round(F·m)" in spin["toolTip"]
    assert "64×64" in checkbox["text"] and "outputGridLabel" in widgets


def test_node_selectors_are_wired_to_the_scene_and_typed():
    root, widgets = ui_widgets()
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    selectors = {n: w for n, w in widgets.items() if w.get("class") == "qMRMLNodeComboBox"}
    assert set(selectors) == receivers and len(selectors) == 4
    for name, w in selectors.items():
        props = {p.get("name"): p for p in w.findall("property")}
        assert [s.text for s in props["nodeTypes"].iter("string")] == ["vtkMRMLScalarVolumeNode"]
        child_types = props["showChildNodeTypes"].find("bool").text
        assert child_types == ("true" if name == "maskSelector" else "false")  # no label maps as MRSI/T1/FLAIR


def test_every_ui_attribute_used_in_code_exists_in_the_ui():
    _, widgets = ui_widgets()
    code = "".join(p.read_text() for p in [MODULE_FILE, *(MODULE / "MRSISuperResolutionLib").glob("*.py")])
    used = set(re.findall(r"self\.ui\.(\w+)", code))
    collapsibles = re.findall(r'"(\w+CollapsibleButton)"', code)
    assert used | set(collapsibles) <= set(widgets), (used | set(collapsibles)) - set(widgets)


# --- grammar and import -----------------------------------------------------------------------------------------
def test_sources_parse_with_the_python_39_grammar():
    for path in [MODULE_FILE, *(MODULE / "MRSISuperResolutionLib").glob("*.py"), *(MODULE / "Testing").rglob("*.py")]:
        ast.parse(path.read_text(), str(path), feature_version=(3, 9))
    # the parameter node's annotations are evaluated at run time: no `X | Y` there
    assert not any("|" in a for a in parameter_fields().values())


STUB_MODULES = textwrap.dedent("""
    import sys, types
    def module(name, **attrs):
        m = types.ModuleType(name); m.__dict__.update(attrs); sys.modules[name] = m; return m
    def base(name):
        return type(name, (), {"__init__": lambda self, *a, **k: None})
    Base = base("Base")
    connected = []
    slicer = module("slicer", vtkMRMLScalarVolumeNode=type("vtkMRMLScalarVolumeNode", (), {}),
                    app=types.SimpleNamespace(connect=lambda *a: connected.append(a)))
    slicer.i18n = module("slicer.i18n", tr=lambda s: s, translate=lambda c, s: s)
    marker = lambda name: lambda *a, **k: (name, a)  # Choice(["a"]) → ("Choice", (["a"],))
    slicer.parameterNodeWrapper = module("slicer.parameterNodeWrapper", Choice=marker("Choice"),
        Decimals=marker("Decimals"), SingleStep=marker("SingleStep"), WithinRange=marker("WithinRange"),
        Validator=object, parameterNodeWrapper=lambda cls: cls)
    slicer.ScriptedLoadableModule = module("slicer.ScriptedLoadableModule", **{n: base(n) for n in (
        "ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
        "ScriptedLoadableModuleWidget")})
    slicer.util = module("slicer.util", VTKObservationMixin=base("VTKObservationMixin"))
    for name in ("qt", "vtk", "ctk"):
        module(name)
    sys.path.insert(0, sys.argv[1])
""")
STUBS = STUB_MODULES + textwrap.dedent("""
    before = set(sys.modules)
    import MRSISuperResolution as m
    heavy = sorted(n for n in set(sys.modules) - before if n.split(".")[0] in ("torch", "pip", "PyTorchUtils", "nibabel"))
    assert not heavy, heavy
    for cls in ("MRSISuperResolution", "MRSISuperResolutionWidget", "MRSISuperResolutionLogic",
                "MRSISuperResolutionTest", "MRSISuperResolutionParameterNode"):
        assert hasattr(m, cls), cls
    import typing
    hints = typing.get_type_hints(m.MRSISuperResolutionParameterNode, include_extras=True)
    assert "tauD" in hints and "modelPath" in hints
    w = m.MRSISuperResolutionWidget.__new__(m.MRSISuperResolutionWidget)
    m.MRSISuperResolutionWidget.__init__(w)
    assert w.logic is None and hasattr(w, "_parameterNode")
    mod = m.MRSISuperResolution.__new__(m.MRSISuperResolution)
    mod.parent = types.SimpleNamespace()
    mod.getDefaultModuleDocumentationLink = lambda: ""
    m.MRSISuperResolution.__init__(mod, mod.parent)
    assert mod.parent.title and connected and connected[0][0] == "startupCompleted()"
    import ftddm_core  # embedded engine importable from the module folder's parent (source tree)
    assert "torch" not in sys.modules
    print("IMPORT-OK")
""")


def test_module_imports_without_installing_or_importing_torch():
    done = subprocess.run([sys.executable, "-c", STUBS, str(MODULE)], capture_output=True, text=True,
                          cwd=str(MODULE.parent.parent))
    assert "IMPORT-OK" in done.stdout, done.stdout + done.stderr


# --- Extensions Index ---------------------------------------------------------------------------------------------
CATALOG_FIELDS = {"$schema", "build_dependencies", "build_subdirectory", "category", "enabled", "scm_revision",
                  "scm_type", "scm_url", "tier"}  # catalog entry schema v1.0.1 (additionalProperties: false)


def test_extensions_index_entry_agrees_with_the_extension_cmake():
    import json

    entry = json.loads((REPO / "ExtensionsIndex" / "MRSISuperResolution.json").read_text())
    assert set(entry) <= CATALOG_FIELDS, set(entry) - CATALOG_FIELDS
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert "catalog-entry-schema-v1.0.1" in entry["$schema"]
    text = (REPO / "CMakeLists.txt").read_text()
    assert entry["category"] == re.search(r'set\(EXTENSION_CATEGORY "([^"]*)"\)', text).group(1)
    assert entry["build_dependencies"] == re.search(r'set\(EXTENSION_DEPENDS "([^"]*)"\)', text).group(1).split()
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "([^"]*)"\)', text).group(1)
    assert entry["scm_url"].removesuffix(".git") == homepage  # one placeholder repository to fill, not two
    assert entry["build_subdirectory"] == "." and (REPO / entry["build_subdirectory"] / "CMakeLists.txt").exists()
