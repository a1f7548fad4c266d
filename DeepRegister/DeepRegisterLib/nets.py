"""Registration networks on the canonical grid.

Every network is built from ``size`` (x, y, z voxels, ITK order) and ``spacing`` (x, y, z mm)
and works on ``Grid.canonical(size, spacing)`` (identity direction, centred on 0).
``forward(fixed, moving)`` takes two intensity-normalised images (B, 1, Z, Y, X) on that grid
and returns a ``dict[str, torch.Tensor]`` that always holds ``"displacement"``: (B, 3, Z, Y, X)
in mm, channel k = physical axis x, y, z, mapping fixed points to moving points, so that
``warp(moving, displacement, grid)`` aligns with ``fixed`` (see :mod:`DeepRegisterLib.spatial`).

Each network keeps its constructor keyword arguments (JSON-serialisable, sequences as lists)
in ``config``; ``build_network(name, net.grid.size, net.grid.spacing, **net.config)`` rebuilds it.

GlobalNet, LocalNet and RegNet use convolutions with LeakyReLU and no normalisation: results do
not depend on the batch, deep levels may shrink to one voxel, and no instance normalisation
removes the per-channel means and moments that GlobalNet's pooling reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from DeepRegisterLib.saliency import JointSaliency
from DeepRegisterLib.spatial import (Grid, SpatialTransformer, affine_displacement, compose,
                                     integrate_gradients)

_NEGATIVE_SLOPE = 0.2
_OUTPUT_INIT_STD = 1e-5
_DILATIONS = (1, 1, 2, 3, 5)


def _conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3x3 convolution (zero padding, output size ceil(n / stride)) and LeakyReLU.

    He (Kaiming) initialisation for LeakyReLU keeps the activation scale through the depth; with
    PyTorch's default initialisation and no normalisation, deep features shrink to ~1 % of the
    input scale and the heads learn far more slowly.
    """
    conv = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1)
    nn.init.kaiming_normal_(conv.weight, a=_NEGATIVE_SLOPE, nonlinearity="leaky_relu")
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.LeakyReLU(_NEGATIVE_SLOPE))


def _conv_stack(in_channels: int, channels: Sequence[int]) -> nn.Sequential:
    """Consecutive full-resolution :func:`_conv_block` layers of the given widths."""
    layers = []
    for width in channels:
        layers.append(_conv_block(in_channels, width))
        in_channels = width
    return nn.Sequential(*layers)


def _displacement_head(in_channels: int) -> nn.Conv3d:
    """Final 3x3x3 convolution to 3 channels (mm): small zero-mean weights, zero bias, no activation."""
    conv = nn.Conv3d(in_channels, 3, 3, padding=1)
    nn.init.normal_(conv.weight, mean=0.0, std=_OUTPUT_INIT_STD)
    nn.init.zeros_(conv.bias)
    return conv


class _AffineHead(nn.Module):
    """Position-aware pooling, then a linear layer to 12 values: theta (B, 3, 4) = [I | 0] + [R | t].

    Per feature channel ``f`` it pools the mean of ``f`` and of ``f * x``, ``f * y``, ``f * z``
    (coordinates of the feature map scaled to [-1, 1] along x, y, z): the first moments keep
    where structures are, which a plain global average pool discards, so translations can be
    read off (as the dense layer of Hu et al.'s GlobalNet does, but for any input size).
    ``R`` is dimensionless, ``t`` (mm) is the raw value times ``translation_scale_mm``; the linear
    layer starts at zero, so theta starts exactly at the identity [I | 0].
    """

    def __init__(self, channels: int, translation_scale_mm: float) -> None:
        super().__init__()
        self.linear = nn.Linear(4 * channels, 12)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.translation_scale_mm = translation_scale_mm

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        depth, height, width = features.shape[2:]
        axes = [torch.linspace(-1.0, 1.0, n, dtype=features.dtype, device=features.device) if n > 1
                else features.new_zeros(1) for n in (width, height, depth)]
        x, y, z = axes[0][None, None, :], axes[1][None, :, None], axes[2][:, None, None]
        moments = [features.mean(dim=(2, 3, 4))] + [(features * c).mean(dim=(2, 3, 4)) for c in (x, y, z)]
        raw = self.linear(torch.cat(moments, dim=1)).view(-1, 3, 4)
        scale = raw.new_tensor([1.0, 1.0, 1.0, self.translation_scale_mm])
        return torch.eye(3, 4, dtype=raw.dtype, device=raw.device) + raw * scale


