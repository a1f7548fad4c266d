"""Registry of named models: weights (safetensors) plus a model card (JSON).

A model is a folder ``<name>/`` holding ``model.json`` (the card) and ``model.safetensors``
(the weights). Folders are searched in ``$DEEPREGISTER_MODEL_PATH`` (``os.pathsep``
separated), then in the bundled ``Resources/Models`` (:func:`DeepRegisterLib.resources.models_dir`:
package data, the Slicer module's or the source checkout's folder). Loading never unpickles: weights
are read with safetensors, which stores tensors only.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .resources import models_dir

if TYPE_CHECKING:  # torch is only needed to load weights: listing models stays light
    import torch

CARD_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
DEFAULT_MODEL = "generic"  # the best general model (any modality pair): used when none is named


class ModelError(ValueError):
    """A model is missing, unreadable or does not fit this version of DeepRegister."""


@dataclass
class ModelCard:
    """What a model is and how its inputs must be prepared.

    ``input_size`` (x, y, z voxels) and ``spacing_mm`` (x, y, z) define the grid the network
    sees, centred on the fixed image with the fixed image's direction. Intensities are clipped
    to the ``intensity_percentiles`` of each image and scaled to [0, 1].
    """

    name: str
    description: str
    architecture: str
    config: dict
    input_size: list[int]
    spacing_mm: list[float]
    modality: dict = field(default_factory=lambda: {"fixed": "any", "moving": "any"})
    intensity_percentiles: list[float] = field(default_factory=lambda: [1.0, 99.0])
    finetune_metric: str = "mi"
    finetune_iterations: int = 0  # default fine-tuning steps after the network's prediction
    finetune_step_mm: float = 0.05  # Adam step (mm) of the local field's control points at the finest level (0: affine only)
    finetune_samples: int = 24576  # MI samples per fine-tuning step (more: a less noisy gradient, a slower step)
    finetune_organ_weight: float = 0.0  # weight of 1 - soft Dice of the network's organ maps in fine-tuning (0: off)
    finetune_anchor_weight: float = 0.0  # weight of the affine correction's departure from the prediction (0: off)
    saliency_sigma_mm: float = 1.5
    gland_prior: dict = field(default_factory=dict)  # {"matrix": 3 x 3, "offset_mm": 3}: see DeepRegisterLib.prior
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def model_search_path() -> list[Path]:
    """Folders searched for named models, in order: ``$DEEPREGISTER_MODEL_PATH``, then the bundled models."""
    paths = [Path(p) for p in os.environ.get("DEEPREGISTER_MODEL_PATH", "").split(os.pathsep) if p]
    return [*paths, models_dir()]


def read_card(folder: Path) -> ModelCard:
    """Read and validate a model card from a model folder."""
    path = folder / CARD_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"Model folder {folder} has no {CARD_FILE}.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"Model card {path} is corrupt or unreadable ({error}).") from None
    try:
        card = ModelCard(**data)
    except TypeError as error:
        raise ModelError(f"Model card {path} does not fit this version of DeepRegister ({error}).") from None
    if len(card.input_size) != 3 or len(card.spacing_mm) != 3 or min(card.input_size) < 8:
        raise ModelError(f"Model card {path}: input_size and spacing_mm need 3 values each (x, y, z).")
    if not (isinstance(card.finetune_anchor_weight, (int, float)) and math.isfinite(card.finetune_anchor_weight)
            and card.finetune_anchor_weight >= 0):
        raise ModelError(f"Model card {path}: finetune_anchor_weight must be a number >= 0.")
    if card.gland_prior and not _is_gland_prior(card.gland_prior):
        raise ModelError(f"Model card {path}: gland_prior needs a 3 x 3 'matrix' and a 3-value 'offset_mm' of finite numbers.")
    return card


def _is_gland_prior(entry: object) -> bool:
    """A card's ``gland_prior``: a 3 x 3 ``matrix`` and a 3-value ``offset_mm`` of finite numbers."""
    def finite(values: object, count: int) -> bool:
        return (isinstance(values, list) and len(values) == count
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values))

    return (isinstance(entry, dict) and isinstance(entry.get("matrix"), list) and len(entry["matrix"]) == 3
            and all(finite(row, 3) for row in entry["matrix"]) and finite(entry.get("offset_mm"), 3))


def default_model(cards: list[ModelCard]) -> str:
    """The model a registration uses when none is named (command line and Slicer panel alike):
    ``generic``, the best general model, when installed, else the first installed model, else ""
    (no network: fine-tuning on the pair alone, what ``--model none`` asks for)."""
    names = [card.name for card in cards]
    return DEFAULT_MODEL if DEFAULT_MODEL in names else (names[0] if names else "")


def list_models() -> list[ModelCard]:
    """Every readable model in the search path (the first of each name wins)."""
    cards: dict[str, ModelCard] = {}
    for root in model_search_path():
        if not root.is_dir():
            continue
        for folder in sorted(root.iterdir()):
            if (folder / CARD_FILE).is_file():
                try:
                    card = read_card(folder)
                except ModelError:
                    continue
                cards.setdefault(card.name, card)
    return list(cards.values())


def find_model(name_or_path: str | os.PathLike) -> Path:
    """The folder of a model given by name or by a path to its folder or card."""
    path = Path(name_or_path)
    if path.is_file() and path.name == CARD_FILE:
        return path.parent
    if path.is_dir():
        return path
    for root in model_search_path():
        if (root / str(name_or_path) / CARD_FILE).is_file():
            return root / str(name_or_path)
    known = ", ".join(card.name for card in list_models()) or "none installed"
    raise ModelError(f"No model named or found at '{name_or_path}'. Known models: {known}.")


def read_weights(weights: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors weights file (on the CPU; safetensors holds no code), or a
    :class:`ModelError` naming model ``name`` when the file is missing or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not weights.is_file():
        raise ModelError(f"Model '{name}' has no weights file {weights}.")
    try:
        return load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelError(f"Weights of model '{name}' ({weights}) are corrupt: {error}.") from None


def load_model(name_or_path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[ModelCard, torch.nn.Module]:
    """Load a model's card and network in eval mode (weights only, never pickled code)."""
    from .nets import build_network

    folder = find_model(name_or_path)
    card = read_card(folder)
    try:
        network = build_network(card.architecture, tuple(card.input_size), tuple(card.spacing_mm), **card.config)
    except (ValueError, TypeError) as error:
        raise ModelError(f"Model '{card.name}' asks for an unsupported network ({error}).") from None
    state = read_weights(folder / WEIGHTS_FILE, card.name)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first_line = str(error).splitlines()[0]
        raise ModelError(f"Weights of model '{card.name}' do not fit its network: {first_line}") from None
    return card, network.to(device).eval()


def save_model(folder: str | os.PathLike, card: ModelCard, network: torch.nn.Module) -> Path:
    """Write a model folder (card + safetensors weights); returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in network.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / CARD_FILE).write_text(card.to_json(), encoding="utf-8")
    return folder
