"""What the seeded benchmark writes: results.json (everything), results.md (three tables), curves.png.

    paths = write_report(records, summarize(records, source, targets), out_dir, meta)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

__all__ = ["format_tables", "plot_curves", "write_report", "machine_info"]


def _num(value: float, digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _pm(cell: dict) -> str:
    return _num(cell["mean"]) + ("" if math.isnan(cell["sd"]) else f" ± {_num(cell['sd'])}")


def _interval(diff: dict) -> str:
    if math.isnan(diff["half"]):
        return f"{_num(diff['mean'], 2)} (n/a: {diff['n']} seed{'s' if diff['n'] != 1 else ''})"
    return f"{diff['mean']:+.2f} [{diff['low']:+.2f}, {diff['high']:+.2f}]"


def format_tables(summary: dict) -> str:
    """The Markdown of results.md's three tables (mean ± sd; paired differences; claims)."""
    source, targets = summary["source"], summary["targets"]
    unseen = summary.get("unseen") or []  # the looks no pretraining image has: after the target mean
    unseen_quantities = [*unseen, "unseen"] if unseen else []
    pct = round(100 * summary["confidence"])
    lines = _precondition_lines(summary.get("preconditions") or {})
    head = ["method", "seeds", "trainable backbone params", f"{source} (source)", *targets, "mean (targets)",
            *(f"{u} (unseen)" for u in unseen), *(["mean (unseen)"] if unseen else [])]
    lines += ["### mIoU (%) at the final iteration, mean ± sample std over seeds", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, entry in summary["table"].items():
        cells = [row, str(entry["n"]), f"{entry['trainable']:,}",
                 *(_pm(entry[q]) for q in (source, *targets, "target", *unseen_quantities))]
        lines.append("| " + " | ".join(cells) + " |")
    if summary["paired"]:
        base = summary["baseline"]
        lines += ["", f"### Paired difference to {base} (same seed), mean [{pct}% t-interval over seeds], mIoU points",
                  "", f"| method | source − {base} | target mean − {base} |"
                  + (f" unseen mean − {base} |" if unseen else ""), "|---|---|---|" + ("---|" if unseen else "")]
        for row, diff in summary["paired"].items():
            lines.append(f"| {row} | {_interval(diff['source'])} | {_interval(diff['target'])} |"
                         + (f" {_interval(diff['unseen'])} |" if unseen else ""))
    if summary["claims"]:
        lines += ["", f"### The papers' claims at this scale (paired by seed, {pct}% t-interval)", "",
                  "| claim | statement | difference | on | claimed | mean [interval] | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for c in summary["claims"]:
            on = "source" if c["quantity"] == "source" else "target mean"
            lines.append(f"| ({c['id']}) | {c['claim']} | {c['a']} − {c['b']} | {on} | "
                         f"{'> 0' if c['direction'] > 0 else '< 0'} | {_interval(c)} | **{c['verdict']}** |")
        lines += ["", "holds: the interval excludes 0 on the claimed side; contradicted: it excludes 0 on the "
                  "other side; undecided: it contains 0 (or there is one seed)."]
    bias = summary.get("selection_bias") or {}
    if bias:
        lines += ["", "### Selection bias: best target mean over the evaluated iterations − the last one's", "",
                  "What picking the checkpoint on the targets (as Rein's, SoMA's and GeCo's public configs do) "
                  "would add. Verdicts above use the last iteration.", "",
                  "| method | best − last (mean ± sd over seeds) | best at iteration(s) |", "|---|---|---|"]
        for row, b in bias.items():
            lines.append(f"| {row} | {_pm(b)} | {', '.join(str(i) for i in b['best_iteration'])} |")
    return "\n".join(lines)


def _precondition_lines(checks: dict) -> list[str]:
    """The preconditions table, printed first: a verdict is interpretable only when P1-P4 pass."""
    if not checks:
        return []
    lines = ["### Preconditions (P1-P4 must pass for any verdict; P5 and P6 are findings)", "",
             "| | precondition | value | threshold | result |", "|---|---|---|---|---|"]
    for key, c in checks.items():
        result = "not measured" if c["pass"] is None else ("pass" if c["pass"] else "**fail**")
        lines.append(f"| {key} | {c['description'].split(':')[0]} | {_num(c['value'], 2)} | {c['threshold']} | {result} |")
    return lines + [""]


def plot_curves(summary: dict, path: Path) -> Path:
    """Source mIoU and target-mean mIoU against the iteration: mean over seeds, ± sd band, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    titles = {"source": f"'{summary['source']}' (source val)", "target": f"mean of {len(summary['targets'])} targets"}
    colours = plt.get_cmap("tab20").colors  # 20 distinct colours: every row its own
    for ax, quantity in zip(axes, ("source", "target")):
        for i, (row, curve) in enumerate(summary["curves"].items()):
            xs, mean, sd = curve["iterations"], curve[quantity]["mean"], curve[quantity]["sd"]
            # FisherTune's ablations dashed, beside the methods
            (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=row, color=colours[(2 * i) % 20 + (2 * i) // 20],
                              linestyle="--" if row.startswith("ft-") else "-")
            if not any(math.isnan(v) for v in sd):
                ax.fill_between(xs, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                                color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_title(titles[quantity], fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylabel("mIoU (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize="small", ncols=2)
    n = max((e["n"] for e in summary["table"].values()), default=0)
    fig.suptitle(f"fine-tuned on '{summary['source']}' only; mean ± std over {n} seed(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def machine_info(threads: int, device: str) -> dict:
    import os
    import platform

    import torch

    info = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": threads, "device": device,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version()}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return info


def _json_safe(obj):
    """NaN -> null (strict JSON for other tools)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_report(records: Sequence[dict], summary: dict, out_dir, meta: dict) -> dict[str, Path]:
    """``results.json`` (``meta``: budget, seeds, machine, wall time...; the summary; every run's record
    with its per-iteration, per-domain mIoU), ``results.md`` and ``curves.png`` in ``out_dir``."""
    from ..fileio import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [{k: v for k, v in r.items() if k != "config"} for r in records]  # configs stay in the run folders
    data = _json_safe({**meta, "summary": summary, "runs": runs})
    text = json.dumps(data, indent=1) + "\n"
    lines = ["# Seeded domain-generalization benchmark", ""]
    budget = meta.get("budget", {})
    lines.append(f"Budget: {', '.join(f'{k} {v}' for k, v in budget.items())}; seeds {meta.get('seeds')}; "
                 f"{meta.get('curve_points')} curve points.")
    machine = meta.get("machine", {})
    if machine:
        lines.append(f"Machine: {machine.get('cpu_count')} CPUs, torch {machine.get('torch')}, "
                     f"{machine.get('threads')} thread(s), device {machine.get('device')}; wall time "
                     f"{meta.get('wall_time', '?')}.")
    md = "\n".join(lines) + "\n\n" + format_tables(summary) + "\n"
    paths = {"json": out / "results.json", "md": out / "results.md", "curves": out / "curves.png"}
    atomic_write(paths["md"], lambda tmp: Path(tmp).write_text(md))
    atomic_write(paths["json"], lambda tmp: Path(tmp).write_text(text))
    plot_curves(summary, paths["curves"])
    return paths
