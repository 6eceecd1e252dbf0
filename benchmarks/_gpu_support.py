"""Budgets, timed cases and the report of benchmarks/gpu_check.py (not a benchmark by itself).

A :class:`Section` owns a time budget. Cases run one after another; a case starts only while the
section's budget lasts, and once started it always does its warm-up runs and one timed run, then
further repeats while the budget lasts. Whatever is skipped or shortened is recorded (``cut``), so a
slow section ends early instead of running the whole check past its limit. Every finished case is
written to the JSON file at once, so a run stopped from outside still leaves what it measured.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

MIB = 2**20
# torch.OutOfMemoryError from torch 2.5; torch.cuda.OutOfMemoryError (an alias now) before
OOM_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_supported(device: torch.device) -> bool:
    """bf16 autocast on this device (CPU autocast supports bf16; a GPU needs compute capability 8.0+)."""
    return device.type != "cuda" or torch.cuda.is_bf16_supported()


def autocast(amp: str, device: torch.device):
    """What the Trainer's ``autocast_context`` does on a GPU (``train.amp``), on any device here: the
    CPU smoke run then goes through the bf16 code path too."""
    if amp == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _json_safe(obj):
    """NaN and infinities as null (strict JSON), recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


class Report:
    """The results of one run, written to OUT/gpu_check.json after every case."""

    def __init__(self, out: Path, meta: dict):
        self.out = out
        self.data = {"meta": meta, "sections": {}}
        out.mkdir(parents=True, exist_ok=True)

    def save(self) -> Path:
        path = self.out / "gpu_check.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_json_safe(self.data), indent=1, allow_nan=False, default=str) + "\n")
        os.replace(tmp, path)
        return path


