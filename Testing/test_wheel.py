"""A non-editable install works on its own: ``pip install .`` ships the models, the sample pair and the
training code under its namespaced name, and every layout finds the bundled resources.

The project is built into a wheel from a copy of its sources (the working tree is not written to; a stale
``build/`` cannot leak into the wheel) and installed with ``pip install --target`` into a temporary folder.
That copy is run from another temporary folder with ``python -S``: no ``.pth`` file is processed, so the
editable install of the development environment (a meta path finder loaded by a ``.pth`` file) cannot
stand in for the installed copy; the dependencies come from the running interpreter's site-packages,
placed after the installed copy on ``PYTHONPATH``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("generic", "mrus")
SAMPLE_FILES = ("fixed_us.nii.gz", "moving_mr.nii.gz", "fixed_landmarks.fcsv", "moving_landmarks.fcsv",
                "fixed_gland.nii.gz", "moving_gland.nii.gz")
# What the sources copy for the build leaves out: caches, build outputs, downloaded training data.
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "data_cache")

# Prints where the modules and resources of the interpreter's DeepRegisterLib come from.
_WHERE = """
import importlib.util, json, sys
import DeepRegisterLib
from DeepRegisterLib import cli, models, resources
print("WHERE", json.dumps({
    "package": DeepRegisterLib.__file__, "models_dir": str(resources.models_dir()),
    "sample_data_dir": str(resources.sample_data_dir()), "cli_sample_data": str(cli.SAMPLE_DATA),
    "models": [card.name for card in models.list_models()], "generic": str(models.find_model("generic")),
    "training": importlib.util.find_spec("training") is not None,
}))
"""


def _site_packages() -> list[str]:
    """The running interpreter's site-packages folders (its dependencies: numpy, SimpleITK, torch, ...)."""
    return [path for path in sys.path if Path(path).name in ("site-packages", "dist-packages")]


def run_isolated(path: list[Path], *args: str, cwd: Path, env: dict | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -S *args`` in ``cwd`` with ``path`` first on sys.path, then the dependencies only."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("PYTHONPATH", "DEEPREGISTER_MODEL_PATH", "PYTHONSTARTUP")}
    environment.update(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), MPLBACKEND="Agg",
                       PYTHONPATH=os.pathsep.join([*map(str, path), *_site_packages()]), **(env or {}))
    return subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=timeout)