class _RegistrationNetwork(nn.Module):
    """Shared part: the canonical ``grid``, the constructor kwargs ``config`` and input checks."""

    def __init__(self, size: Sequence[int], spacing: Sequence[float], **config: Any) -> None:
        super().__init__()
        self.grid = Grid.canonical(tuple(int(v) for v in size), tuple(float(v) for v in spacing))
        self.config = config

    def check_input(self, inputs: torch.Tensor, channels: int, name: str) -> None:
        """Raise ValueError unless ``inputs`` is (B, channels, Z, Y, X) on ``grid``."""
        expected = (channels, *self.grid.shape)
        if inputs.dim() != 5 or tuple(inputs.shape[1:]) != expected:
            shape = ", ".join(map(str, expected))
            raise ValueError(f"{name} must be (B, {channels}, Z, Y, X) = (B, {shape}) for size (x, y, z) "
                             f"{self.grid.size}; got {tuple(inputs.shape)}")

    @torch.no_grad()
    def register_pair(self, fixed: torch.Tensor, moving: torch.Tensor) -> dict[str, torch.Tensor]:
        """The outputs for one pair (1, 1, Z, Y, X) each, without gradients: "displacement" (1, 3, Z,
        Y, X) in mm and whatever else the network gives (organ maps, saliency), batch size 1.

        On the CPU the pair goes in twice, as a batch of two: for a single small volume PyTorch
        picks its native 3D convolution, for a batch oneDNN's, 2-3x faster for both (same values).
        """
        if fixed.device.type == "cpu":
            fixed, moving = fixed.expand(2, -1, -1, -1, -1), moving.expand(2, -1, -1, -1, -1)
        return {name: value[:1] for name, value in self(fixed, moving).items()}

    def pair(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """Checked (B, 2, Z, Y, X) concatenation: channel 0 fixed, channel 1 moving."""
        self.check_input(fixed, 1, "fixed")
        self.check_input(moving, 1, "moving")
        return torch.cat([fixed, moving], dim=1)


class GlobalNet(_RegistrationNetwork):
    """Affine registration (after Hu et al. 2018): strided conv encoder, moment pooling, linear -> theta.

    ``channels``: width of each level; each level halves the resolution (stride-2 conv) and adds
    one full-resolution conv. theta (B, 3, 4) = [A | t] acts on mm about the grid centre (see
    :func:`affine_displacement`); ``t`` = raw output x ``translation_scale_mm``.
    Outputs: "displacement" (B, 3, Z, Y, X) mm, "theta" (B, 3, 4).
    """

    def __init__(self, size: Sequence[int], spacing: Sequence[float],
                 channels: Sequence[int] = (8, 16, 16, 32), translation_scale_mm: float = 10.0,
                 in_channels: int = 2) -> None:
        super().__init__(size, spacing, channels=[int(c) for c in channels],
                         translation_scale_mm=float(translation_scale_mm), in_channels=int(in_channels))
        levels = []
        previous = self.config["in_channels"]
        for width in self.config["channels"]:
            levels += [_conv_block(previous, width, stride=2), _conv_block(width, width)]
            previous = width
        self.encoder = nn.Sequential(*levels)
        self.affine = _AffineHead(previous, self.config["translation_scale_mm"])

    def predict(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """"displacement" (mm) and "theta" from any (B, in_channels, Z, Y, X) input on ``grid``."""
        self.check_input(inputs, self.config["in_channels"], "inputs")
        theta = self.affine(self.encoder(inputs))
        return {"displacement": affine_displacement(theta, self.grid), "theta": theta}

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.predict(self.pair(fixed, moving))


class LocalNet(_RegistrationNetwork):
    """Dense displacement (mm) from an encoder-decoder (U-Net-like, after Hu et al.'s LocalNet).

    ``channels[0]`` is the full-resolution width; each further entry is one level at half the
    previous resolution (stride-2 conv, ceil(n / 2), so any size works). The decoder upsamples
    (trilinear) to each skip's exact shape and concatenates. The output conv starts with weights
    of std 1e-5 and zero bias, so the initial field is ~0. Output: "displacement".
    """

    def __init__(self, size: Sequence[int], spacing: Sequence[float], in_channels: int = 2,
                 channels: Sequence[int] = (8, 16, 16, 32)) -> None:
        super().__init__(size, spacing, in_channels=int(in_channels), channels=[int(c) for c in channels])
        widths = self.config["channels"]
        self.encoders = nn.ModuleList()
        previous = self.config["in_channels"]
        for level, width in enumerate(widths):
            self.encoders.append(nn.Sequential(_conv_block(previous, width, stride=1 if level == 0 else 2),
                                               _conv_block(width, width)))
            previous = width
        self.decoders = nn.ModuleList(
            _conv_stack(widths[level + 1] + widths[level], (widths[level], widths[level]))
            for level in reversed(range(len(widths) - 1)))
        self.output = _displacement_head(widths[0])

    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        """Displacement (B, 3, Z, Y, X) in mm from any (B, in_channels, Z, Y, X) input on ``grid``."""
        self.check_input(inputs, self.config["in_channels"], "inputs")
        skips = []
        features = inputs
        for encoder in self.encoders:
            features = encoder(features)
            skips.append(features)
        features = skips.pop()
        for decoder in self.decoders:
            skip = skips.pop()
            features = F.interpolate(features, size=skip.shape[2:], mode="trilinear", align_corners=False)
            features = decoder(torch.cat([features, skip], dim=1))
        return self.output(features)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"displacement": self.predict(self.pair(fixed, moving))}


class Segmenter(LocalNet):
    """Probability (B, 1, Z, Y, X) in [0, 1] of one structure (e.g. the prostate gland) in one
    image (B, 1, Z, Y, X): :class:`LocalNet`'s encoder-decoder with a 1x1 convolution and a sigmoid."""

    def __init__(self, size: Sequence[int], spacing: Sequence[float], channels: Sequence[int] = (16, 32, 32, 64)) -> None:
        super().__init__(size, spacing, in_channels=1, channels=channels)
        self.output = nn.Conv3d(self.config["channels"][0], 1, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.sigmoid(self.predict(image))


class GlobalToLocal(_RegistrationNetwork):
    """Global affine, then a saliency-guided local refinement.

    1. :class:`GlobalNet` gives theta and the coarse displacement ``c`` (mm).
    2. ``warped = moving(p + c(p))`` (border padding); saliency = :class:`JointSaliency` of
       (fixed, warped), (B, 1, Z, Y, X) in [0, 1].
    3. A :class:`LocalNet` on [c / coarse_scale_mm, saliency, fixed, warped] (6 channels) predicts
       a residual ``r`` that aligns ``warped`` with ``fixed``: ``warped(p + r(p)) ~ fixed(p)``.
    4. The image is warped by the coarse field, then by the residual, so the fixed -> moving
       point map is ``p -> q + c(q)`` with ``q = p + r(p)``:
       ``displacement = compose(r, c, grid)`` (``r`` first, then ``c``, in point-map order).

    With ``segmentation_channels`` two :class:`Segmenter` branches first map each image to the
    probability of the organ (trained on the labels, which stay loss targets only); GlobalNet then
    reads [fixed, moving, organ in fixed, organ in moving] and LocalNet also the fixed organ and the
    moving organ warped by ``c`` (8 channels). Its moment pooling reads an organ map's position
    directly, which carries over to unseen subjects far better than raw intensities do.

    With ``joint_saliency=False`` step 2 computes no saliency and LocalNet reads [c / coarse_scale_mm,
    fixed, warped] (5 channels, + the 2 organ maps): Hu et al.'s GlobalNet + LocalNet, the baseline
    the saliency is measured against.

    Everything is differentiable: a loss on "displacement" reaches GlobalNet directly through
    ``c`` and through ``warped`` and the saliency. Outputs: "displacement", "coarse" (mm),
    "theta" (B, 3, 4), "saliency" (unless ``joint_saliency=False``), and with segmentation
    "fixed_segmentation" and "moving_segmentation" (B, 1, Z, Y, X) in [0, 1].
    """

    def __init__(self, size: Sequence[int], spacing: Sequence[float],
                 global_channels: Sequence[int] = (8, 16, 16, 32),
                 local_channels: Sequence[int] = (8, 16, 16, 32),
                 translation_scale_mm: float = 10.0, saliency_sigma_mm: float = 1.5,
                 coarse_scale_mm: float = 10.0, segmentation_channels: Sequence[int] = (),
                 joint_saliency: bool = True) -> None:
        super().__init__(size, spacing, global_channels=[int(c) for c in global_channels],
                         local_channels=[int(c) for c in local_channels],
                         translation_scale_mm=float(translation_scale_mm),
                         saliency_sigma_mm=float(saliency_sigma_mm), coarse_scale_mm=float(coarse_scale_mm),
                         segmentation_channels=[int(c) for c in segmentation_channels],
                         joint_saliency=bool(joint_saliency))
        organ = 2 if segmentation_channels else 0
        if organ:
            self.fixed_segmenter = Segmenter(size, spacing, channels=segmentation_channels)
            self.moving_segmenter = Segmenter(size, spacing, channels=segmentation_channels)
        self.global_net = GlobalNet(size, spacing, channels=global_channels,
                                    translation_scale_mm=translation_scale_mm, in_channels=2 + organ)
        self.transformer = SpatialTransformer(self.grid)
        self.saliency = JointSaliency(self.grid.spacing, sigma_mm=saliency_sigma_mm) if joint_saliency else None
        self.local_net = LocalNet(size, spacing, in_channels=5 + int(joint_saliency) + organ, channels=local_channels)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> dict[str, torch.Tensor]:
        images = self.pair(fixed, moving)
        organs: dict[str, torch.Tensor] = {}
        if self.config["segmentation_channels"]:
            organs = {"fixed_segmentation": self.fixed_segmenter(fixed), "moving_segmentation": self.moving_segmenter(moving)}
            images = torch.cat([images, *organs.values()], dim=1)
        coarse_output = self.global_net.predict(images)
        coarse = coarse_output["displacement"]
        warped = self.transformer(moving, coarse, padding_mode="border")
        inputs = [coarse / self.config["coarse_scale_mm"], fixed, warped]
        saliency = {}
        if self.saliency is not None:
            saliency = {"saliency": self.saliency(fixed, warped)}
            inputs.insert(1, saliency["saliency"])
        if organs:
            inputs += [organs["fixed_segmentation"], self.transformer(organs["moving_segmentation"], coarse)]
        residual = self.local_net.predict(torch.cat(inputs, dim=1))
        return {"displacement": compose(residual, coarse, self.grid), "coarse": coarse,
                "theta": coarse_output["theta"], **saliency, **organs}


class RegNet(_RegistrationNetwork):
    """Multi-scale CNN after Sokooti et al. 2017, fully convolutional (dense field for the whole grid).

    A full-resolution pathway (``channels``) sees local detail; a context pathway (same widths)
    runs on the pair average-pooled by 2 for a wider receptive field and is upsampled back
    (trilinear). Both are concatenated, merged by ``merge_channels`` convs and mapped to 3
    channels (mm; output conv std 1e-5, zero bias). Output: "displacement".
    """

    def __init__(self, size: Sequence[int], spacing: Sequence[float], channels: Sequence[int] = (16, 16, 16),
                 merge_channels: Sequence[int] = (16, 16)) -> None:
        super().__init__(size, spacing, channels=[int(c) for c in channels],
                         merge_channels=[int(c) for c in merge_channels])
        self.full_resolution = _conv_stack(2, self.config["channels"])
        self.context = _conv_stack(2, self.config["channels"])
        self.merge = _conv_stack(2 * self.config["channels"][-1], self.config["merge_channels"])
        self.output = _displacement_head(self.config["merge_channels"][-1])

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> dict[str, torch.Tensor]:
        pair = self.pair(fixed, moving)
        local = self.full_resolution(pair)
        context = self.context(F.avg_pool3d(pair, kernel_size=2, ceil_mode=True))
        context = F.interpolate(context, size=pair.shape[2:], mode="trilinear", align_corners=False)
        return {"displacement": self.output(self.merge(torch.cat([local, context], dim=1)))}


class _SqueezeExcitation(nn.Module):
    """Channel re-weighting: global average pool, bottleneck MLP, sigmoid gates (Hu et al. 2018)."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.gates = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(),
                                   nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features * self.gates(features.mean(dim=(2, 3, 4)))[:, :, None, None, None]


def _normalized_block(in_channels: int, out_channels: int, dilation: int = 1) -> nn.Sequential:
    """3x3x3 (dilated) convolution, InstanceNorm3d, LeakyReLU; size preserved."""
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, padding=dilation, dilation=dilation),
                         nn.InstanceNorm3d(out_channels, affine=True), nn.LeakyReLU(_NEGATIVE_SLOPE))


class LinearDeformable(_RegistrationNetwork):
    """Joint affine and deformable registration (Christodoulidis et al. 2018).

    Encoder: five 3x3x3 convs with dilations (1, 1, 2, 3, 5), each ``encoder_channels`` wide with
    InstanceNorm and LeakyReLU; the input pair and all five outputs are concatenated and
    re-weighted by squeeze-and-excitation. From that:

    * affine branch: position-aware pooling (first moments) and linear -> theta (B, 3, 4), exactly [I | 0] at init;
    * gradient branch: ``decoder_channels`` convs (InstanceNorm, LeakyReLU), a last conv (zero
      init) and ``2 * sigmoid``: spatial gradients (B, 3, Z, Y, X) in [0, 2] (voxel spacing of
      consecutive sampling positions along x, y, z), exactly 1 at init. They are integrated by
      :func:`integrate_gradients` into the "deformable" displacement ``d`` (mm), whose sampling
      positions never decrease along each axis.

    As in the paper, the affine map acts on the deformable sampling grid: the fixed -> moving
    point map is ``p -> A(p + d(p))`` (the moving image is transformed by the affine first, then
    by the deformable field), i.e. ``compose(d, affine_displacement(theta, grid), grid)``. The
    affine part is linear, so this is evaluated exactly as ``u_A(p) + A d(p)`` (no interpolation
    or border extension). Outputs: "displacement", "theta", "gradients", "deformable".
    """

    def __init__(self, size: Sequence[int], spacing: Sequence[float], encoder_channels: int = 8,
                 decoder_channels: Sequence[int] = (16, 8), se_reduction: int = 4,
                 translation_scale_mm: float = 10.0) -> None:
        super().__init__(size, spacing, encoder_channels=int(encoder_channels),
                         decoder_channels=[int(c) for c in decoder_channels], se_reduction=int(se_reduction),
                         translation_scale_mm=float(translation_scale_mm))
        width = self.config["encoder_channels"]
        self.encoder = nn.ModuleList(_normalized_block(2 if i == 0 else width, width, dilation)
                                     for i, dilation in enumerate(_DILATIONS))
        merged = 2 + width * len(_DILATIONS)
        self.excitation = _SqueezeExcitation(merged, self.config["se_reduction"])
        self.affine = _AffineHead(merged, self.config["translation_scale_mm"])
        layers = []
        previous = merged
        for channels in self.config["decoder_channels"]:
            layers.append(_normalized_block(previous, channels))
            previous = channels
        last = nn.Conv3d(previous, 3, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.gradient_branch = nn.Sequential(*layers, last)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> dict[str, torch.Tensor]:
        features = [self.pair(fixed, moving)]
        for block in self.encoder:
            features.append(block(features[-1]))
        merged = self.excitation(torch.cat(features, dim=1))
        theta = self.affine(merged)
        gradients = 2.0 * torch.sigmoid(self.gradient_branch(merged))
        deformable = integrate_gradients(gradients, self.grid)
        displacement = (affine_displacement(theta, self.grid)
                        + torch.einsum("bij,bjzyx->bizyx", theta[:, :, :3], deformable))
        return {"displacement": displacement, "theta": theta, "gradients": gradients,
                "deformable": deformable}


ARCHITECTURES: dict[str, type[nn.Module]] = {
    "GlobalNet": GlobalNet,
    "LocalNet": LocalNet,
    "GlobalToLocal": GlobalToLocal,
    "RegNet": RegNet,
    "LinearDeformable": LinearDeformable,
}


def build_network(architecture: str, size: Sequence[int], spacing: Sequence[float],
                  **kwargs: Any) -> nn.Module:
    """The network ``architecture`` (a key of :data:`ARCHITECTURES`) for ``size`` (x, y, z voxels)
    and ``spacing`` (x, y, z mm), with constructor ``kwargs`` (e.g. a saved ``config``)."""
    if architecture not in ARCHITECTURES:
        known = ", ".join(ARCHITECTURES)
        raise ValueError(f"Unknown architecture {architecture!r}; known architectures: {known}")
    return ARCHITECTURES[architecture](size, spacing, **kwargs)