class Section:
    """One section's budget and cases (``report.data["sections"][name]``)."""

    def __init__(self, name: str, budget_s: float, report: Report, device: torch.device):
        self.name, self.budget_s, self.report, self.device = name, budget_s, report, device
        self.start = time.perf_counter()
        self.data = report.data["sections"][name] = {"budget_s": round(budget_s, 1), "cut": False, "notes": [],
                                                     "cases": {}, "figures": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def spent(self) -> bool:
        return self.elapsed() >= self.budget_s

    def note(self, text: str) -> None:
        self.data["notes"].append(text)

    def cut(self, why: str) -> None:
        self.data["cut"] = True
        self.note(why)

    def record(self, name: str, **entry) -> dict:
        self.data["cases"][name] = entry
        self.data["elapsed_s"] = round(self.elapsed(), 2)
        self.report.save()
        return entry

    def can_start(self, name: str) -> bool:
        """False (and the case recorded as skipped) once the budget is spent."""
        if self.spent():
            self.cut(f"{name}: skipped, section budget of {self.budget_s:.0f} s spent")
            self.record(name, status="skipped (budget)")
            return False
        return True

    def run(self, fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int,
            context: Callable[[], object] = contextlib.nullcontext) -> dict[str, dict]:
        """Time each function (interleaved within every repeat, each one synchronised) under ``context``;
        one entry per function: median and fastest seconds, the times, and (one function alone on a
        GPU) the peak of ``torch.cuda.max_memory_allocated`` over the case, reset at its start."""
        names = list(fns)
        label = " + ".join(names)
        if not self.can_start(label):
            return {n: self.data["cases"][label] for n in names}
        device = self.device
        times: dict[str, list[float]] = {n: [] for n in names}
        status, cut = "ok", False
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
        try:
            for rep in range(warmup + repeats):
                if rep > warmup and self.spent():
                    cut = True
                    self.cut(f"{label}: {rep - warmup} of {repeats} repeats (budget spent)")
                    break
                for n in names:
                    with context():
                        sync(device)
                        t0 = time.perf_counter()
                        fns[n]()
                        sync(device)
                    if rep >= warmup:
                        times[n].append(time.perf_counter() - t0)
        except OOM_ERRORS as err:
            status = "oom"
            self.note(f"{label}: out of memory ({str(err).splitlines()[0][:160]})")
        except Exception as err:  # noqa: BLE001 (the check records a failed case and goes on)
            status = f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            self.note(f"{label}: {status}")
        peak = torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" and len(names) == 1 else None
        if status != "ok":
            free_memory(device)
        out = {}
        for n in names:
            ts = times[n]
            entry = {"status": status if (ts or status != "ok") else "error: no timed run"}
            if ts and status == "ok":
                entry.update(median_s=statistics.median(ts), min_s=min(ts), times_s=[round(t, 5) for t in ts],
                             repeats=len(ts), cut=cut)
                if peak is not None:
                    entry["peak_mib"] = round(peak, 1)
            out[n] = self.record(n, **entry)
        return out

    def finish(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 2)
        self.report.save()


def alternating_batches(check):
    """An endless stream of the check's batch and its mirror image, alternately: the estimate's passes see
    two different batches without a data loader."""
    pool = [(check.images, check.labels), (check.images.flip(-1), check.labels.flip(-1))]
    i = 0
    while True:
        image, label = pool[i % 2]
        yield {"image": image, "label": label}
        i += 1


def ok(entry: Optional[dict]) -> bool:
    return bool(entry) and entry.get("status") == "ok" and "median_s" in entry


def ratio(a: Optional[dict], b: Optional[dict], key: str = "median_s") -> Optional[float]:
    """a / b of two case entries, None when either is missing."""
    if ok(a) and ok(b) and a.get(key) and b.get(key):
        return round(a[key] / b[key], 4)
    return None


def start_watchdog(seconds: float, report: Report, on_timeout: Callable[[], None]) -> threading.Timer:
    """After ``seconds``, mark the report as stopped, write it and end the process (a section that hangs
    or compiles for minutes must not hold the machine past the run's limit)."""

    def fire():
        report.data["meta"]["stopped_by_hard_limit_s"] = seconds
        for _ in range(3):  # the main thread may be changing the dict right now
            try:
                report.save()
                on_timeout()
                break
            except RuntimeError:
                time.sleep(0.05)
        print(f"gpu_check: hard limit of {seconds:.0f} s reached; partial results written", file=sys.stderr,
              flush=True)
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


def training_table(cases: dict, methods) -> list[str]:
    """Methods x (precision, checkpointing): step time (x full), peak memory, hours for 40k iterations."""
    variants = [f"{amp}/{ckpt}" for ckpt in ("no-ckpt", "ckpt") for amp in ("fp32", "bf16")]
    lines = ["| method | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    for method in methods:
        cells = []
        for v in variants:
            e, full = cases.get(f"{method}/{v}"), cases.get(f"full/{v}")
            if not ok(e):
                cells.append(e["status"] if e else "")
                continue
            rel = ratio(e, full)
            peak = f", {e['peak_mib'] / 1024:.1f} GiB" if "peak_mib" in e else ""
            cells.append(f"{1000 * e['median_s']:.0f} ms{f' ({rel:.2f})' if rel else ''}{peak}, {e['hours_40k']:.1f} h")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines + ["", "(step time (x full), peak max_memory_allocated, hours for 40k iterations)", ""]


def _ms(seconds: Optional[float]) -> str:
    return f"{1000 * seconds:.1f} ms" if seconds is not None else ""


def markdown(data: dict, sections, methods) -> str:
    """The Markdown summary of a report (gpu_check.md)."""
    meta = data["meta"]
    lines = [f"# dgss GPU check ({'CPU smoke run, toy sizes' if meta['cpu_smoke'] else 'full size'})", "",
             f"`{meta['command']}`, started {meta['started']}; sizes: {meta['sizes']}", ""]
    if meta.get("stopped_by_hard_limit_s"):
        lines += [f"**Stopped by the hard limit of {meta['stopped_by_hard_limit_s']:.0f} s: partial results.**", ""]
    for number, name in enumerate(sections, 1):
        sec = data["sections"].get(name)
        if sec is None:
            continue
        cut = " **(cut: budget spent)**" if sec["cut"] else ""
        lines += [f"## {number}. {name}{cut}", "",
                  f"budget {sec['budget_s']:.0f} s, took {sec.get('elapsed_s', 0):.1f} s", ""]
        if name == "training":
            lines += training_table(sec["cases"], methods)
        if name == "speed":
            from _gpu_speed import speed_table

            lines += speed_table(sec)
        if sec["cases"]:
            lines += ["| case | status | median | fastest | repeats | peak MiB | other |", "|---" * 7 + "|"]
            for case, e in sec["cases"].items():
                other = ", ".join(f"{k} {v:.4g}" for k, v in e.items() if isinstance(v, (int, float))
                                  and not isinstance(v, bool) and k not in ("median_s", "min_s", "peak_mib", "repeats"))
                lines.append(f"| {case} | {e['status']} | {_ms(e.get('median_s'))} | {_ms(e.get('min_s'))} "
                             f"| {e.get('repeats', '')} | {e.get('peak_mib', '')} | {other} |")
            lines.append("")
        lines += [f"- {k}: {v}" for k, v in sec["figures"].items() if not isinstance(v, dict)]  # dicts: tabled
        lines += [f"- note: {n}" for n in sec["notes"]] + [""]
    return "\n".join(lines)
