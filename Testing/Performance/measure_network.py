"""Network latency, batched throughput and peak memory of the shipped models on a device (not a test).

    python Testing/Performance/measure_network.py [--device auto|cpu|cuda] [--models generic,mrus]
        [--batches 1,8,32] [--repeats 20] [--variants fp32,bf16,channels_last,compile] [--out FILE.json]

Inputs are a real pair, not noise: a 128^3, 1 mm phantom pair (ultrasound-like moving image) prepared
exactly as ``register`` prepares it for each model's grid. Per model and variant: median seconds of
one forward pass at batch 1 (latency), pairs per second at each batch size (throughput), peak device
memory (CUDA: ``max_memory_allocated``; CPU: the process's peak resident set), and the largest
difference of the displacement (mm) from fp32 on the same inputs, so a faster variant is only
reported together with its numerical cost. ``register`` end to end (0 and the card's fine-tuning
iterations) on the same pair and device is timed too. CUDA timings synchronise before reading the clock.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import SimpleITK as sitk
import torch

from DeepRegisterLib import registration
from DeepRegisterLib.imageio import center_alignment
from DeepRegisterLib.models import find_model, load_model, read_card
from DeepRegisterLib.synthetic import make_phantom_pair

VARIANTS = ("fp32", "bf16", "channels_last", "compile")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(call: Callable[[], object], device: torch.device, repeats: int) -> float:
    call()  # warm-up (allocations, cuDNN autotuning, compilation)
    seconds = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        call()
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _set_memory_format(network: torch.nn.Module, memory_format: torch.memory_format) -> None:
    """Lay out every 5D parameter (the 3D convolution weights) in ``memory_format``."""
    for parameter in network.parameters():
        if parameter.dim() == 5:
            parameter.data = parameter.data.contiguous(memory_format=memory_format)


def model_inputs(model: str, fixed: sitk.Image, moving: sitk.Image, device: torch.device
                 ) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The model (eval mode) and the pair on its grid, as ``register`` prepares them: (1, 1, Z, Y, X) each."""
    card, network = load_model(model, device)
    inputs = registration.PairInputs.prepare(fixed, moving, card, center_alignment(fixed, moving))
    fixed_t, moving_t = inputs.on(registration.model_grid(fixed, card), device)
    return network.eval(), fixed_t, moving_t


def measure_model(model: str, fixed: sitk.Image, moving: sitk.Image, device: torch.device,
                  batches: list[int], repeats: int, variants: list[str]) -> dict:
    """Latency, throughput, memory and fp32 difference of each variant of one model."""
    network, fixed_t, moving_t = model_inputs(model, fixed, moving, device)
    with torch.no_grad():
        reference = network(fixed_t, moving_t)["displacement"].float()
    results = {"grid_voxels": list(fixed_t.shape[2:][::-1]), "variants": {}}
    for variant in variants:
        if variant not in VARIANTS:
            raise ValueError(f"Unknown variant '{variant}': use {', '.join(VARIANTS)}.")
        if variant == "bf16" and device.type == "cpu" and not torch.backends.mkldnn.is_available():
            continue
        net = network
        memory_format = torch.channels_last_3d if variant == "channels_last" else torch.contiguous_format
        if variant == "channels_last":
            _set_memory_format(network, memory_format)
        started = time.perf_counter()
        if variant == "compile":
            net = torch.compile(network)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if variant == "bf16" else nullcontext()

        def forward(batch: int) -> torch.Tensor:
            f = fixed_t.expand(batch, -1, -1, -1, -1).contiguous(memory_format=memory_format)
            m = moving_t.expand(batch, -1, -1, -1, -1).contiguous(memory_format=memory_format)
            with torch.no_grad(), autocast:
                return net(f, m)["displacement"]

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        output = forward(1).float()
        first_call = time.perf_counter() - started
        row = {"first_call_s": round(first_call, 4),
               "latency_ms": round(1000 * _median_seconds(lambda: forward(1), device, repeats), 3),
               "max_difference_from_fp32_mm": round(float((output - reference).abs().max()), 6),
               "pairs_per_second": {}}
        for batch in batches:
            seconds = _median_seconds(lambda: forward(batch), device, max(3, repeats // 4))
            row["pairs_per_second"][str(batch)] = round(batch / seconds, 1)
        row["peak_memory_mb"] = round(_peak_memory_mb(device), 1)
        results["variants"][variant] = row
        if variant == "channels_last":
            _set_memory_format(network, torch.contiguous_format)
    return results


def measure_register(model: str, fixed: sitk.Image, moving: sitk.Image, device: torch.device) -> dict:
    """Seconds per stage of ``register`` (second call, after a warm-up) at 0 and the card's iterations."""
    card = read_card(find_model(model))
    rows = {}
    for iterations in (0, card.finetune_iterations):
        registration.register(fixed, moving, model, str(device), iterations)
        result = registration.register(fixed, moving, model, str(device), iterations)
        rows[str(iterations)] = {k: round(v, 4) for k, v in result.timings.items()}
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", default="generic,mrus")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--variants", default="fp32,bf16,channels_last")
    parser.add_argument("--size", type=int, default=128, help="voxels per side of the 1 mm phantom pair")
    parser.add_argument("--out", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    device = registration.resolve_device(args.device)
    pair = make_phantom_pair(21, (args.size,) * 3, spacing=1.0, max_mm=10.0, ultrasound=True)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "pair_voxels": args.size, "models": {}}
    for model in args.models.split(","):
        report["models"][model] = measure_model(model, pair.fixed, pair.moving, device,
                                                [int(b) for b in args.batches.split(",")], args.repeats,
                                                args.variants.split(","))
        report["models"][model]["register_seconds"] = measure_register(model, pair.fixed, pair.moving, device)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
