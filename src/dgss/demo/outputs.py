"""What the demo writes: the comparison table (Markdown, CSV), a bar chart and prediction overlays.

    write_table(results, source, targets, out)        # results.md, results.csv
    plot_miou(results, source, targets, out / "miou.png")
    write_overlays(models, datasets, cfg, out / "overlays")
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["table_rows", "summary_rows", "format_table", "write_table", "plot_miou", "write_overlays"]


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def table_rows(results, source: str, targets: Sequence[str]) -> list[dict]:
    """One dict per method: method, trainable, source, <target>..., mean (over the targets)."""
    rows = []
    for r in results:
        row = {"method": r.method, "trainable": r.trainable, "source": r.miou[source]}
        row.update({t: r.miou[t] for t in targets})
        row["mean"] = _mean([r.miou[t] for t in targets])
        rows.append(row)
    return rows


def summary_rows(summary: dict) -> list[dict]:
    """:func:`table_rows` from the seeded benchmark's summary (:func:`dgss.testbed.stats.summarize`):
    the mean over seeds, and with several seeds also "seeds" and "sd" (the sample std of each column)."""
    source, targets = summary["source"], summary["targets"]
    keys = {"source": source, **{t: t for t in targets}, "mean": "target"}
    rows = []
    for row, entry in summary["table"].items():
        out = {"method": row, "trainable": entry["trainable"], **{k: entry[q]["mean"] for k, q in keys.items()}}
        if entry["n"] > 1:
            out["seeds"] = entry["n"]
            out["sd"] = {k: entry[q]["sd"] for k, q in keys.items()}
        rows.append(out)
    return rows


def format_table(rows: Sequence[dict], source: str, targets: Sequence[str]) -> str:
    """Markdown, one decimal; rows over several seeds show "mean ± sd"."""
    def cell(r: dict, key: str) -> str:
        return f"{r[key]:.1f}" + (f" ± {r['sd'][key]:.1f}" if "sd" in r else "")

    head = ["method", "trainable backbone params", f"{source} (source)", *targets, "mean (targets)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], f"{r['trainable']:,}", *(cell(r, k) for k in ("source", *targets, "mean"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table(rows: Sequence[dict], source: str, targets: Sequence[str], out_dir: Path) -> tuple[Path, Path]:
    """``results.md`` (one decimal) and ``results.csv`` (the values of the runs' results.json; over
    several seeds their mean, and a ``<column>_sd`` column each)."""
    md, csv_path = out_dir / "results.md", out_dir / "results.csv"
    md.write_text(format_table(rows, source, targets) + "\n")
    keys = ("source", *targets, "mean")
    columns = [f"{source}_source", *targets, "mean_targets"]
    with_sd = any("sd" in r for r in rows)
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        sd_columns = [f"{c}_sd" for c in columns] if with_sd else []
        writer.writerow(["method", "trainable_backbone_params", *columns, *sd_columns])
        for r in rows:
            sd = [round(r["sd"][k], 4) if "sd" in r else "" for k in keys] if with_sd else []
            writer.writerow([r["method"], r["trainable"], *(round(r[k], 4) for k in keys), *sd])
    return md, csv_path


def plot_miou(rows: Sequence[dict], source: str, targets: Sequence[str], path: Path) -> Path:
    """Grouped bars: the source, each target and the target mean; one bar per method (± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("source", f"{source}\n(source)"), *((t, t) for t in targets), ("mean", "mean\n(targets)")]
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(groups), 3.6))
    for i, row in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(groups))]
        yerr = [row["sd"][key] for key, _ in groups] if "sd" in row else None  # several seeds: ± sample std
        ax.bar(xs, [row[key] for key, _ in groups], width, yerr=yerr, capsize=2, label=row["method"])
    ax.axvline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xticks(range(len(groups)), [label for _, label in groups], fontsize=8)
    ax.set_ylabel("mIoU (%)")
    ax.set_title(f"fine-tuned on '{source}' only; synthetic sanity check, not a benchmark", fontsize=9)
    ax.legend(fontsize="small", ncols=min(len(rows), 4))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _denormalise(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    x = image * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return x.clamp(0, 255).byte().permute(1, 2, 0).numpy()


def _blend(image: np.ndarray, ids: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    from ..data.labels import colorize

    colour = colorize(ids).astype(np.float32)
    out = (1 - alpha) * image.astype(np.float32) + alpha * colour
    out[ids == 255] = image[ids == 255]
    return out.astype(np.uint8)


def _label_strip(text: str, width: int, height: int = 14) -> np.ndarray:
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(strip).text((3, 1), text, fill=(0, 0, 0))
    return np.asarray(strip)


@torch.no_grad()
def write_overlays(models: dict, datasets, cfg, out_dir: Path, count: int) -> list[Path]:
    """For each dataset (domain) the first ``count`` images: ``<domain>.png`` with columns image,
    ground truth, then each method's prediction (all blended over the image), and
    ``<method>/<domain>_<i>.png``, the overlay alone."""
    from PIL import Image

    from ..data.builder import build_dataset

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for ds_cfg in datasets:
        dataset = build_dataset(ds_cfg, cfg.data, train=False)
        rows = []
        for i in range(min(count, len(dataset))):
            sample = dataset[i]
            image = _denormalise(sample["image"], cfg.data.mean, cfg.data.std)
            label = sample["label"].numpy()
            tiles = [("image", image), ("ground truth", _blend(image, label))]
            for method, model in models.items():
                model.eval()
                pred = model.inference(sample["image"][None], out_size=label.shape)[0].argmax(0).numpy()
                overlay = _blend(image, pred.astype(np.uint8))
                tiles.append((method, overlay))
                path = out_dir / method / f"{ds_cfg.name}_{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(overlay).save(path)
            gap = np.full((image.shape[0] + 14, 4, 3), 255, np.uint8)
            cells = []
            for name, tile in tiles:
                cells += [np.concatenate([_label_strip(name, tile.shape[1]), tile]), gap]
            rows.append(np.concatenate(cells[:-1], axis=1))
        grid = np.concatenate([np.concatenate([r, np.full((4, r.shape[1], 3), 255, np.uint8)]) for r in rows])
        path = out_dir / f"{ds_cfg.name}.png"
        Image.fromarray(grid).save(path)
        written.append(path)
    return written
