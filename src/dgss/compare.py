"""`dgss compare`: several tuning methods on one protocol, as the papers' comparison tables print them.

    dgss compare configs/frozen/dinov2-l_gtav_512.yaml --methods frozen,rein,fishertune,lora --out compare/
    runs, paths = compare(protocol_cfg_path, ["frozen", "rein"], out_dir="compare")   # the same from Python

For each method the run is found or made, in this order:
  1. ``RUN/eval/results.json`` exists (written by ``dgss eval`` or by a previous compare): collected;
  2. ``RUN/model_final.safetensors`` exists: evaluated on ``data.test``;
  3. ``RUN/checkpoints`` holds a checkpoint (an interrupted run): resumed, then evaluated;
  4. otherwise trained (:class:`dgss.engine.trainer.Trainer`) and evaluated (unless ``run=False``).

A run found on disk is reused only for the experiment it was made with: before anything is collected,
evaluated or trained, every existing run's saved config (``RUN/config.yaml``) is compared with the one
requested, and a difference in any key but :data:`dgss.config.NON_EXPERIMENT_KEYS` (where it writes,
what it shows, how fast it runs) is refused with the keys named (:class:`StaleRunError`). Nothing is
deleted or re-run behind the user's back: they delete the run, or name the new one differently.

Which config a method runs with: an entry ending in ``.yaml`` is a config file; for a method name, the
published config of that method for the same protocol when there is one (``configs/<method>/<file>``
next to the protocol's folder, e.g. ``configs/rein/dinov2-l_gtav_512.yaml``), else the protocol config
with ``method.name=<method>`` and the run named ``<method>_<protocol>``. Overrides apply to all.

Where a run is found: its own folder (``output_dir/name``) when that holds results, a model or
checkpoints; else any other run folder of ``output_dir`` whose recorded ``config.yaml`` is the same
experiment (:func:`find_recorded_run`), e.g. one made by ``dgss train PROTOCOL method.name=lora``, which
keeps the protocol's run name, or by ``dgss train ... name=my_lora``.

The table: method, trainable backbone parameters in millions (``method.num_trainable_backbone_parameters()``
of the model the run's config builds, on the meta device: computed, never typed), mIoU per target
dataset and their mean (from the runs' ``results.json``), written as Markdown, CSV and a bar chart.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .config import (NON_EXPERIMENT_KEYS, ExperimentConfig, config_differences, from_dict, load_config,
                     resolve_config_path, to_dict)

__all__ = ["MethodRun", "StaleRunError", "resolve_runs", "find_recorded_run", "check_existing_run",
           "trainable_backbone_parameters", "collect_or_run", "compare", "format_markdown_table", "write_csv",
           "plot_bars"]


class StaleRunError(ValueError):
    """A method's run folder holds a run of another experiment than the one requested."""


@dataclass
class MethodRun:
    """One row: the method's label, its resolved config and, once known, its scores."""

    label: str
    cfg: ExperimentConfig
    params: Optional[int] = None
    miou: dict[str, Optional[float]] = field(default_factory=dict)  # dataset -> mIoU (%), None when NaN
    status: str = "pending"  # collected | evaluated | trained | missing

    @property
    def results_path(self) -> Path:
        return self.cfg.run_dir / "eval" / "results.json"

    @property
    def mean(self) -> Optional[float]:
        values = [v for v in self.miou.values() if v is not None]
        return sum(values) / len(values) if values else None


def _protocol_name(cfg: ExperimentConfig) -> str:
    prefix = f"{cfg.method.name}_"
    return cfg.name[len(prefix):] if cfg.name.startswith(prefix) else cfg.name


def resolve_runs(config: str | os.PathLike, methods: Sequence[str], overrides: Sequence[str] = ()) -> list[MethodRun]:
    """The configs of the methods to compare (see the module docstring)."""
    config = resolve_config_path(config)  # a shipped config's name too: its published siblings are found
    protocol = load_config(config, list(overrides))
    runs = []
    for entry in methods:
        if entry.endswith((".yaml", ".yml")):
            cfg = load_config(entry, list(overrides))
            runs.append(MethodRun(cfg.method.name, cfg))
            continue
        published = config.parent.parent / entry / config.name
        if published.is_file():
            cfg = load_config(published, list(overrides))
        else:
            cfg = load_config(config, [*overrides, f"method.name={entry}", f"name={entry}_{_protocol_name(protocol)}"])
        runs.append(MethodRun(entry, cfg))
    for run in runs:
        if not _made_outputs(run):
            found = find_recorded_run(run.cfg, exclude=[r.cfg.name for r in runs])
            if found is not None:
                run.cfg.name = found.name
    names = [r.cfg.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"two methods resolve to the same run name: {names}")
    return runs


