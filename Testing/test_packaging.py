"""Packaging: the Slicer Extensions Index entry, the extension's CMake metadata, and Python 3.9.

Supported Slicer releases: 5.8 (Python 3.9.10, Slicer tag v5.8.1) and 5.10 (Python 3.12.10, Slicer tag
v5.10.0); both read from ``Slicer_REQUIRED_PYTHON_VERSION`` (CMakeLists.txt) and
``SuperBuild/External_python.cmake`` at those tags.  Everything the Slicer module loads must therefore
import on Python 3.9: no runtime ``X | Y`` type unions, ``match``, parenthesised context managers,
``zip(strict=)`` and the like.  The tests below check that without network access.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import subprocess
import textwrap
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CATALOG_ENTRY = ROOT / "DeepRegister.json"
CMAKE_FILE = ROOT / "CMakeLists.txt"
RAW_PREFIX = "https://raw.githubusercontent.com/deepregister/SlicerDeepRegister/main/"

# The catalog entry schema, copied verbatim from Slicer/ExtensionsIndex at commit
# 07f1d1b2781c7dd9f6e2a9f5521b3ed43631724c (2026-08-07), schemas/slicer-extension-catalog-entry-schema-v1.0.1.json
# (the same content as Slicer/Slicer's Schemas/ file, last changed there in cf2a70e6331d66dd21f89cfc14e81db6883ca170).
SCHEMA_FILE = Path(__file__).with_name("slicer-extension-catalog-entry-schema-v1.0.1.json")
SCHEMA_URL = ("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
              "slicer-extension-catalog-entry-schema-v1.0.1.json#")
# ACCEPTED_EXTENSION_CATEGORIES of scripts/check_description_files.py, same ExtensionsIndex commit.
ACCEPTED_CATEGORIES = {
    "Active Learning", "Analysis", "Auto3dgm", "BigImage", "Cardiac", "Chest Imaging Platform", "Conda",
    "Converters", "DICOM", "DSCI", "Developer Tools", "Diffusion", "Examples", "Exporter", "FTV Segmentation",
    "Filtering", "Filtering.Morphology", "Filtering.Vesselness", "Holographic Display", "Image Synthesis",
    "IGT", "Informatics", "Netstim", "Neuroimaging", "Nuclear Medicine", "Orthodontics", "Osteotomy Planning",
    "Otolaryngology", "Photogrammetry", "Pipelines", "Planning", "Printing", "Quantification", "Radiotherapy",
    "Registration", "Remote", "Rendering", "SPHARM", "Segmentation", "Sequences", "Shape Analysis",
    "Shape Regression", "Shape Visualization", "Simulation", "SlicerCMF", "SlicerMorph", "Spectral Imaging",
    "Supervisely", "Surface Models", "SurfaceLearner", "Tomographic Reconstruction", "Tracking", "Tractography",
    "Training", "Ultrasound", "Utilities", "Vascular Modeling Toolkit", "Virtual Reality", "VisSimTools",
    "Web System Tools", "Wizards",
}

PYTHON39 = Path("/root/.pyenv/versions/3.9.18/bin/python3.9")
# Interpreters (3.9) that may also have numpy and SimpleITK, for the import test; DEEPREGISTER_PYTHON39 first.
PYTHON39_WITH_NUMPY = [os.environ.get("DEEPREGISTER_PYTHON39", ""), "/tmp/py39venv/bin/python", str(PYTHON39)]
# The torch-free modules of DeepRegisterLib (the Slicer panel and logic import them before PyTorch is installed).
TORCH_FREE_MODULES = [
    "options", "resources", "models", "landmarks", "imageio", "colors", "memory", "report", "cli", "tools.benchmark",
]
# ... and those that also need VTK (Slicer's); imported when the 3.9 interpreter has the vtk wheel.
VTK_MODULES = ["mrml", "display", "logic"]


def python_sources() -> list[Path]:
    """Every .py file of the Slicer module, DeepRegisterLib and training (what Slicer or the package loads)."""
    files = sorted([*(ROOT / "DeepRegister").rglob("*.py"), *(ROOT / "training").rglob("*.py")])
    return [f for f in files if "__pycache__" not in f.parts]


# -- the Extensions Index entry -----------------------------------------------------------------------
_JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "number": (int, float)}


def schema_errors(instance, schema: dict, path: str = "") -> list[str]:
    """What ``instance`` breaks of a JSON schema (the draft-07 keywords the catalog schema uses)."""
    errors = []
    kind = schema.get("type")
    if kind == "integer":
        if not isinstance(instance, int) or isinstance(instance, bool):
            return [f"{path or '/'}: {instance!r} is not an integer"]
    elif kind is not None:
        if not isinstance(instance, _JSON_TYPES[kind]) or (kind == "number" and isinstance(instance, bool)):
            return [f"{path or '/'}: {instance!r} is not of type {kind}"]
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{path}: {instance!r} is not one of {schema['enum']}")
    if "minimum" in schema and instance < schema["minimum"]:
        errors.append(f"{path}: {instance!r} is below the minimum {schema['minimum']}")
    if "maximum" in schema and instance > schema["maximum"]:
        errors.append(f"{path}: {instance!r} is above the maximum {schema['maximum']}")
    if isinstance(instance, dict):
        for key in schema.get("required", []):
            if key not in instance:
                errors.append(f"{path}/: required key {key!r} is missing")
        properties = schema.get("properties", {})
        for key, value in instance.items():
            if key in properties:
                errors += schema_errors(value, properties[key], f"{path}/{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}/: key {key!r} is not allowed")
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(instance):
            errors += schema_errors(item, schema["items"], f"{path}/{i}")
    return errors


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def entry() -> dict:
    return json.loads(CATALOG_ENTRY.read_text(encoding="utf-8"))


def test_catalog_entry_follows_the_schema(entry, schema):
    assert schema["$id"] == SCHEMA_URL
    assert schema_errors(entry, schema) == []
    assert entry["$schema"] == SCHEMA_URL, "the entry must name the schema it follows"


@pytest.mark.parametrize("change", [
    {"$schema": None},                        # required key missing
    {"category": None},
    {"scm_url": None},
    {"scm_url": 3},                           # wrong type
    {"build_dependencies": "PyTorch"},        # a string, not a list
    {"build_dependencies": ["PyTorch", 1]},
    {"scm_type": "svn"},                      # not in the enum
    {"tier": 6},                              # above the maximum
    {"tier": 0},
    {"tier": "1"},
    {"tier": True},
    {"enabled": 1},                           # boolean in JSON, 0/1 only in the old .s4ext
    {"depends": "PyTorch"},                   # .s4ext key: additionalProperties is false
])
def test_schema_check_rejects_a_broken_entry(entry, schema, change):
    broken = dict(entry)
    for key, value in change.items():
        if value is None:
            broken.pop(key)
        else:
            broken[key] = value
    assert schema_errors(broken, schema), f"{change} was accepted"


def test_catalog_entry_matches_the_extension(entry):
    """The Index's own checks (scripts/check_description_files.py) and the values CMakeLists.txt builds."""
    assert not (ROOT / "DeepRegister.s4ext").exists(), "the Extensions Index takes only the .json entry"
    assert entry["category"] in ACCEPTED_CATEGORIES
    assert entry["category"] == cmake_setting("EXTENSION_CATEGORY")
    assert entry["build_dependencies"] == cmake_setting("EXTENSION_DEPENDS").split() == ["PyTorch"]
    assert entry["scm_url"] == "https://github.com/deepregister/SlicerDeepRegister.git"
    assert entry["scm_revision"] == "main"
    repository = entry["scm_url"].rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
    assert repository.startswith("Slicer") and not CATALOG_ENTRY.stem.lower().startswith("slicer")
    assert CATALOG_ENTRY.stem == re.search(r"project\((\w+)\)", CMAKE_FILE.read_text()).group(1)
    assert b"\r" not in CATALOG_ENTRY.read_bytes(), "the Index accepts LF line endings only"