def where(path: list[Path], cwd: Path, env: dict | None = None) -> dict:
    done = run_isolated(path, "-c", _WHERE, cwd=cwd, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [line for line in done.stdout.splitlines() if line.startswith("WHERE ")][-1]
    return json.loads(line[len("WHERE "):])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built without build isolation (no network) from a copy of its sources."""
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not installed in this interpreter: cannot build the wheel")
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools (the build backend) is not installed: cannot build the wheel offline")
    folder = tmp_path_factory.mktemp("wheel")
    source = folder / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("DeepRegister", "training", "Resources"):
        shutil.copytree(ROOT / name, source / name, ignore=IGNORED)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "--wheel-dir", str(folder / "dist"), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    wheels = sorted((folder / "dist").glob("deepregister-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed (no dependencies) into a folder of its own."""
    target = tmp_path_factory.mktemp("installed").resolve()  # resolved as the installed modules see it
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return target


def test_wheel_ships_models_sample_data_and_namespaced_training(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        top_level = archive.read(next(name for name in names if name.endswith(".dist-info/top_level.txt")))
    for model in MODELS:
        for file in ("model.json", "model.safetensors"):
            assert f"DeepRegisterLib/Resources/Models/{model}/{file}" in names
    for file in SAMPLE_FILES:
        assert f"DeepRegisterLib/Resources/SampleData/{file}" in names
    assert {"deepregister_training/train.py", "deepregister_training/studies/mrus_references.py",
            "DeepRegisterLib/resources.py"} <= names
    assert sorted(top_level.decode().split()) == ["DeepRegisterLib", "deepregister_training"]
    assert not [name for name in names if name.split("/")[0] in ("training", "Resources")]
    # The Slicer module's panel, icon and the docs' screenshots are not package data.
    assert not [name for name in names if any(part in name for part in ("/Icons/", "/UI/", "/Screenshots/"))]


def test_installed_copy_lists_the_bundled_models(installed: Path, tmp_path: Path) -> None:
    tmp_path = tmp_path.resolve()
    found = where([installed], tmp_path)
    assert Path(found["package"]).is_relative_to(installed), found
    assert Path(found["models_dir"]) == installed / "DeepRegisterLib" / "Resources" / "Models"
    assert Path(found["sample_data_dir"]) == Path(found["cli_sample_data"]) == \
        installed / "DeepRegisterLib" / "Resources" / "SampleData"
    assert found["models"] == list(MODELS) and not found["training"], found
    done = run_isolated([installed], "-m", "DeepRegisterLib.cli", "models", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line.split()[0] for line in done.stdout.splitlines() if line.strip()][:2] == list(MODELS), done.stdout
    # The console script pip wrote runs the same command.
    assert (installed / "bin" / "deepregister").is_file()
    # $DEEPREGISTER_MODEL_PATH comes first.
    shutil.copytree(ROOT / "Resources" / "Models" / "generic", tmp_path / "mine" / "generic")
    found = where([installed], tmp_path, env={"DEEPREGISTER_MODEL_PATH": str(tmp_path / "mine")})
    assert Path(found["generic"]) == tmp_path / "mine" / "generic", found


def test_installed_copy_runs_the_demo(installed: Path, tmp_path: Path) -> None:
    """The demo reads the installed sample pair and the installed default model (~5 s on 2 cores)."""
    done = run_isolated([installed], "-m", "DeepRegisterLib.cli", "demo", "--out", "demo-output", cwd=tmp_path)
    assert done.returncode in (0, 3), done.stdout[-3000:] + done.stderr[-3000:]
    assert "Landmark TRE" in done.stdout, done.stdout
    report = json.loads((tmp_path / "demo-output" / "report.json").read_text(encoding="utf-8"))
    assert report["model"] == "generic" and Path(report["fixed"]).is_relative_to(installed), report["fixed"]
    assert report["tre_mm"]["after"]["median"] < report["tre_mm"]["before"]["median"]
    for file in report["files"]:
        assert (tmp_path / "demo-output" / file).is_file(), file


def test_installed_training_is_namespaced(installed: Path, tmp_path: Path) -> None:
    done = run_isolated([installed], "-c", "import training", cwd=tmp_path)
    assert done.returncode != 0 and "No module named 'training'" in done.stderr, done.stderr[-3000:]
    done = run_isolated([installed], "-c", "import deepregister_training.evaluate, deepregister_training.train as t; "
                        "print('FILE', t.__file__)", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(done.stdout.split("FILE ")[-1].strip()).is_relative_to(installed), done.stdout
    done = run_isolated([installed], "-m", "deepregister_training.train", "--help", cwd=tmp_path)
    assert done.returncode == 0 and "--config" in done.stdout, done.stderr[-3000:]


def test_slicer_module_and_source_checkout_find_the_resources(tmp_path: Path) -> None:
    """Slicer's layout (no pip metadata): ``<module dir>/Resources`` beside ``<module dir>/DeepRegisterLib``, as
    DeepRegister/CMakeLists.txt builds it; a source checkout: the project's ``Resources`` (PYTHONPATH=DeepRegister)."""
    module_dir = tmp_path.resolve() / "qt-scripted-modules"
    shutil.copytree(ROOT / "DeepRegister" / "DeepRegisterLib", module_dir / "DeepRegisterLib",
                    ignore=shutil.ignore_patterns("__pycache__", "tools"))
    for kind in ("Models", "SampleData"):
        shutil.copytree(ROOT / "Resources" / kind, module_dir / "Resources" / kind)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    found = where([module_dir], cwd)
    assert Path(found["package"]).is_relative_to(module_dir), found
    assert Path(found["models_dir"]) == module_dir / "Resources" / "Models"
    assert Path(found["sample_data_dir"]) == Path(found["cli_sample_data"]) == module_dir / "Resources" / "SampleData"
    assert found["models"] == list(MODELS), found
    found = where([ROOT / "DeepRegister"], cwd)
    assert Path(found["models_dir"]) == ROOT / "Resources" / "Models"
    assert Path(found["sample_data_dir"]) == ROOT / "Resources" / "SampleData"
    assert found["models"] == list(MODELS), found
