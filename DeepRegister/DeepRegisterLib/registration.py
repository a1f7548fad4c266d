"""The registration pipeline: preprocessing (:mod:`.preprocess`) -> network -> fine-tuning (:mod:`.finetune`)
-> the guard's choice of stage -> outputs on the fixed image's grid (a fixed -> moving displacement field, LPS mm)."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import SimpleITK as sitk
import torch

from . import guard, spatial
from .finetune import Pyramid, fine_tune, organ_maps
from .imageio import InputError, check_volume
from .masks import resolve_masks
from .models import ModelCard, load_model
from .options import DEFAULT_ITERATIONS_WITHOUT_MODEL, INITIAL_POSITIONS, SIMILARITIES
from .preprocess import (FINETUNE_GRID_VOXELS, MIN_OVERLAP, SEARCH_REACH_MM, PairInputs, finetune_grid, judge_grid,
                         model_grid, physical_overlap, searched_start, start_position)
from .prior import GlandPrior, prior_displacement
# RegistrationCancelled: re-exported (DeepRegisterLib.RegistrationCancelled, older imports)
from .progress import ProgressCallback, RegistrationCancelled, report_progress  # noqa: F401
from .spatial import Grid



@dataclass
class RegistrationResult:
    """Outputs of :func:`register`, all on the fixed image's grid."""

    transform: sitk.DisplacementFieldTransform  # fixed -> moving, LPS mm
    warped: sitk.Image
    saliency: sitk.Image  # joint saliency in [0, 1]
    timings: dict[str, float]
    folding_percent: float
    model: str
    device: str
    iterations: int
    similarity: str  # "mi", "mind" or "lncc": what fine-tuning compared
    initial: str  # "centers" or "physical": the start position used
    initial_transform: sitk.TranslationTransform  # fixed -> moving start position, LPS mm
    fixed_mask: sitk.Image | None  # UInt8 masks used (given or detected), on their images' grids
    moving_mask: sitk.Image | None
    stages: list[dict]  # each stage's scores and whether the guard accepted it
    kept_stage: str
    min_jacobian: float
    messages: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the guard's: the result is not a plain success

    @property
    def succeeded(self) -> bool:
        """Every stage was accepted and nothing needs the user's attention."""
        return not self.warnings

    def displacement_field(self) -> sitk.Image:
        """A copy of the displacement field (vector image, mm, LPS) on the fixed grid."""
        return sitk.Image(self.transform.GetDisplacementField())