# -- CMakeLists.txt: icon and screenshots -----------------------------------------------------------------
def cmake_setting(name: str, text: str | None = None) -> str:
    text = CMAKE_FILE.read_text(encoding="utf-8") if text is None else text
    match = re.search(rf'^\s*set\(\s*{name}\s+"([^"]*)"\s*\)', text, re.MULTILINE)
    assert match, f"CMakeLists.txt sets no {name}"
    return match.group(1)


def missing_image_urls(cmake_text: str) -> list[str]:
    """EXTENSION_ICONURL / EXTENSION_SCREENSHOTURLS entries that name no file of this repository."""
    urls = [cmake_setting("EXTENSION_ICONURL", cmake_text),
            *cmake_setting("EXTENSION_SCREENSHOTURLS", cmake_text).split()]
    return [url for url in urls
            if not url.startswith(RAW_PREFIX) or not (ROOT / url[len(RAW_PREFIX):]).is_file()]


def test_icon_and_screenshot_urls_name_files_in_the_repository():
    text = CMAKE_FILE.read_text(encoding="utf-8")
    screenshots = cmake_setting("EXTENSION_SCREENSHOTURLS").split()
    assert len(screenshots) >= 3, "the Extensions Manager shows the screenshots: list them"
    assert missing_image_urls(text) == []
    # The check fails for a missing file, a URL elsewhere, and a missing icon.
    assert missing_image_urls(text.replace("panel-designer.png", "panel-desginer.png"))
    assert missing_image_urls(text.replace(RAW_PREFIX + "Resources/Icons", "https://example.org/Icons"))
    assert missing_image_urls(text.replace("DeepRegister.png", "Missing.png"))


