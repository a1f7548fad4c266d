"""The benchmark report: a Markdown table with the goals checked, and PNG plots.

Input: the rows of :func:`DeepRegisterLib.tools.benchmark.run_benchmark` (one per run). Per pair and
method the seconds are the median over repeats; accuracy comes from the first repeat (all
methods here are deterministic for a given input). Per pair kind and method the table gives the
median and 90th percentile of TRE over all landmarks, the median Dice, the largest folding, the
median and 90th percentile of seconds per pair and the median peak memory.

Pairs with a ``split`` (the generalisation suite, Testing/Performance/make_generalisation_pairs.py)
get one more table per split (test first): per family and method, the median over pairs of the
per-pair median TRE, the median Dice, the largest folding, the median seconds and elastix's median
seconds over the method's (x faster than elastix), with a line naming the families whose dev
pairs settings were tuned on (``tuned_on``; none by default).
"""

from __future__ import annotations

import os
import platform
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

REFERENCE = "centres aligned"
BASELINE = "elastix"


def per_pair(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """(pair, method) -> first successful row, with ``seconds`` replaced by the median over repeats."""
    grouped: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("status") == "ok":
            grouped[(row["pair"], row["method"])].append(row)
    return {key: {**runs[0], "seconds": float(np.median([r["seconds"] for r in runs]))}
            for key, runs in grouped.items()}


def _stat(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(rows: list[dict]) -> list[dict]:
    """One summary per (kind, method), in first-seen order."""
    pairs = per_pair(rows)
    order: list[tuple[str, str]] = []
    failures: dict[tuple[str, str], int] = defaultdict(int)
    for row in rows:
        key = (row["kind"], row["method"])
        if key not in order:
            order.append(key)
        if row.get("status") != "ok":
            failures[key] += 1
    summaries = []
    for kind, method in order:
        runs = [r for (pair, m), r in pairs.items() if m == method and r["kind"] == kind]
        seconds = [r["seconds"] for r in runs]
        tre_values = [r["tre_median_mm"] for r in runs if "tre_median_mm" in r]
        summaries.append({
            "kind": kind, "method": method, "pairs": len(runs), "failed": failures[(kind, method)],
            "tre_median_mm": _stat(tre_values, 50), "tre_p90_mm": _stat(tre_values, 90),
            "dice_median": _stat([r["dice_mean"] for r in runs if "dice_mean" in r], 50),
            "folding_max_percent": max((r["folding_percent"] for r in runs), default=float("nan")),
            "seconds_median": _stat(seconds, 50), "seconds_p90": _stat(seconds, 90),
            "peak_rss_mb_median": _stat([r["peak_rss_mb"] for r in runs if r.get("peak_rss_mb") is not None], 50),
        })
    return summaries


def _format(value: float, digits: int = 2) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def scaling_exponent(rows: list[dict], method: str) -> float:
    """Slope of log(seconds) against log(voxels) over the ``size-*`` pairs of ``method`` (1 = linear)."""
    runs = [r for (pair, m), r in per_pair(rows).items() if m == method and r["kind"].startswith("size-")]
    if len({r["voxels"] for r in runs}) < 2:
        return float("nan")
    return float(np.polyfit(np.log([r["voxels"] for r in runs]), np.log([r["seconds"] for r in runs]), 1)[0])


def goals(rows: list[dict], summaries: list[dict]) -> list[str]:
    """The issue's goals, checked for every DeepRegister configuration against elastix."""
    lines = []
    by_key = {(s["kind"], s["method"]): s for s in summaries}
    methods = [s["method"] for s in summaries if s["method"].startswith("deepregister")]
    for method in dict.fromkeys(methods):
        for kind in dict.fromkeys(s["kind"] for s in summaries):
            ours, theirs = by_key.get((kind, method)), by_key.get((kind, BASELINE))
            if not ours or not theirs or not ours["pairs"] or not theirs["pairs"]:
                continue
            speedup = theirs["seconds_median"] / ours["seconds_median"]
            accurate = ours["tre_median_mm"] <= theirs["tre_median_mm"]
            verdict = "met" if speedup >= 10 and accurate else "NOT met"
            lines.append(f"- {method} on {kind}: {speedup:.1f}x faster than elastix, median TRE "
                         f"{_format(ours['tre_median_mm'])} vs {_format(theirs['tre_median_mm'])} mm: goal {verdict}")
        big = [r for (pair, m), r in per_pair(rows).items() if m == method and 1.5e6 <= r["voxels"] <= 2.6e6]
        if big and all(r.get("peak_rss_mb") is not None for r in big):
            peak = max(r["peak_rss_mb"] for r in big)
            lines.append(f"- {method}: peak memory for a 128^3 pair {peak:.0f} MB (goal <= 2048 MB): "
                         f"{'met' if peak <= 2048 else 'NOT met'}")
        exponent = scaling_exponent(rows, method)
        if np.isfinite(exponent):
            lines.append(f"- {method}: seconds grow as voxels^{exponent:.2f} over the size pairs "
                         f"(goal <= 1): {'met' if exponent <= 1.05 else 'NOT met'}")
    return lines


def summarize_splits(rows: list[dict]) -> list[dict]:
    """One summary per (split, family, method) over the rows that have a split, in first-seen order
    of families and methods, test before dev."""
    pairs = per_pair(rows)
    split_rows = [r for r in rows if r.get("split")]
    families = list(dict.fromkeys(r.get("family") or r["kind"] for r in split_rows))
    methods = list(dict.fromkeys(r["method"] for r in split_rows))
    splits = sorted({r["split"] for r in split_rows}, key=lambda s: (s != "test", s))
    failures: dict[tuple[str, str, str], int] = defaultdict(int)
    for row in split_rows:
        if row.get("status") != "ok":
            failures[(row["split"], row.get("family") or row["kind"], row["method"])] += 1
    summaries = []
    for split in splits:
        for family in families:
            for method in methods:
                runs = [r for (pair, m), r in pairs.items() if m == method and r.get("split") == split
                        and (r.get("family") or r["kind"]) == family]
                failed = failures[(split, family, method)]
                if not runs and not failed:
                    continue
                summaries.append({
                    "split": split, "family": family, "method": method, "pairs": len(runs), "failed": failed,
                    "tre_median_mm": _stat([r["tre_median_mm"] for r in runs if "tre_median_mm" in r], 50),
                    "dice_median": _stat([r["dice_mean"] for r in runs if "dice_mean" in r], 50),
                    "folding_max_percent": max((r["folding_percent"] for r in runs), default=float("nan")),
                    "seconds_median": _stat([r["seconds"] for r in runs], 50),
                })
    return summaries


def split_tables(rows: list[dict], tuned_on: list[str] | None = None) -> list[str]:
    """Markdown: the per-family tables of :func:`summarize_splits` (empty without split rows)."""
    summaries = summarize_splits(rows)
    if not summaries:
        return []
    tuned_on = list(tuned_on or [])
    families = list(dict.fromkeys(s["family"] for s in summaries))
    tuned_line = (f"Settings were tuned on the dev pairs of: {', '.join(tuned_on)} (marked *); the other families "
                  "were not used to choose any setting." if tuned_on else
                  f"Settings were tuned on none of these families ({', '.join(families)}): every family here is "
                  "held out from tuning.")
    header = ["family", "method", "pairs", "median TRE (mm)", "median Dice", "max folding (%)", "median s/pair",
              "x faster than elastix"]
    lines = ["", "## Generalisation suite: per family and split", "",
             "TRE: the median over pairs of each pair's median landmark error; seconds: median over pairs; "
             "x faster than elastix: elastix's median seconds on the family's pairs of that split divided by "
             "the method's.", tuned_line]
    for split in dict.fromkeys(s["split"] for s in summaries):
        lines += ["", f"### {split} split", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        elastix = {s["family"]: s["seconds_median"] for s in summaries
                   if s["split"] == split and s["method"] == BASELINE}
        for s in (s for s in summaries if s["split"] == split):
            reference = s["method"] == REFERENCE
            ratio = float("nan") if reference or not s["seconds_median"] else \
                elastix.get(s["family"], float("nan")) / s["seconds_median"]
            pairs = f"{s['pairs']}" + (f" ({s['failed']} failed)" if s["failed"] else "")
            lines.append("| " + " | ".join([
                s["family"] + (" *" if s["family"] in tuned_on else ""), s["method"], pairs,
                _format(s["tre_median_mm"]), _format(s["dice_median"], 3), _format(s["folding_max_percent"], 3),
                "-" if reference else _format(s["seconds_median"]), _format(ratio, 1)]) + " |")
    return lines


def write_markdown(rows: list[dict], summaries: list[dict], path: Path, threads: int, repeats: int,
                   timing: str = "steady", busy_cores: int = 0, tuned_on: list[str] | None = None) -> None:
    header = ["kind", "method", "pairs", "median TRE (mm)", "p90 TRE (mm)", "median Dice",
              "max folding (%)", "median s/pair", "p90 s/pair", "x faster than elastix", "median peak RSS (MB)"]
    elastix = {s["kind"]: s["seconds_median"] for s in summaries if s["method"] == BASELINE}
    timed = ("seconds = the whole fresh process of each method from start to exit (imports, file reading and "
             "writing included, no warm-up)" if timing == "process" else
             "seconds = the registration call alone, after a warm-up in the same process")
    lines = ["# DeepRegister benchmark", "",
             f"Machine: {platform.processor() or platform.machine()}, {platform.system()} {platform.release()}, "
             f"{os.cpu_count()} CPUs; {threads} CPU threads per registration; {repeats} repeat(s), seconds = median "
             "over repeats.",
             f"Timing: {timing}: {timed}.",
             f"Other load: {busy_cores} core(s) kept busy by a CPU-burning process during every timed run."
             if busy_cores else "Other load: none started by the benchmark.",
             "TRE: per pair the median over its landmarks; columns give the median and 90th percentile of "
             "those per-pair medians.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        ratio = (elastix.get(s["kind"], float("nan")) / s["seconds_median"]
                 if s["method"] != REFERENCE and s["seconds_median"] else float("nan"))
        pairs = f"{s['pairs']}" + (f" ({s['failed']} failed)" if s["failed"] else "")
        lines.append("| " + " | ".join([
            s["kind"], s["method"], pairs, _format(s["tre_median_mm"]), _format(s["tre_p90_mm"]),
            _format(s["dice_median"], 3), _format(s["folding_max_percent"], 3),
            _format(s["seconds_median"]) if s["method"] != REFERENCE else "-", _format(s["seconds_p90"])
            if s["method"] != REFERENCE else "-", _format(ratio, 1), _format(s["peak_rss_mb_median"], 0)]) + " |")
    failed = [r for r in rows if r.get("status") != "ok"]
    lines += split_tables(rows, tuned_on)
    lines += ["", "## Goals", "", *(goals(rows, summaries) or ["- (no DeepRegister and elastix rows to compare)"])]
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- {r['pair']} {r['method']}: {r.get('error', '')}" for r in failed]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _methods(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows))


def plot_tre(rows: list[dict], path: Path) -> None:
    """Box plots of per-pair median TRE per method, one panel per pair kind."""
    pairs = per_pair(rows)
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    methods = _methods(rows)
    figure, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 4.5), squeeze=False)
    for axis, kind in zip(axes[0], kinds):
        data = [[r["tre_median_mm"] for (p, m), r in pairs.items() if m == method and r["kind"] == kind
                 and "tre_median_mm" in r] for method in methods]
        axis.boxplot([d if d else [np.nan] for d in data], tick_labels=methods)
        axis.set_title(kind)
        axis.set_ylabel("median TRE per pair (mm)")
        axis.tick_params(axis="x", rotation=70, labelsize=7)
        axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_seconds(rows: list[dict], path: Path) -> None:
    """Seconds per pair (log scale) per method, every pair a dot."""
    pairs = per_pair(rows)
    methods = [m for m in _methods(rows) if m != REFERENCE]
    figure, axis = plt.subplots(figsize=(max(6.0, 1.1 * len(methods)), 4.5))
    for index, method in enumerate(methods):
        seconds = [r["seconds"] for (p, m), r in pairs.items() if m == method]
        axis.scatter(np.full(len(seconds), index) + np.linspace(-0.2, 0.2, len(seconds)), seconds, s=12)
    axis.set_xticks(range(len(methods)), methods, rotation=70, fontsize=7)
    axis.set_yscale("log")
    axis.set_ylabel("seconds per pair (log)")
    axis.grid(axis="y", which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_scaling(rows: list[dict], path: Path) -> None:
    """Seconds and peak memory against the number of fixed voxels, over the ``size-*`` pairs."""
    pairs = per_pair(rows)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    sizes: set[int] = set()
    for method in [m for m in _methods(rows) if m != REFERENCE]:
        runs = sorted((r for (p, m), r in pairs.items() if m == method and r["kind"].startswith("size-")),
                      key=lambda r: r["voxels"])
        if not runs:
            continue
        voxels = [r["voxels"] for r in runs]
        sizes.update(voxels)
        left.plot(voxels, [r["seconds"] for r in runs], "o-", label=method)
        right.plot(voxels, [r.get("peak_rss_mb") or np.nan for r in runs], "o-", label=method)
    for axis, label in ((left, "seconds per pair"), (right, "peak RSS (MB)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xticks(sorted(sizes), [f"{v:,}\n({round(v ** (1 / 3))}^3)" for v in sorted(sizes)])
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_xlabel("fixed image voxels")
        axis.set_ylabel(label)
        axis.grid(which="both", alpha=0.3)
    if sizes:
        left.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(rows: list[dict], out: Path, threads: int, repeats: int, timing: str = "steady",
                 busy_cores: int = 0, tuned_on: list[str] | None = None) -> None:
    """report.md, tre.png, seconds.png and scaling.png in ``out``."""
    summaries = summarize(rows)
    write_markdown(rows, summaries, out / "report.md", threads, repeats, timing, busy_cores, tuned_on)
    plot_tre(rows, out / "tre.png")
    plot_seconds(rows, out / "seconds.png")
    plot_scaling(rows, out / "scaling.png")