def resolve_device(device: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; "cuda" without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("A GPU (cuda) was requested but PyTorch sees none; use device 'cpu' or 'auto'.")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InputError(f"Unknown device '{device}': use 'auto', 'cpu' or 'cuda'.")
    return torch.device(device)


def instance_card() -> ModelCard:
    """The settings used when no trained model is given (fine-tuning from the identity)."""
    return ModelCard(name="none", description="No network: fine-tuning on the pair from the identity.",
                     architecture="", config={}, input_size=[FINETUNE_GRID_VOXELS] * 3, spacing_mm=[0.0] * 3,
                     finetune_step_mm=0.3, finetune_samples=16384)


def resolve_similarity(similarity: str, card: ModelCard) -> str:
    """"auto" -> the model card's similarity (the one its fine-tuning settings were chosen with)."""
    return card.finetune_metric if similarity == "auto" else similarity


def register(fixed: sitk.Image, moving: sitk.Image, model: str | None = None, device: str = "auto",
             iterations: int | None = None, progress: ProgressCallback | None = None, *,
             similarity: str = "auto", initial: str = "auto", fixed_mask: sitk.Image | None = None,
             moving_mask: sitk.Image | None = None, detect_fov: bool = True) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` (SimpleITK 3D scalar volumes of any size, spacing, direction).

    ``model``: a model name or folder (see :mod:`DeepRegisterLib.models`); ``None`` or "none" runs
    fine-tuning alone from the identity. ``iterations``: fine-tuning steps (default: the model
    card's ``finetune_iterations``, DEFAULT_ITERATIONS_WITHOUT_MODEL without a model).
    ``similarity``: "mi", "mind" (MIND-SSC) or "lncc" for fine-tuning; "auto": the model card's.
    ``initial``: the start position, "physical", "centers" (of the foregrounds) or "auto" (see
    :func:`start_position`). ``fixed_mask``, ``moving_mask``: label images on their image's grid,
    nonzero where the image holds data to compare; without one, ``detect_fov`` looks for an
    ultrasound field of view (see :mod:`DeepRegisterLib.masks`). Masks restrict intensity
    normalisation, similarity, joint saliency and the centre alignment.

    Each stage (start, network, affine and deformable fine-tuning) is judged inside the masks
    (:mod:`DeepRegisterLib.guard`); a stage that makes the alignment worse, or folds, is dropped
    and ``warnings`` say so. When every stage after an automatic start is dropped, the start moved by a
    searched translation (:func:`DeepRegisterLib.preprocess.searched_start`) is kept where it passes, as
    the stage "search", with a warning. ``progress(stage, fraction)`` is called during each stage; return
    ``False`` to cancel (raises :class:`RegistrationCancelled`). On a CUDA out-of-memory error the
    registration is redone on the CPU with a warning.
    """
    fixed = check_volume(fixed, "fixed")
    moving = check_volume(moving, "moving")
    if iterations is not None and iterations < 0:
        raise InputError("The number of fine-tuning iterations cannot be negative.")
    if initial not in INITIAL_POSITIONS:
        raise InputError(f"Unknown initial position '{initial}': use {', '.join(INITIAL_POSITIONS)}.")
    if similarity != "auto" and similarity not in SIMILARITIES:
        raise InputError(f"Unknown similarity '{similarity}': use auto or one of {', '.join(SIMILARITIES)}.")
    messages: list[str] = []
    masks = resolve_masks(fixed, moving, fixed_mask, moving_mask, detect_fov, messages)
    judge_masks = masks if detect_fov else resolve_masks(fixed, moving, fixed_mask, moving_mask, True, [])
    model = None if model in (None, "", "none") else model
    target = resolve_device(device)
    options = (model, iterations, progress, similarity, initial, masks, judge_masks, messages)
    try:
        return _register(fixed, moving, target, *options)
    except torch.OutOfMemoryError:
        if target.type != "cuda":
            raise
        torch.cuda.empty_cache()
        message = "The GPU ran out of memory; registration was redone on the CPU."
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        result = _register(fixed, moving, torch.device("cpu"), *options)
        result.messages.insert(0, message)
        return result


def _register(fixed: sitk.Image, moving: sitk.Image, device: torch.device, model: str | None, iterations: int | None,
              progress: ProgressCallback | None, similarity: str, initial: str,
              masks: tuple[sitk.Image | None, sitk.Image | None],
              judge_masks: tuple[sitk.Image | None, sitk.Image | None], messages: list[str]) -> RegistrationResult:
    timings: dict[str, float] = {}
    messages = list(messages)
    start = time.perf_counter()
    report_progress(progress, "preprocess", 0.0)
    if model is None:
        card, network = instance_card(), None
        iterations = DEFAULT_ITERATIONS_WITHOUT_MODEL if iterations is None else iterations
        messages.append("No trained model: the result comes from fine-tuning on this pair alone.")
    else:
        card, network = load_model(model, device)
        iterations = card.finetune_iterations if iterations is None else iterations
    metric = resolve_similarity(similarity, card)
    fixed_mask, moving_mask = masks
    inputs = PairInputs.prepare(fixed, moving, card, sitk.TranslationTransform(3), fixed_mask, moving_mask)
    shift, initial, start_judge = start_position(inputs, judge_masks, initial, device, messages)
    inputs = replace(inputs, shift=shift)
    grid = model_grid(fixed, card)
    tune_grid = finetune_grid(fixed)
    fixed_grid = Grid.from_image(fixed)
    if physical_overlap(fixed, fixed_mask, moving, moving_mask, shift) < MIN_OVERLAP:
        raise InputError(f"The fixed and moving {'volumes' if fixed_mask is None and moving_mask is None else 'masks'} do not "
                         f"overlap at the {initial} start position (less than {MIN_OVERLAP:.0%} of the fixed one "
                         "lies in the moving one). Check their origins, directions and masks, or start from "
                         "the centres aligned (initial 'centers').")
    tune_images = inputs.on(tune_grid, device)
    tune_masks = inputs.masks_on(tune_grid, device)
    timings["preprocess"] = time.perf_counter() - start

    start = time.perf_counter()
    report_progress(progress, "network", 0.0)
    initial_field = torch.zeros(1, 3, *tune_grid.shape, device=device)
    network_field = None  # the network's displacement (1, 3, Z, Y, X) in mm on its grid
    organs = None  # the network's organ maps of the fixed and moving image on the fine-tuning grid
    if network is not None:
        outputs = network.register_pair(*inputs.on(grid, device))
        canonical = outputs["displacement"]
        direction = torch.as_tensor(np.reshape(grid.direction, (3, 3)), dtype=canonical.dtype, device=device)
        network_field = torch.einsum("ij,bjzyx->bizyx", direction, canonical)
        prior = GlandPrior.from_card(card.gland_prior)
        prior_field = prior_displacement(prior, outputs, grid, messages) if prior is not None else None
        if prior_field is not None:
            network_field = prior_field
        initial_field = spatial.resample_field(network_field, grid, tune_grid)
        if card.finetune_organ_weight > 0 and iterations > 0:
            organs = organ_maps(outputs, grid, tune_grid, messages)
    pyramid = Pyramid(*tune_images, tune_grid, card.saliency_sigma_mm, organs, tune_masks)
    timings["network"] = time.perf_counter() - start

    start = time.perf_counter()
    deformation = None
    if iterations > 0:
        deformation = fine_tune(pyramid, initial_field, iterations, metric, progress,
                                field_step_mm=card.finetune_step_mm, samples=card.finetune_samples,
                                organ_weight=card.finetune_organ_weight, anchor_weight=card.finetune_anchor_weight)
    timings["finetune"] = time.perf_counter() - start

    start = time.perf_counter()
    report_progress(progress, "output", 0.0)
    with torch.no_grad():
        def stage_field(stage: str, target: Grid) -> torch.Tensor:
            """A stage's displacement (1, 3, Z, Y, X) in mm on ``target``, on top of the start position."""
            if stage == "search":
                offset = torch.as_tensor(search[0], dtype=torch.float32, device=device).view(1, 3, 1, 1, 1)
                return offset.expand(1, 3, *target.shape).clone()
            field = (torch.zeros(1, 3, *target.shape, device=device) if network_field is None or stage == "start"
                     else spatial.resample_field(network_field, grid, target))
            if stage in ("affine", "deformable"):
                field = field + deformation.displacement_on(target, local=stage == "deformable")
            return field

        stages = ["start"] + (["network"] if network is not None else [])
        if deformation is not None:
            stages += ["affine"] + (["deformable"] if deformation.control_grids else [])
        small = judge_grid(fixed)
        judge = start_judge or replace(inputs, fixed_mask=judge_masks[0], moving_mask=judge_masks[1]).judge(small, device)
        if network is not None and "fixed_segmentation" in outputs:
            judge_organs = organ_maps(outputs, grid, small, [])
            if judge_organs is not None:
                judge.add_organs(*judge_organs)
        scores = []
        for stage in stages:
            field_small = stage_field(stage, small)
            scores.append(judge.score(stage, field_small))
        kept, guard_warnings = guard.choose(scores)
        search = None  # (translation in mm, score): the automatic start moved, when every later stage was refused
        if kept is scores[0] and len(scores) > 1 and start_judge is not None:
            search = searched_start(judge, messages)
            if search is not None:
                kept = search[1]
                kept.accepted = True
                scores.append(kept)
                guard_warnings[-1] = ("The result is the start position moved by ({:.1f}, {:.1f}, {:.1f}) mm (LPS), the "
                                      "translation within about {:g} mm that best aligns the MIND-SSC descriptors (both halves of "
                                      "the fixed image and mutual information agree): check it before relying on it."
                                      ).format(*search[0], SEARCH_REACH_MM)
        saliency_grid = pyramid.saliency_level(1)[2]
        saliency_small = pyramid.joint_saliency(1, stage_field(kept.stage, saliency_grid))
        full = stage_field(kept.stage, fixed_grid)
        full = full + torch.as_tensor(shift.GetOffset(), dtype=full.dtype, device=device).view(1, 3, 1, 1, 1)
        determinant = spatial.jacobian_determinant(full, fixed_grid)
        folding = spatial.percent_folded(determinant)
        if folding > guard.MAX_FOLDING_PERCENT:
            guard_warnings.append(f"The result folds on {folding:.2f} % of the fixed image's voxels (non-positive "
                                  "Jacobian determinant): check it before relying on it.")
        transform = sitk.DisplacementFieldTransform(spatial.displacement_to_sitk(full.cpu(), fixed_grid))
    warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    saliency = sitk.Resample(saliency_grid.place(sitk.GetImageFromArray(saliency_small[0, 0].cpu().numpy())), fixed,
                             sitk.Transform(), sitk.sitkLinear, 0.0)
    saliency = sitk.Clamp(saliency, sitk.sitkFloat32, 0.0, 1.0)
    timings["output"] = time.perf_counter() - start
    timings["total"] = sum(timings.values())
    report_progress(progress, "output", 1.0)
    name = card.name if network is not None else "none (fine-tuning only)"
    return RegistrationResult(transform, warped, saliency, timings, folding, name, str(device), iterations, metric,
                              initial, shift, fixed_mask, moving_mask, [score.as_dict() for score in scores],
                              kept.stage, float(determinant.min()), messages, guard_warnings)