# -- Python 3.9 (Slicer 5.8) ------------------------------------------------------------------------------------
BUILTIN_TYPES = {"int", "float", "complex", "str", "bytes", "bytearray", "bool", "list", "dict", "tuple", "set",
                 "frozenset", "type", "object", "slice", "range", "memoryview"}
LOWERCASE_TYPES = {"ndarray", "dtype", "generic"}  # np.ndarray and friends
# Standard library names added after Python 3.9, by module.
NEWER_NAMES = {
    "typing": {"TypeAlias", "ParamSpec", "ParamSpecArgs", "ParamSpecKwargs", "Concatenate", "TypeGuard",
               "is_typeddict", "Self", "Never", "LiteralString", "assert_never", "assert_type", "reveal_type",
               "Required", "NotRequired", "Unpack", "TypeVarTuple", "dataclass_transform", "get_overloads",
               "clear_overloads", "override", "TypeAliasType", "ReadOnly", "TypeIs", "NoDefault"},
    "itertools": {"pairwise", "batched"},
    "datetime": {"UTC"},
    "enum": {"StrEnum", "ReprEnum", "verify", "EnumCheck", "FlagBoundary", "member", "nonmember", "global_enum"},
    "contextlib": {"chdir", "aclosing"},
    "types": {"NoneType", "EllipsisType", "UnionType", "NotImplementedType"},
    "inspect": {"get_annotations", "markcoroutinefunction"},
    "dataclasses": {"KW_ONLY"},
    "math": {"cbrt", "exp2", "sumprod", "fma"},
    "statistics": {"correlation", "covariance", "linear_regression"},
    "asyncio": {"TaskGroup", "timeout", "timeout_at", "Runner", "Barrier"},
    "hashlib": {"file_digest"},
    "operator": {"call"},
    "sys": {"stdlib_module_names", "orig_argv", "exception"},
    "logging": {"getLevelNamesMapping", "getHandlerByName", "getHandlerNames"},
    "importlib.metadata": {"packages_distributions"},
    "os": {"process_cpu_count"},
}
NEWER_MODULES = {"tomllib"}
NEWER_BUILTINS = {"aiter", "anext", "ExceptionGroup", "BaseExceptionGroup", "EncodingWarning"}
NEWER_METHODS = {"bit_count", "hardlink_to", "is_junction", "with_segments", "add_note"}
# Keyword arguments added after 3.9: function name -> keywords.
NEWER_KEYWORDS = {
    "zip": {"strict"}, "dataclass": {"slots", "kw_only", "match_args", "weakref_slot"}, "field": {"kw_only"},
    "bisect": {"key"}, "bisect_left": {"key"}, "bisect_right": {"key"}, "insort": {"key"},
    "insort_left": {"key"}, "insort_right": {"key"}, "glob": {"root_dir", "dir_fd", "include_hidden"},
    "iglob": {"root_dir", "dir_fd", "include_hidden"}, "rmtree": {"onexc"}, "realpath": {"strict"},
    "NamedTemporaryFile": {"delete_on_close"},
}