def trainable_backbone_parameters(cfg: ExperimentConfig) -> int:
    """``num_trainable_backbone_parameters()`` of the method ``cfg`` builds, on the meta device (no
    memory, no weights file read: the count depends on shapes only)."""
    import torch

    from .models.backbones import build_backbone
    from .tuning import build_method

    model = cfg.model
    with torch.device("meta"):
        backbone = build_backbone(model.backbone, weights=None, img_size=model.img_size, patch_size=model.patch_size,
                                  out_indices=model.out_indices, **model.backbone_kwargs)
        method = build_method(cfg.method, backbone)
    return int(method.num_trainable_backbone_parameters())


def _read_results(path: Path) -> dict[str, Optional[float]]:
    data = json.loads(path.read_text())
    return {name: entry.get("miou") for name, entry in data["datasets"].items()}


def _run_config(run: MethodRun) -> ExperimentConfig:
    """The config the run was trained with when it saved one (RUN/config.yaml), else the resolved one."""
    saved = run.cfg.run_dir / "config.yaml"
    if saved.is_file():
        import yaml

        return from_dict(ExperimentConfig, yaml.safe_load(saved.read_text()) or {}, source=str(saved))
    return run.cfg


def find_recorded_run(cfg: ExperimentConfig, exclude: Sequence[str] = ()) -> Optional[Path]:
    """The run folder of ``cfg.output_dir`` (other than the names in ``exclude``) whose recorded
    ``config.yaml`` is ``cfg``'s experiment (every key but :data:`~dgss.config.NON_EXPERIMENT_KEYS` equal)
    and that holds results, a model or checkpoints; the most finished one (results, then a final model,
    then checkpoints; by name among equals). None when there is none."""
    import yaml

    requested = to_dict(cfg)
    found = []
    for saved in sorted(Path(cfg.output_dir).glob("*/config.yaml")):
        folder = saved.parent
        if folder.name in exclude:
            continue
        outputs = _outputs_of(folder)
        if not outputs:
            continue
        try:
            recorded = to_dict(from_dict(ExperimentConfig, yaml.safe_load(saved.read_text()) or {}, source=str(saved)))
        except (ValueError, yaml.YAMLError):  # another tool's or an older schema's file: not this experiment
            continue
        if not config_differences(recorded, requested, ignore=NON_EXPERIMENT_KEYS):
            rank = 0 if "eval/results.json" in outputs else 1 if len(outputs) > 1 or outputs[0] != "checkpoints/" else 2
            found.append((rank, folder.name, folder))
    return min(found)[2] if found else None


def _made_outputs(run: MethodRun) -> list[str]:
    """What compare would reuse from ``run``'s folder: results, final model, checkpoints."""
    return _outputs_of(run.cfg.run_dir)


def _outputs_of(run_dir: Path) -> list[str]:
    from .engine.trainer import FINAL_MODEL_NAME

    found = [name for name in ("eval/results.json", FINAL_MODEL_NAME) if (run_dir / name).is_file()]
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        found.append("checkpoints/")
    return found


def _show(data: dict, key: str) -> str:
    """The value of dotted ``key`` in a config dict, as JSON, shortened."""
    for part in key.split("."):
        data = data[int(part)] if isinstance(data, list) else data.get(part) if isinstance(data, dict) else None
    text = json.dumps(data)
    return text if len(text) <= 40 else text[:37] + "..."


def check_existing_run(run: MethodRun) -> None:
    """Refuse to reuse ``run``'s folder when what it holds was made with another experiment config.

    Raises:
        StaleRunError: one line naming the run folder, the differing keys (saved -> requested) and the
            ways out.
    """
    found = _made_outputs(run)
    if not found:
        return
    run_dir = run.cfg.run_dir
    saved_path = run_dir / "config.yaml"
    way_out = (f"delete {run_dir} to make it again, or give this experiment another run name (name=...; "
               "or another output_dir=...)")
    if not saved_path.is_file():
        raise StaleRunError(f"{run.label}: {run_dir} holds {', '.join(found)} but no config.yaml, so which experiment "
                            f"they belong to is unknown; if it is this one, save its config there (dgss config CONFIG "
                            f"--save {saved_path}), else {way_out}")
    saved, requested = to_dict(_run_config(run)), to_dict(run.cfg)
    changed = config_differences(saved, requested, ignore=NON_EXPERIMENT_KEYS)
    if changed:
        shown = "; ".join(f"{k}: {_show(saved, k)} -> {_show(requested, k)}" for k in changed[:6])
        more = f"; and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise StaleRunError(f"{run.label}: {run_dir} was made with another config than the one requested "
                            f"(saved -> requested: {shown}{more}); its {', '.join(found)} would be stale: {way_out}")


def _evaluate(cfg: ExperimentConfig, model_path: Path) -> None:
    from .engine.checkpoint import load_model_weights
    from .engine.distributed import init_distributed
    from .engine.evaluate import evaluate_datasets, results_writer
    from .tuning.model import build_segmentor

    ctx = init_distributed(cfg.train.device)
    model = build_segmentor(cfg).to(ctx.device)
    load_model_weights(model, model_path)
    amp = cfg.train.amp if ctx.device.type == "cuda" else "none"
    # written as each dataset finishes ("pending" lists the rest, so a partial file is never collected)
    evaluate_datasets(model, cfg.data.test, cfg, ctx, amp=amp, progress=cfg.train.progress_bar,
                      on_result=results_writer(cfg.run_dir / "eval", checkpoint=str(model_path)))


