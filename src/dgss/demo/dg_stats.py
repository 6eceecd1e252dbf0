"""Statistics of the seeded benchmark: mean +- sample std over seeds, paired differences with a 95%
t-interval over seeds, and the papers' claims, each decided by one interval.

    summary = summarize(records, "clean", TARGETS)   # records of dgss.demo.benchmark.run_seeded
    summary["claims"]                                 # [{"id", "claim", "verdict", "low", "high", ...}]

Differences are paired by seed: seed s of method A against seed s of method B (the same scenes, batch
order and head initialisation), so the interval measures the methods' difference, not the spread that
seeds cause in both.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

__all__ = ["mean_std", "t_interval", "paired_difference", "verdict", "CLAIMS", "run_value", "summarize"]

CONFIDENCE = 0.95


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std is NaN for fewer than two values."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """Student-t interval of the mean of ``values``: mean -+ t_{(1+c)/2, n-1} * sd / sqrt(n).
    Returns {"n", "mean", "sd", "half", "low", "high"}; half/low/high are NaN for fewer than two values."""
    from scipy.stats import t

    mean, sd = mean_std(values)
    n = len(values)
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n) if n >= 2 else float("nan")
    return {"n": n, "mean": mean, "sd": sd, "half": half, "low": mean - half, "high": mean + half}


def paired_difference(a: dict[int, float], b: dict[int, float], confidence: float = CONFIDENCE) -> dict:
    """a[s] - b[s] over the seeds both have (``a``, ``b``: seed -> value), with its t-interval
    (:func:`t_interval`) and the seeds and differences it was computed from."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    return {**t_interval(diffs, confidence), "seeds": seeds, "differences": diffs}


def verdict(low: float, high: float, direction: int) -> str:
    """"holds" when the interval [low, high] excludes 0 on the claimed side (``direction`` +1: the
    difference is claimed positive, -1: negative), "contradicted" when it excludes 0 on the other
    side, "undecided" when it contains 0 (or is undefined: one seed)."""
    if math.isnan(low) or math.isnan(high):
        return "undecided"
    if low > 0:
        return "holds" if direction > 0 else "contradicted"
    if high < 0:
        return "holds" if direction < 0 else "contradicted"
    return "undecided"


# The papers' claims as paired differences: (id, claim, row a, row b, quantity, claimed sign of a - b).
# "source": mIoU on the source val split; "target": the mean over the target domains.
CLAIMS = (
    ("a", "Full fits the source at least as well as Frozen", "full", "frozen", "source", +1),
    ("b", "Full loses out of domain (vs Frozen)", "full", "frozen", "target", -1),
    ("c", "Rein beats Frozen on the targets", "rein", "frozen", "target", +1),
    ("d", "FisherTune beats Frozen on the targets", "fishertune", "frozen", "target", +1),
    ("e", "FisherTune >= Rein on the targets", "fishertune", "rein", "target", +1),
    ("f1", "DR-FIM selection beats random selection", "fishertune", "ft-random", "target", +1),
    ("f2", "DR-FIM selection beats FIM (task term alone)", "fishertune", "ft-fim", "target", +1),
    ("f3", "DR-FIM selection beats Delta-F (domain term alone)", "fishertune", "ft-domain", "target", +1),
    ("g", "the variational estimate helps", "fishertune", "ft-plain", "target", +1),
    ("h", "training with x' helps", "fishertune", "ft-no-xprime", "target", +1),
)


def _nanmean(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def run_value(miou: dict[str, float], quantity: str, source: str, targets: Sequence[str]) -> float:
    """One run's number: "source", "target" (mean over ``targets``, as the demo's table) or a domain."""
    if quantity == "source":
        return miou[source]
    if quantity == "target":
        return _nanmean(miou[t] for t in targets)
    return miou[quantity]


def _by_row(records: Sequence[dict]) -> dict[str, dict[int, dict]]:
    rows: dict[str, dict[int, dict]] = {}
    for r in records:
        rows.setdefault(r["row"], {})[int(r["seed"])] = r
    return rows


def summarize(records: Sequence[dict], source: str, targets: Sequence[str], *, baseline: str = "frozen") -> dict:
    """Everything results.md shows, from the runs' records (final iteration unless stated):

    * "table": row -> {"n", "seeds", "trainable", <dataset>/"target" -> {"mean", "sd", "values"}};
    * "paired": row -> {"source", "target"} paired differences to ``baseline`` (rows other than it);
    * "claims": the :data:`CLAIMS` whose rows were run, each with its interval and verdict;
    * "curves": row -> {"iterations", "source"/"target" -> {"mean", "sd"}} over seeds.
    """
    rows = _by_row(records)
    quantities = [source, *targets, "target"]
    table, curves = {}, {}
    for row, runs in rows.items():
        seeds = sorted(runs)
        final = {s: runs[s]["curve"][-1]["miou"] for s in seeds}
        entry = {"n": len(seeds), "seeds": seeds, "trainable": runs[seeds[0]]["trainable"]}
        for q in quantities:
            values = [run_value(final[s], q, source, targets) for s in seeds]
            mean, sd = mean_std(values)
            entry[q] = {"mean": mean, "sd": sd, "values": values}
        table[row] = entry
        iterations = [p["iteration"] for p in runs[seeds[0]]["curve"]]
        curve = {"iterations": iterations}
        for q in ("source", "target"):
            points = [mean_std(run_value(runs[s]["curve"][k]["miou"], q, source, targets) for s in seeds)
                      for k in range(len(iterations))]
            curve[q] = {"mean": [m for m, _ in points], "sd": [d for _, d in points]}
        curves[row] = curve

    def values(row: str, quantity: str) -> dict[int, float]:
        return {s: run_value(r["curve"][-1]["miou"], quantity, source, targets) for s, r in rows[row].items()}

    paired = {}
    if baseline in rows:
        for row in rows:
            if row != baseline:
                paired[row] = {q: paired_difference(values(row, q), values(baseline, q)) for q in ("source", "target")}
    claims = []
    for cid, text, a, b, quantity, direction in CLAIMS:
        if a in rows and b in rows:
            diff = paired_difference(values(a, quantity), values(b, quantity))
            claims.append({"id": cid, "claim": text, "a": a, "b": b, "quantity": quantity, "direction": direction,
                           **diff, "verdict": verdict(diff["low"], diff["high"], direction)})
    return {"source": source, "targets": list(targets), "baseline": baseline, "confidence": CONFIDENCE,
            "table": table, "paired": paired, "claims": claims, "curves": curves}