def _looks_like_a_type(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return node.value is None
    if isinstance(node, (ast.Name, ast.Attribute)):  # int, Path, _Parsed, os.PathLike, np.ndarray; not FLAG_A
        name = (node.id if isinstance(node, ast.Name) else node.attr).lstrip("_")
        return (name in BUILTIN_TYPES or name in LOWERCASE_TYPES) or (name[:1].isupper() and not name.isupper())
    if isinstance(node, ast.Subscript):  # list[int], os.PathLike[str], Optional[int]
        return _looks_like_a_type(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _looks_like_a_type(node.left) or _looks_like_a_type(node.right)
    return False


def _annotation_nodes(tree: ast.AST) -> set[int]:
    """ids of every node inside an annotation (not evaluated under ``from __future__ import annotations``)."""
    roots = []
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and node.annotation is not None:
            roots.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            roots.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            roots.append(node.annotation)
    return {id(inner) for root in roots for inner in ast.walk(root)}


def _parenthesised_with(source: str) -> list[int]:
    """Lines of ``with (a as b, c):`` (Python 3.10 grammar; 3.9's parser takes it only by accident)."""
    lines = []
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type not in (tokenize.NL, tokenize.COMMENT)]
    for i, token in enumerate(tokens[:-1]):
        if token.type != tokenize.NAME or token.string != "with" or tokens[i + 1].string != "(":
            continue
        depth = 0
        for inner in tokens[i + 1:]:
            if inner.string in "([{" and inner.type == tokenize.OP:
                depth += 1
            elif inner.string in ")]}" and inner.type == tokenize.OP:
                depth -= 1
                if depth == 0:
                    break
            elif depth == 1 and (inner.string == "," or (inner.type == tokenize.NAME and inner.string == "as")):
                lines.append(token.start[0])
                break
    return lines


def python39_problems(source: str, filename: str = "<source>") -> list[str]:
    """Constructs of ``source`` that Python 3.9 does not run: 3.10+ syntax, runtime ``X | Y`` type unions,
    3.10+ standard library names and keyword arguments."""
    tree = ast.parse(source, filename)
    problems = []

    def report(node, what):
        problems.append(f"{filename}:{getattr(node, 'lineno', '?')}: {what}")

    postponed = any(isinstance(node, ast.ImportFrom) and node.module == "__future__"
                    and any(alias.name == "annotations" for alias in node.names) for node in tree.body)
    skipped = _annotation_nodes(tree) if postponed else set()
    modules = {}  # local name -> module name, from `import x` / `import x as y`
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                modules[alias.asname or top] = alias.name if alias.asname else top
                if alias.name.split(".")[0] in NEWER_MODULES:
                    report(node, f"module {alias.name} is new in Python 3.11")
    for node in ast.walk(tree):
        kind = type(node).__name__
        if kind in {"Match", "TryStar", "TypeAlias"}:
            report(node, f"{kind} statement is Python 3.10+ syntax")
        if getattr(node, "type_params", None):
            report(node, "type parameter syntax is Python 3.12+")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) and id(node) not in skipped:
            if _looks_like_a_type(node.left) or _looks_like_a_type(node.right):
                report(node, f"`{ast.unparse(node)}` is evaluated at run time: X | Y unions need Python 3.10 "
                             "(use typing.Union / Optional, or a string)")
            skipped.update(id(inner) for inner in ast.walk(node))  # one report per union
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in NEWER_MODULES:
                report(node, f"module {node.module} is new in Python 3.11")
            for alias in node.names:
                if alias.name in NEWER_NAMES.get(node.module, ()):
                    report(node, f"{node.module}.{alias.name} is new after Python 3.9")
        if isinstance(node, ast.Attribute) and id(node) not in skipped:
            dotted = ast.unparse(node.value)
            module = modules.get(dotted.split(".")[0])
            if module is not None:
                module = ".".join([module, *dotted.split(".")[1:]])
                if node.attr in NEWER_NAMES.get(module, ()):
                    report(node, f"{module}.{node.attr} is new after Python 3.9")
            if node.attr in NEWER_METHODS:
                report(node, f".{node.attr}() is new after Python 3.9")
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in NEWER_BUILTINS:
            report(node, f"builtin {node.id} is new after Python 3.9")
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            for keyword in node.keywords:
                if keyword.arg in NEWER_KEYWORDS.get(name, ()):
                    report(node, f"{name}({keyword.arg}=) is new after Python 3.9")
            if (name in {"format_exception", "print_exception"} and len(node.args) == 1
                    and not node.keywords):
                report(node, f"{name}(exc) with one argument is new in Python 3.10")
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Starred):
            report(node, "x[*a] is Python 3.11+ syntax")
    problems += [f"{filename}:{line}: parenthesised context managers are Python 3.10+ syntax"
                 for line in _parenthesised_with(source)]
    return problems


