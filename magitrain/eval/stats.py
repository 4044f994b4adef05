"""Aggregates of per-clip metrics with seeded bootstrap confidence intervals."""

from __future__ import annotations

import math

import numpy as np

RESAMPLES = 2000


def bootstrap(values, seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """`{"mean": x, "ci95": [lo, hi], "n": k}` of the numbers in `values` (None and NaN left out):
    the 2.5th and 97.5th percentiles of the means of `resamples` resamples with replacement,
    seeded (the same values give the same interval). No values: mean and bounds None; one value:
    an interval of width 0 (nothing to resample)."""
    kept = np.array([float(v) for v in values if v is not None and not math.isnan(float(v))])
    if not len(kept):
        return {"mean": None, "ci95": [None, None], "n": 0}
    rng = np.random.default_rng(seed)
    means = kept[rng.integers(0, len(kept), (resamples, len(kept)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(kept.mean()), "ci95": [float(low), float(high)], "n": int(len(kept))}


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def aggregate(clips: dict[str, dict], seed: int = 0) -> dict[str, dict]:
    """`{metric: bootstrap(...)}` over the clips' numeric metrics (an errored clip's other metrics
    count; its missing ones do not)."""
    names = sorted({key for row in clips.values() for key, value in row.items() if is_number(value)})
    return {name: bootstrap([row.get(name) for row in clips.values()], seed) for name in names}


def paired_deltas(a: dict[str, dict], b: dict[str, dict], seed: int = 0) -> dict[str, dict]:
    """`{metric: bootstrap(b - a)}` over the clips both have, each metric over the clips where it is
    a number on both sides: the CI of the mean paired difference."""
    deltas: dict[str, list[float]] = {}
    for clip in sorted(set(a) & set(b)):
        for name, value in a[clip].items():
            other = b[clip].get(name)
            if is_number(value) and is_number(other):
                deltas.setdefault(name, []).append(other - value)
    return {name: bootstrap(values, seed) for name, values in sorted(deltas.items())}
