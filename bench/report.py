"""From the raw measurements to the report: medians, spreads, ratios to native, targets, charts.

Every figure is the median over rounds with its min–max spread. "x native" is the speed relative to
native whatever the unit: value / native for rates, native / value for times, so 1.00 is native speed
and 0.50 half of it.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .workloads import FULL, STEPS, Step

STEP_BY_ID = {s.id: s for s in STEPS}
CONFIG_ORDER = ["native", "fusepass-pt", "fusepass-served", "passthrough_hp", "pyfuse3", "mfusepy"]
FAMILIES = {
    "sequential": "Sequential I/O, fio bs=1M (MiB/s, higher is better)",
    "random": "Random 4 KiB reads, fio psync (IOPS, higher is better)",
    "metadata": "Metadata (files per second, higher is better)",
    "trees": "Trees of small files (seconds, lower is better)",
    "coherence": "Change visibility, and server CPU under unrelated writes (ms, lower is better)",
}
DATA_STEPS = ["seqread", "seqwrite", "randread1", "randread2"]
META_STEPS = ["meta-create", "meta-stat", "meta-list", "meta-delete", "tar", "untar", "compileall", "rmrf"]
REFERENCE = "passthrough_hp"  # issue 11 compares fusepass with it
CPU_BOUND = {"compileall"}  # the interpreter's own work dominates: "faster" is the target, not 1.5x


@dataclass(frozen=True)
class Figure:
    median: float
    low: float
    high: float
    values: tuple[float, ...]


def summarize(measurements: Sequence[dict[str, Any]]) -> dict[tuple[str, str], Figure]:
    """(step, config) -> the figure over every successful round."""
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for m in measurements:
        if m.get("value") is not None:
            values[(m["step"], m["config"])].append(float(m["value"]))
    return {k: Figure(statistics.median(v), min(v), max(v), tuple(v)) for k, v in values.items()}


def speed_ratio(step: Step, a: Figure | None, b: Figure | None) -> float | None:
    """How many times faster ``a`` is than ``b`` on this step (None if either is missing)."""
    if a is None or b is None or not a.median or not b.median:
        return None
    return a.median / b.median if step.higher_better else b.median / a.median


def fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def markdown(raw: dict[str, Any]) -> str:
    figures = summarize(raw["measurements"])
    configs = [c for c in CONFIG_ORDER if c in raw["configs"]]
    steps = [STEP_BY_ID[s] for s in raw["steps"]]
    meta = raw["meta"]
    out = [f"# fusepass benchmark, {meta['date']}", ""]
    out += [f"- **Command:** `{meta['command']}`",
            f"- **Machine:** {meta['machine']}",
            f"- **Load:** {meta['load_note']}",
            f"- **fusepass:** {meta['fusepass']}; peers: {meta['peers']}",
            f"- **Rounds:** {raw['params']['rounds']}, configurations interleaved (order rotated each round); "
            f"took {meta.get('duration_min', 0):.1f} min",
            "- **Cache:** warm for every configuration: the inputs are read natively before each configuration "
            "is mounted and nothing drops caches; dirty data is synced (untimed) before each configuration's round; "
            "writes go to the page cache without fsync.",
            "- **Cells:** median (min–max over rounds) and, after the ×, speed relative to native "
            "(1.00 = native; for times, native time / time).", ""]
    if quick(raw):
        out += ["**Quick mode: a smoke test.** Sizes are a fraction of a full run's, so the figures are not "
                "comparable with one, and the targets are not judged.", ""]
    out += ["## Configurations", ""]
    for c in configs:
        out.append(f"- `{c}`: {raw['configs'][c]['label']}" + _facts(raw["configs"][c]))
    out += ["", "## Workloads", ""]
    for name, text in raw["workload_notes"].items():
        out.append(f"- `{name}`: {text}")
    out += ["", "## Results", ""]
    out.append("| workload | unit | " + " | ".join(configs) + " |")
    out.append("|---|---|" + "---|" * len(configs))
    for step in steps:
        native = figures.get((step.id, "native"))
        cells = []
        for c in configs:
            f = figures.get((step.id, c))
            if f is None:
                error = _failed(raw, step.id, c)
                cells.append("never" if error.startswith("never visible") else "failed" if error else "–")
                continue
            cell = f"**{fmt(f.median)}** ({fmt(f.low)}–{fmt(f.high)})"
            if c != "native":
                r = speed_ratio(step, f, native)
                cell += f" ×{r:.2f}" if r is not None else ""
            cells.append(cell)
        out.append(f"| {step.id}: {step.label} | {step.unit} | " + " | ".join(cells) + " |")
    out += ["", *targets_table(raw, figures), ""]
    out += reference_targets(raw, figures)
    out += coherence_section(raw)
    charts = raw.get("charts", [])
    if charts:
        out += ["## Charts", "", "Bars are medians, whiskers the min–max over rounds.", ""]
        out += [f"![{name}]({name})" for name in charts]
        out.append("")
    out += requests_section(raw)
    problems = [m for m in raw["measurements"] if m.get("error")] + raw.get("errors", [])
    if problems:
        out += ["## Errors and skipped measurements", ""]
        for p in problems:
            where = " ".join(str(p[k]) for k in ("config", "step", "round") if p.get(k) is not None)
            out.append(f"- {where}: {p['error']}" if where else f"- {p['error']}")
        out.append("")
    return "\n".join(out)


def _facts(conf: dict[str, Any]) -> str:
    facts = conf.get("facts") or {}
    bits = []
    if facts.get("threads"):
        bits.append(f"{facts['threads']} threads")
    if facts.get("passthrough_negotiated") is not None:
        bits.append("passthrough negotiated" if facts["passthrough_negotiated"]
                    else f"passthrough off ({facts.get('why_not')})")
    if conf.get("unavailable"):
        bits.append(f"NOT RUN: {conf['unavailable']}")
    return f" ({'; '.join(bits)})" if bits else ""


def _failed(raw: dict[str, Any], step: str, config: str) -> str:
    """The error of a failed measurement of ``step`` on ``config`` ("" if none failed)."""
    return next((m["error"] for m in raw["measurements"]
                 if m["step"] == step and m["config"] == config and m.get("error")), "")


def quick(raw: dict[str, Any]) -> bool:
    """Whether the run used smaller sizes than a full run (``--quick``)."""
    return any(raw["params"][k] != v for k, v in vars(FULL).items() if k != "rounds")


def targets_table(raw: dict[str, Any], figures: dict[tuple[str, str], Figure]) -> list[str]:
    """Issue 6's targets against this run's medians (not judged in quick mode)."""
    rows = []
    judged = not quick(raw)

    def row(target: str, ratio: float | None, need: float, shown: str = "") -> None:
        verdict = ("not judged (quick mode)" if not judged else "n/a" if ratio is None
                   else "met" if ratio >= need else "missed")
        rows.append(f"| {target} | {shown or ('×' + fmt(ratio) if ratio is not None else '–')} | ×{need:g} | "
                    f"{verdict} |")

    for sid in DATA_STEPS:
        if sid in raw["steps"]:
            step = STEP_BY_ID[sid]
            row(f"passthrough vs native: {sid}", speed_ratio(step, figures.get((sid, "fusepass-pt")),
                                                              figures.get((sid, "native"))), 0.95)
    for sid in DATA_STEPS:
        if sid in raw["steps"]:
            step = STEP_BY_ID[sid]
            row(f"served vs pyfuse3: {sid}", speed_ratio(step, figures.get((sid, "fusepass-served")),
                                                          figures.get((sid, "pyfuse3"))), 1.5)
    for sid in META_STEPS:
        if sid not in raw["steps"]:
            continue
        step = STEP_BY_ID[sid]
        need = 1.0 if sid in CPU_BOUND else 1.5
        for cfg in ("fusepass-pt", "fusepass-served"):
            ratios = [speed_ratio(step, figures.get((sid, cfg)), figures.get((sid, peer)))
                      for peer in ("pyfuse3", "mfusepy")]
            known = [r for r in ratios if r is not None]
            worst = min(known) if known else None
            shown = " / ".join("–" if r is None else f"×{fmt(r)}" for r in ratios)
            row(f"{cfg} vs pyfuse3 / mfusepy: {sid}", worst, need, shown)
    if not rows:
        return []
    return ["## Targets (issue 6)", "",
            "Ratios are speed ratios of medians (>1: the first is faster). Metadata rows must beat both peers; "
            "×1.5 where the filesystem's work dominates, merely faster for compileall (CPU-bound).", "",
            "| target | figure | needed | verdict |", "|---|---|---|---|", *rows]


def reference_targets(raw: dict[str, Any], figures: dict[tuple[str, str], Figure]) -> list[str]:
    """Issue 11's targets: fusepass (passthrough) against libfuse's passthrough_hp, and its own figures."""
    if REFERENCE not in raw["configs"] and "fusepass-pt" not in raw["configs"]:
        return []
    rows = []
    for sid in raw["steps"]:
        step = STEP_BY_ID[sid]
        if step.family == "coherence":
            continue
        need = 0.97 if sid in DATA_STEPS else 1.2 if sid in ("meta-create", "untar") else 1.0
        ratio = speed_ratio(step, figures.get((sid, "fusepass-pt")), figures.get((sid, REFERENCE)))
        verdict = "n/a" if ratio is None else ("met" if ratio >= need else "missed")
        rows.append(f"| fusepass-pt vs {REFERENCE}: {sid} | {'×' + fmt(ratio) if ratio else '–'} | ×{need:g} | "
                    f"{verdict} |")
    p99s = [m["extra"]["p99_ms"] for m in raw["measurements"] if m["config"] == "fusepass-pt"
            and m["step"] == "visibility" and m.get("value") is not None]
    if "visibility" in raw["steps"]:
        worst = max(p99s) if p99s else None
        verdict = "n/a" if worst is None else ("met" if worst < 50 else "missed")
        rows.append(f"| fusepass-pt: p99 of a source change's visibility (worst round) | "
                    f"{fmt(worst) + ' ms' if worst is not None else 'never'} | < 50 ms | "
                    f"{verdict if p99s or not _failed(raw, 'visibility', 'fusepass-pt') else 'missed'} |")
    per_file = getxattr_per_file(raw, "fusepass-pt")
    if per_file is not None:
        rows.append(f"| fusepass-pt: GETXATTR per written file (untar) | {per_file:.2f} | ≤ 1 | "
                    f"{'met' if per_file <= 1 else 'missed'} |")
    if not rows:
        return []
    return ["## Targets (issue 11)", "",
            f"Speed ratios of medians, fusepass with passthrough against {REFERENCE} (>1: fusepass is faster).", "",
            "| target | figure | needed | verdict |", "|---|---|---|---|", *rows, ""]


def getxattr_per_file(raw: dict[str, Any], config: str) -> float | None:
    """GETXATTR requests per file the untar step wrote, averaged over rounds (None without counts)."""
    counts = [m["requests"].get("GETXATTR", {}).get("count", 0) for m in raw["measurements"]
              if m["config"] == config and m["step"] == "untar" and m.get("requests") is not None
              and m.get("value") is not None]
    files = raw.get("data", {}).get("tree_files") or raw["params"]["tree_files"]
    return statistics.mean(counts) / files if counts and files else None


def coherence_section(raw: dict[str, Any]) -> list[str]:
    """Per configuration and round: the visibility percentiles and misses, the churn writer's time."""
    rows = []
    for m in raw["measurements"]:
        extra = m.get("extra") or {}
        if m["step"] == "visibility" and "changes" in extra:
            rows.append(f"| {m['config']} | {m['round']} | visibility | median {fmt(extra.get('p50_ms'))} ms, "
                        f"p99 {fmt(extra.get('p99_ms'))} ms, max {fmt(extra.get('max_ms'))} ms over "
                        f"{extra['changes'] - extra['misses']:,} changes seen; {extra['misses']} not seen |")
        elif m["step"] == "churn-cpu" and "writer_s" in extra:
            rows.append(f"| {m['config']} | {m['round']} | churn | server CPU {fmt(m.get('value'))} ms while the "
                        f"writer made {extra['files']:,} files in {extra['writer_s']:.2f} s "
                        f"(its own CPU {extra['writer_cpu_s']:.2f} s) |")
    if not rows:
        return []
    return ["## Coherence details", "", "| config | round | workload | figures |", "|---|---|---|---|", *rows, ""]