@pytest.mark.parametrize("code", [
    "from __future__ import annotations\nimport os\nPathLike = str | os.PathLike[str]\n",
    "import numpy as np\ndef f(x):\n    return isinstance(x, int | float)\n",
    "from __future__ import annotations\nfrom typing import Optional\nX = Optional[int] | None\n",
    "def f(x: int | None): pass\n",                                    # no __future__: annotations run
    "class A:\n    x: list[int] | None = None\n",
    "_Parsed = tuple[list[float], str]\nReader = _Parsed | None\n",
    "import typing\nT = typing.TypeVar('T', bound=int | str)\n",
    "match x:\n    case 1:\n        pass\n",
    "with (open('a') as f, open('b') as g):\n    pass\n",
    "with (\n    open('a'),\n    open('b'),\n):\n    pass\n",
    "for a, b in zip(x, y, strict=True):\n    pass\n",
    "from dataclasses import dataclass\n@dataclass(slots=True)\nclass A:\n    x: int = 0\n",
    "from typing import TypeAlias\n",
    "import itertools\nitertools.pairwise([1, 2])\n",
    "import tomllib\n",
    "n = (5).bit_count()\n",
    "import traceback\ntraceback.format_exception(ValueError())\n",
])
def test_python39_check_finds_newer_constructs(code):
    assert python39_problems(code), code


@pytest.mark.parametrize("code", [
    "from __future__ import annotations\nimport os\ndef f(path: str | os.PathLike[str]) -> int | None: pass\n",
    "from __future__ import annotations\nclass A:\n    x: list[int] | None = None\n",
    "flags = READ | WRITE\nmerged = {'a': 1} | {'b': 2}\nn = 3 | 4\n",       # dict | dict is 3.9
    "from typing import Optional, Union\nPathLike = Union[str, 'os.PathLike[str]']\n",
    "with (open('a')) as f, open('b') as g:\n    pass\n",
    "with open('a') as f:\n    print((f, 1))\n",
    "import os, ast\nos.walk('.')\nast.walk(None)\ns = 'ab'.removeprefix('a')\n",
])
def test_python39_check_accepts_python39_code(code):
    assert python39_problems(code) == [], code


def test_sources_have_no_python310_constructs():
    """AST check of the module, DeepRegisterLib and training (runs on any Python, no 3.9 needed)."""
    problems = []
    for path in python_sources():
        problems += python39_problems(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert problems == [], "\n".join(problems)


def python39_syntax_errors(paths) -> list[str]:
    """``compile()`` each file with the Python 3.9 interpreter; its syntax errors."""
    script = textwrap.dedent("""
        import sys
        failed = []
        for name in sys.argv[1:]:
            try:
                compile(open(name, encoding="utf-8").read(), name, "exec", dont_inherit=True)
            except SyntaxError as error:
                failed.append(f"{name}:{error.lineno}: {error.msg}")
        print("\\n".join(failed))
    """)
    result = subprocess.run([str(PYTHON39), "-c", script, *map(str, paths)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()


@pytest.mark.skipif(not PYTHON39.exists(), reason=f"no Python 3.9 interpreter at {PYTHON39}")
def test_sources_compile_on_python39(tmp_path):
    assert python39_syntax_errors(python_sources()) == []
    newer = tmp_path / "newer.py"  # the check fails on 3.10+ syntax
    newer.write_text("match 1:\n    case 1:\n        pass\n", encoding="utf-8")
    assert python39_syntax_errors([newer])


def _python39_with_numpy() -> str | None:
    for candidate in PYTHON39_WITH_NUMPY:
        if candidate and Path(candidate).is_file():
            check = subprocess.run([candidate, "-c", "import sys, numpy, SimpleITK; "
                                    "sys.exit(sys.version_info[:2] != (3, 9))"], capture_output=True)
            if check.returncode == 0:
                return candidate
    return None


def test_torch_free_modules_import_on_python39():
    """Imports the modules the panel loads before PyTorch under Python 3.9 (needs a 3.9 with numpy and
    SimpleITK: set DEEPREGISTER_PYTHON39, e.g. a venv made with `python3.9 -m venv` + `pip install numpy SimpleITK`)."""
    python = _python39_with_numpy()  # it has no torch: an import of torch fails the test
    if python is None:
        pytest.skip("no Python 3.9 with numpy and SimpleITK (set DEEPREGISTER_PYTHON39)")
    modules = list(TORCH_FREE_MODULES)
    if subprocess.run([python, "-c", "import vtk"], capture_output=True).returncode == 0:
        modules += VTK_MODULES
    script = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module('DeepRegisterLib.' + m)\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "DeepRegister"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([python, "-c", script, *modules], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
