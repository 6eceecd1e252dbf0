"""Statistics of the seeded benchmark: mean +- sample std over seeds, paired differences with a 95%
t-interval over seeds, and the papers' claims, each decided by one interval.

    summary = summarize(records, "clean", TARGETS)   # records of dgss.testbed.benchmark.run_seeded
    summary["claims"]                                 # [{"id", "claim", "verdict", "low", "high", ...}]

Differences are paired by seed: seed s of method A against seed s of method B (the same scenes, batch
order and head initialisation), so the interval measures the methods' difference, not the spread that
seeds cause in both.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

__all__ = ["mean_std", "t_interval", "paired_difference", "verdict", "CLAIMS", "run_value", "summarize",
           "PRECONDITIONS", "GATING", "preconditions", "selection_bias", "REQUIRED_ROWS", "CORE_ROWS"]

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
    # the newer methods' claims (issue 40): FADA's over Rein, whose code it extends; GeCo's over SoMA as
    # its public code runs, which is GeCo's code without the loss
    ("i", "FADA beats Rein on the targets", "fada", "rein", "target", +1),
    ("j", "GeCo's loss helps SoMA (as its public code runs) on the targets", "geco", "soma-public", "target", +1),
)


# The testbed's rows (docs/testbed.md): the default run and the --core subset that decides P1-P4.
REQUIRED_ROWS = ("frozen", "full", "lp-ft", "wise-ft", "scratch", "rein", "fishertune", "lora", "soma", "soma-public",
                 "fada", "geco", "ft-random", "ft-fim", "ft-domain", "frozen-label", "fishertune-label", "frozen-2x")
CORE_ROWS = ("frozen", "full", "lp-ft", "rein", "fishertune", "frozen-2x")

# Preconditions of a verdict (the testbed issue's numbers; change the world, never these).
PRECONDITIONS = {
    "P1": "head converged: |Frozen's source mIoU at the final iteration - a run twice as long's| <= 1.5 (one seed)",
    "P2": "room to adapt: Full - Frozen on the source >= +5 points and >= 3 x its paired std",
    "P3": "a real shift: Frozen's target mean >= 10 points below its source mIoU",
    "P4": "noise: std over seeds of the target mean <= 1.0 point for every required row except scratch",
    "P5": "distortion (positive control, reported either way): LP-FT or WiSE-FT beats Full on the target mean",
    "P6": "pretraining matters: Full from random initialisation >= 10 points below Frozen on the target mean",
}
GATING = ("P1", "P2", "P3", "P4")  # a verdict is interpretable only when these pass
_P1_MAX, _P2_MIN, _P2_SIGMAS, _P3_MIN, _P4_MAX, _P6_MIN = 1.5, 5.0, 3.0, 10.0, 1.0, 10.0
P6_MIN = _P6_MIN  # the threshold of "pretraining matters" (Frozen - Scratch on the target mean)


def _nanmean(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def run_value(miou: dict[str, float], quantity: str, source: str, targets: Sequence[str],
              unseen: Sequence[str] = ()) -> float:
    """One run's number: "source", "target" (mean over ``targets``, as the demo's table), "unseen" (mean
    over ``unseen``, the looks no pretraining image has) or a domain."""
    if quantity == "source":
        return miou[source]
    if quantity == "target":
        return _nanmean(miou[t] for t in targets)
    if quantity == "unseen":
        return _nanmean(miou[t] for t in unseen)
    return miou[quantity]


def _by_row(records: Sequence[dict]) -> dict[str, dict[int, dict]]:
    rows: dict[str, dict[int, dict]] = {}
    for r in records:
        rows.setdefault(r["row"], {})[int(r["seed"])] = r
    return rows


def summarize(records: Sequence[dict], source: str, targets: Sequence[str], *, baseline: str = "frozen",
              gated: bool = False, unseen: Sequence[str] = ()) -> dict:
    """Everything results.md shows, from the runs' records (final iteration unless stated):

    * "table": row -> {"n", "seeds", "trainable", <dataset>/"target" -> {"mean", "sd", "values"}};
    * "paired": row -> {"source", "target"[, "unseen"]} paired differences to ``baseline`` (rows other than it);
    * "claims": the :data:`CLAIMS` whose rows were run, each with its interval and verdict;
    * "curves": row -> {"iterations", "source"/"target" -> {"mean", "sd"}} over seeds;
    * "preconditions": P1-P6 (:func:`preconditions`) when ``gated`` (the testbed), else empty; a failing
      (or unmeasured) P1-P4 turns every verdict into "not interpretable (P_k fails)";
    * "selection_bias": :func:`selection_bias`.

    ``unseen`` (the world's unseen looks): their columns and their mean ("unseen") join the table and the
    paired differences; the target mean, the preconditions and the claims never read them.
    """
    rows = _by_row(records)
    unseen = [u for u in unseen if u not in targets]
    quantities = [source, *targets, "target", *((*unseen, "unseen") if unseen else ())]
    paired_quantities = ("source", "target", "unseen") if unseen else ("source", "target")
    table, curves = {}, {}
    for row, runs in rows.items():
        seeds = sorted(runs)
        final = {s: runs[s]["curve"][-1]["miou"] for s in seeds}
        entry = {"n": len(seeds), "seeds": seeds, "trainable": runs[seeds[0]]["trainable"]}
        for q in quantities:
            values = [run_value(final[s], q, source, targets, unseen) for s in seeds]
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
        return {s: run_value(r["curve"][-1]["miou"], quantity, source, targets, unseen) for s, r in rows[row].items()}

    paired = {}
    if baseline in rows:
        for row in rows:
            if row != baseline:
                paired[row] = {q: paired_difference(values(row, q), values(baseline, q)) for q in paired_quantities}
    checks = preconditions(records, source, targets) if gated else {}
    failing = [k for k in GATING if k in checks and checks[k]["pass"] is not True]
    claims = []
    for cid, text, a, b, quantity, direction in CLAIMS:
        if a in rows and b in rows:
            diff = paired_difference(values(a, quantity), values(b, quantity))
            decided = verdict(diff["low"], diff["high"], direction)
            if failing:  # a world that fails a precondition cannot decide a claim
                decided = f"not interpretable ({', '.join(failing)} {'fails' if len(failing) == 1 else 'fail'})"
            claims.append({"id": cid, "claim": text, "a": a, "b": b, "quantity": quantity, "direction": direction,
                           **diff, "verdict": decided})
    return {"source": source, "targets": list(targets), "unseen": list(unseen), "baseline": baseline,
            "confidence": CONFIDENCE,
            "preconditions": checks, "table": table, "paired": paired, "claims": claims, "curves": curves,
            "selection_bias": selection_bias(records, source, targets)}


def _check(value: float, threshold: str, passed: Optional[bool], **extra) -> dict:
    return {"value": value, "threshold": threshold, "pass": passed, **extra}


def preconditions(records: Sequence[dict], source: str, targets: Sequence[str]) -> dict:
    """P1-P6 (``PRECONDITIONS``) from the runs' records: each {"value", "threshold", "pass", ...}; "pass"
    is None (and the value NaN) when the rows it needs were not run, which counts as failing for P1-P4."""
    rows = _by_row(records)

    def final(row: str, quantity: str) -> dict[int, float]:
        return {s: run_value(r["curve"][-1]["miou"], quantity, source, targets) for s, r in rows.get(row, {}).items()}

    missing = lambda *names: [n for n in names if n not in rows]  # noqa: E731
    out = {}
    # P1: one seed (the first both rows have) of frozen against frozen-2x
    if not missing("frozen", "frozen-2x") and set(rows["frozen"]) & set(rows["frozen-2x"]):
        seed = min(set(rows["frozen"]) & set(rows["frozen-2x"]))
        gap = final("frozen-2x", "source")[seed] - final("frozen", "source")[seed]
        out["P1"] = _check(gap, f"|frozen-2x - frozen| <= {_P1_MAX} (source, seed {seed})", abs(gap) <= _P1_MAX,
                           seed=seed)
    else:
        out["P1"] = _check(float("nan"), f"|frozen-2x - frozen| <= {_P1_MAX}", None, missing=missing("frozen", "frozen-2x"))
    if not missing("full", "frozen"):
        diff = paired_difference(final("full", "source"), final("frozen", "source"))
        ok = diff["mean"] >= _P2_MIN and (diff["n"] >= 2 and diff["mean"] >= _P2_SIGMAS * diff["sd"])
        out["P2"] = _check(diff["mean"], f">= {_P2_MIN} and >= {_P2_SIGMAS:g} x paired std", bool(ok), sd=diff["sd"],
                           n=diff["n"])
    else:
        out["P2"] = _check(float("nan"), f">= {_P2_MIN} and >= {_P2_SIGMAS:g} x paired std", None,
                           missing=missing("full", "frozen"))
    if not missing("frozen"):
        gap = mean_std(final("frozen", "source").values())[0] - mean_std(final("frozen", "target").values())[0]
        out["P3"] = _check(gap, f"frozen source - frozen target mean >= {_P3_MIN}", gap >= _P3_MIN)
    else:
        out["P3"] = _check(float("nan"), f"frozen source - frozen target mean >= {_P3_MIN}", None, missing=["frozen"])
    spreads = {row: mean_std(final(row, "target").values())[1] for row in rows
               if row not in ("scratch", "frozen-2x") and len(rows[row]) >= 2}
    worst = max(spreads, key=lambda r: spreads[r], default=None)
    value = spreads[worst] if worst is not None else float("nan")
    out["P4"] = _check(value, f"max std over seeds of the target mean <= {_P4_MAX} (rows with >= 2 seeds, except "
                       "scratch)", None if worst is None else bool(value <= _P4_MAX), worst_row=worst,
                       per_row=spreads)
    controls = {}
    for row in ("lp-ft", "wise-ft"):
        if not missing(row, "full"):
            controls[row] = paired_difference(final(row, "target"), final("full", "target"))
    if controls:
        best = max(controls, key=lambda r: controls[r]["mean"])
        beats = any(c["n"] >= 2 and c["low"] > 0 for c in controls.values())
        out["P5"] = _check(controls[best]["mean"], "LP-FT or WiSE-FT - Full on the target mean > 0 (interval)", beats,
                           best_row=best, intervals={r: {k: c[k] for k in ("mean", "low", "high", "n")}
                                                     for r, c in controls.items()})
    else:
        out["P5"] = _check(float("nan"), "LP-FT or WiSE-FT - Full on the target mean > 0", None,
                           missing=missing("lp-ft", "wise-ft", "full"))
    if not missing("frozen", "scratch"):
        diff = paired_difference(final("frozen", "target"), final("scratch", "target"))
        out["P6"] = _check(diff["mean"], f"frozen - scratch on the target mean >= {_P6_MIN}", diff["mean"] >= _P6_MIN,
                           low=diff["low"], high=diff["high"])
    else:
        out["P6"] = _check(float("nan"), f"frozen - scratch on the target mean >= {_P6_MIN}", None,
                           missing=missing("frozen", "scratch"))
    for key, check in out.items():
        check["description"] = PRECONDITIONS[key]
        check["gating"] = key in GATING
    return out


def selection_bias(records: Sequence[dict], source: str, targets: Sequence[str]) -> dict:
    """The bias of picking the checkpoint by the targets (as Rein's, SoMA's and GeCo's public configs do):
    per row, the best target mean over the evaluated iterations minus the last iteration's, mean and
    sample std over seeds. Rows with a single evaluated iteration are left out. Verdicts stay on the last."""
    out = {}
    for row, runs in _by_row(records).items():
        gains, best_at = [], []
        for s in sorted(runs):
            curve = runs[s]["curve"]
            if len(curve) < 2:
                break
            means = [run_value(p["miou"], "target", source, targets) for p in curve]
            k = max(range(len(means)), key=lambda i: means[i])
            gains.append(means[k] - means[-1])
            best_at.append(curve[k]["iteration"])
        else:
            if gains:
                mean, sd = mean_std(gains)
                out[row] = {"mean": mean, "sd": sd, "values": gains, "best_iteration": best_at}
    return out