def collect_or_run(run: MethodRun, *, allow_run: bool = True) -> MethodRun:
    """Fill ``run.miou`` from its results file, evaluating or training first when needed (a run on disk
    only when it was made with ``run.cfg``'s experiment: :func:`check_existing_run`)."""
    from .engine.trainer import FINAL_MODEL_NAME

    check_existing_run(run)

    from .engine.evaluate import results_complete

    final = run.cfg.run_dir / FINAL_MODEL_NAME
    if results_complete(run.results_path):  # not one an interrupted evaluation left half-written
        run.status = "collected"
    elif final.is_file() and allow_run:
        _evaluate(_run_config(run), final)
        run.status = "evaluated"
    elif allow_run:
        if not run.cfg.data.test:
            raise ValueError(f"{run.label}: data.test lists no dataset to evaluate on")
        from .engine.checkpoint import latest_checkpoint
        from .engine.trainer import Trainer

        # an interrupted run of this experiment (check_existing_run compared its config) continues
        resume = latest_checkpoint(run.cfg.run_dir / "checkpoints") is not None
        path = Trainer(run.cfg, resume=resume).train()
        _evaluate(run.cfg, path)
        run.status = "trained"
    else:
        run.status = "missing"
        return run
    run.miou = _read_results(run.results_path)
    return run


def _cell(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _datasets(runs: Sequence[MethodRun]) -> list[str]:
    names: list[str] = []
    for run in runs:
        names += [n for n in run.miou if n not in names]
    return names


def format_markdown_table(runs: Sequence[MethodRun]) -> str:
    """| method | trainable backbone params (M) | <dataset> ... | mean |, mIoU in %, one decimal."""
    datasets = _datasets(runs)
    lines = ["| " + " | ".join(["method", "trainable backbone params (M)", *datasets, "mean"]) + " |",
             "|" + "---|" * (len(datasets) + 3)]
    for run in runs:
        params = "-" if run.params is None else f"{run.params / 1e6:.2f}"
        cells = [_cell(run.miou.get(d)) for d in datasets]
        lines.append("| " + " | ".join([run.label, params, *cells, _cell(run.mean)]) + " |")
    return "\n".join(lines)


def write_csv(runs: Sequence[MethodRun], path: Path) -> Path:
    """The same table at full precision (parameters as integers, mIoU as in the results files)."""
    datasets = _datasets(runs)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "run", "trainable_backbone_params", *datasets, "mean", "status"])
        for run in runs:
            row = [run.miou.get(d) for d in datasets]
            writer.writerow([run.label, run.cfg.name, run.params, *("" if v is None else v for v in row),
                             "" if run.mean is None else run.mean, run.status])
    return path


def plot_bars(runs: Sequence[MethodRun], path: Path) -> Path:
    """Grouped bars: one group per target dataset (and the mean), one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*_datasets(runs), "mean"]
    shown = [r for r in runs if r.miou]
    width = 0.8 / max(len(shown), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(groups) * max(len(shown), 1) ** 0.5, 3.6))
    for i, run in enumerate(shown):
        values = [run.miou.get(g) if g != "mean" else run.mean for g in groups]
        xs = [j + (i - (len(shown) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, [0.0 if v is None else v for v in values], width, label=run.label)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("mIoU (%)")
    ax.legend(fontsize="small", ncols=min(len(shown), 4) or 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(config: str | os.PathLike, methods: Sequence[str], *, overrides: Sequence[str] = (),
            out_dir: str | os.PathLike = "compare", allow_run: bool = True) -> tuple[list[MethodRun], dict[str, Path]]:
    """Collect (or make, unless ``allow_run`` is False) every method's run and write ``table.md``,
    ``table.csv`` and ``miou.png`` to ``out_dir``. Returns the rows and those paths.

    Raises:
        StaleRunError: a run on disk was made with another config (checked for every method before
            anything is run).
    """
    runs = resolve_runs(config, methods, overrides)
    for run in runs:
        check_existing_run(run)
    for run in runs:
        collect_or_run(run, allow_run=allow_run)
        run.params = trainable_backbone_parameters(_run_config(run))
    if not any(run.miou for run in runs):  # an empty table and chart would look like a result
        missing = ", ".join(f"{r.label} ({r.results_path})" for r in runs)
        raise ValueError(f"nothing to compare: no method has results yet ({missing}); run without --no-run to "
                         "train and evaluate them")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = format_markdown_table(runs)
    (out / "table.md").write_text(table + "\n")
    paths = {"markdown": out / "table.md", "csv": write_csv(runs, out / "table.csv"),
             "chart": plot_bars(runs, out / "miou.png")}
    return runs, paths