def requests_section(raw: dict[str, Any]) -> list[str]:
    """Per fusepass configuration and step: FUSE requests per run, their mean latency, share of server time."""
    per: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0, 0.0]))
    walls: dict[tuple[str, str], list[float]] = defaultdict(list)
    for m in raw["measurements"]:
        if m.get("requests") is None or m.get("value") is None:
            continue
        key = (m["config"], m["step"])
        walls[key].append(m["wall_s"])
        for op, r in m["requests"].items():
            acc = per[key][op]
            acc[0] += r["count"]
            acc[1] += r["total_ms"]
            acc[2] += r["errors"]
    if not per:
        return []
    out = ["## fusepass requests per workload", "",
           "From `fusepass status --json` before and after each step, averaged over rounds: requests per run, "
           "server time (sum of per-request handling time, all workers) against the step's wall time, and the "
           "opcodes taking the most server time (count per run × mean µs, share of server time).", ""]
    for cfg in ("fusepass-pt", "fusepass-served"):
        keys = [k for k in per if k[0] == cfg]
        if not keys:
            continue
        out += [f"### {cfg}", "", "| step | wall s | requests | server ms | top opcodes |", "|---|---|---|---|---|"]
        for sid in raw["steps"]:
            key = (cfg, sid)
            if key not in per:
                continue
            n = len(walls[key])
            ops = per[key]
            total_ms = sum(v[1] for v in ops.values()) / n
            count = sum(v[0] for v in ops.values()) / n
            top = sorted(ops.items(), key=lambda kv: -kv[1][1])[:5]
            parts = []
            for op, (c, ms, errs) in top:
                mean_us = ms * 1000 / c if c else 0.0
                share = (ms / n) / total_ms * 100 if total_ms else 0.0
                err = f", {errs / n:,.0f} errors" if errs else ""
                parts.append(f"{op} {c / n:,.0f}×{mean_us:.0f}µs ({share:.0f}%{err})")
            wall = statistics.median(walls[key])
            out.append(f"| {sid} | {wall:.2f} | {count:,.0f} | {total_ms:,.0f} | {'; '.join(parts)} |")
        out.append("")
    return out


