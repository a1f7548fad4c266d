"""Where the bundled models and sample data are: one lookup for every way DeepRegister is installed.

The project keeps them once, in its top-level ``Resources/`` folder (``Models/<name>/`` and
``SampleData/``). Each installation puts that folder somewhere else:

* wheel (``pip install .``): package data inside the package, ``DeepRegisterLib/Resources/``
  (pyproject.toml maps ``DeepRegisterLib.Resources`` onto the top-level folder), found through
  :mod:`importlib.resources`;
* Slicer extension: ``<module dir>/Resources/`` beside ``<module dir>/DeepRegisterLib/``
  (DeepRegister/CMakeLists.txt copies it there; no pip metadata);
* source checkout, editable install (``pip install -e .``) or ``PYTHONPATH=DeepRegister``: the
  project's own ``Resources/``, two levels above ``DeepRegister/DeepRegisterLib/``.

Standard library only: the command line imports this at start-up.
"""

from __future__ import annotations

from importlib import resources as _importlib_resources
from pathlib import Path

RESOURCE_KINDS = ("Models", "SampleData")


def _candidates(kind: str) -> list[Path]:
    """The folders that may hold resource ``kind``, in the order they are tried."""
    package_dir = Path(__file__).resolve().parent
    candidates = []
    packaged = _importlib_resources.files(__package__ or "DeepRegisterLib")
    if isinstance(packaged, Path):  # a package on the file system (not in a zip archive)
        candidates.append(packaged.resolve() / "Resources" / kind)
    for path in (package_dir / "Resources" / kind,  # same place, if importlib gave no file-system path
                 package_dir.parent / "Resources" / kind,  # Slicer extension
                 package_dir.parents[1] / "Resources" / kind):  # source checkout, editable install
        if path not in candidates:
            candidates.append(path)
    return candidates


def resource_dir(kind: str) -> Path:
    """The folder of bundled resource ``kind`` (``"Models"`` or ``"SampleData"``): the first of
    package data, the Slicer module's ``Resources/`` and the source checkout's ``Resources/`` that
    exists; the package-data location when none does (a partial installation)."""
    if kind not in RESOURCE_KINDS:
        raise ValueError(f"Unknown resource kind '{kind}'; use one of {', '.join(RESOURCE_KINDS)}.")
    candidates = _candidates(kind)
    return next((path for path in candidates if path.is_dir()), candidates[0])


def models_dir() -> Path:
    """The bundled models' folder (``<name>/model.json`` + ``model.safetensors`` each)."""
    return resource_dir("Models")


def sample_data_dir() -> Path:
    """The bundled sample pair's folder (what ``deepregister demo`` and Slicer's Sample Data load)."""
    return resource_dir("SampleData")