def charts(raw: dict[str, Any], outdir: Path) -> tuple[list[str], str | None]:
    """One PNG per workload family; returns the file names, and an error if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return [], f"no charts: matplotlib is not available ({e})"
    figures = summarize(raw["measurements"])
    configs = [c for c in CONFIG_ORDER if c in raw["configs"]]
    colours = dict(zip(CONFIG_ORDER, ("#555555", "#1f77b4", "#6baed6", "#d62728", "#ff7f0e", "#2ca02c"), strict=True))
    names = []
    for family, title in FAMILIES.items():
        steps = [STEP_BY_ID[s] for s in raw["steps"] if STEP_BY_ID[s].family == family]
        present = [c for c in configs if any((s.id, c) in figures for s in steps)]
        if not steps or not present:
            continue
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(steps) * len(present) / 2.5), 4.5))
        width = 0.8 / len(present)
        all_values = []
        for i, c in enumerate(present):
            xs, heights, lo, hi = [], [], [], []
            for j, s in enumerate(steps):
                f = figures.get((s.id, c))
                if f is None:
                    continue
                xs.append(j + (i - (len(present) - 1) / 2) * width)
                heights.append(f.median)
                lo.append(f.median - f.low)
                hi.append(f.high - f.median)
                all_values += [f.low, f.high]
            ax.bar(xs, heights, width, yerr=[lo, hi], capsize=3, label=c, color=colours.get(c))
        positive = [v for v in all_values if v > 0]
        if positive and max(positive) / min(positive) > 30:
            ax.set_yscale("log")
        ax.set_xticks(range(len(steps)), [s.id for s in steps])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        name = f"{family}.png"
        fig.savefig(outdir / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names, None
