"""Exact quantiles of very large tensors (FisherTune's data scale, drfim.md "prior"): the
linear-interpolation quantile of torch.quantile, which refuses more than 2^24 elements (DINOv2-L has 304M
eligible entries).

    large_quantile(values, 0.9)                          # one tensor, any size
    streamed_quantile(lambda: iter(tensors), 0.9)         # the concatenation of positive tensors, never built

Both interpolate two order statistics. How they are found (``method``) changes the cost, never the
result: every method returns the k-th smallest value exactly (ties, signed zeros and all), tested
against ``kthvalue`` in tests/test_speed_quantile.py.

* ``"kthvalue"``: torch's selection. Fast on a CPU (quickselect); on CUDA a single-block select, about
  70 % of an estimate pass on an H200 (issue 38), so not used there by default.
* ``"sort"``: one radix sort (values and int64 indices: 12 bytes per entry beside the input).
* ``"bisect"``: bisection on order-preserving integer keys of the floats, counting ``keys <= mid``
  (32 counting passes for float32, 64 for float64; 5 bytes per entry: the keys and a comparison mask),
  the bounds kept on the device: one host read at the end, not one per pass. Memory-light; each pass is a
  bandwidth-bound reduction on a GPU.
* ``"auto"``: on a GPU "sort" up to 2^27 entries (1.5 GiB of sort buffers at most), "bisect" above;
  "kthvalue" elsewhere. benchmarks/gpu_check.py's speed section times the three on a GPU.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

__all__ = ["QUANTILE_METHODS", "SORT_LIMIT", "large_quantile", "kth_smallest", "order_keys", "streamed_quantile"]

QUANTILE_METHODS = ("auto", "kthvalue", "sort", "bisect")


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """Signed integers whose order is the floats' order: the IEEE bit pattern for x >= 0, the pattern with
    its magnitude bits flipped for x < 0 (int32 for float32 and narrower, int64 for float64). NaN has no
    place in the order: callers pass finite values."""
    if values.dtype == torch.float64:
        bits, magnitude = values.contiguous().view(torch.int64), 0x7FFFFFFFFFFFFFFF
    else:
        bits, magnitude = values.float().contiguous().view(torch.int32), 0x7FFFFFFF
    return torch.where(bits < 0, bits ^ magnitude, bits)


def _key_value(key: int, dtype: torch.dtype) -> float:
    """The float whose :func:`order_keys` key is ``key``."""
    if dtype == torch.float64:
        bits = key ^ 0x7FFFFFFFFFFFFFFF if key < 0 else key
        return float(torch.tensor(bits, dtype=torch.int64).view(torch.float64))
    bits = key ^ 0x7FFFFFFF if key < 0 else key
    return float(torch.tensor(bits, dtype=torch.int32).view(torch.float32))


# "auto" sorts on a GPU up to this many entries (values and int64 indices: 12 bytes each, plus the sort's
# own double buffer); larger tensors take the memory-light bisection
SORT_LIMIT = 2**27


def _bisect_keys(keys: torch.Tensor, rank: int) -> int:
    """The smallest key k with at least ``rank`` keys <= k (the rank-th smallest, 1-based), by bisection
    over the whole key range with the bounds on the keys' device (no host read until the end)."""
    wide = keys.dtype == torch.int64
    bits = 64 if wide else 32
    low = torch.full((), -(2 ** (bits - 1)), dtype=torch.int64, device=keys.device)
    high = torch.full((), 2 ** (bits - 1) - 1, dtype=torch.int64, device=keys.device)
    for _ in range(bits):  # the interval halves each time: 2^bits keys take `bits` steps
        mid = (low >> 1) + (high >> 1) + (low & high & 1)  # floor((low + high) / 2) without overflow
        enough = (keys <= mid.to(keys.dtype)).sum() >= rank
        high = torch.where(enough, mid, high)
        low = torch.where(enough, low, mid + 1)
    return int(low)


def kth_smallest(flat: torch.Tensor, k: int, method: str = "auto") -> float:
    """The k-th smallest entry (1-based) of a flat tensor of finite values, as a Python float."""
    if method not in QUANTILE_METHODS:
        raise ValueError(f"quantile method must be one of {', '.join(QUANTILE_METHODS)}, got {method!r}")
    if method == "auto":
        method = ("sort" if flat.numel() <= SORT_LIMIT else "bisect") if flat.is_cuda else "kthvalue"
    if method == "kthvalue":
        return float(flat.kthvalue(k).values)
    if method == "sort":
        return float(torch.sort(flat).values[k - 1])
    keys = order_keys(flat)
    return _key_value(_bisect_keys(keys, k), flat.dtype)


def large_quantile(values: torch.Tensor, q: float, method: str = "auto") -> float:
    """torch.quantile's linear-interpolation quantile of a tensor of any size (flattened)."""
    flat = values.reshape(-1)
    if flat.numel() == 0:
        raise ValueError("quantile of an empty tensor")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    position = q * (flat.numel() - 1)
    low, high = math.floor(position), math.ceil(position)
    low_value = kth_smallest(flat, low + 1, method)
    if high == low:
        return float(torch.tensor(low_value, dtype=torch.float64))
    high_value = kth_smallest(flat, high + 1, method)
    low64, high64 = torch.tensor(low_value, dtype=torch.float64), torch.tensor(high_value, dtype=torch.float64)
    return float(low64 + (high64 - low64) * (position - low))


def streamed_quantile(tensors: Callable[[], Iterator[torch.Tensor]], q: float) -> float:
    """:func:`large_quantile` of the concatenation of positive float tensors, without it: the two order
    statistics it interpolates are found by bisection on the float32 bit patterns (monotonic for positive
    floats), counting tensor by tensor. ``tensors()`` yields the tensors anew for every pass (about 31
    passes); the result is the same number."""
    total = sum(t.numel() for t in tensors())
    if total == 0:
        raise ValueError("quantile of an empty tensor")
    position = q * (total - 1)

    def count_at_most(bits: int) -> int:
        return sum(int((t.reshape(-1).float().view(torch.int32) <= bits).sum()) for t in tensors())

    lower = math.floor(position)
    low, high = 0, 0x7F800000  # bit patterns of 0.0 and +inf: the (lower + 1)-th smallest by bisection
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if count_at_most(mid) >= lower + 1 else (mid + 1, high)
    low_value = float(torch.tensor(low, dtype=torch.int32).view(torch.float32))
    high_value = low_value
    if math.ceil(position) != lower and count_at_most(low) < lower + 2:  # the next one is larger: the least above
        high_value = min(float(t[t > low_value].min()) for t in tensors() if bool((t > low_value).any()))
    return float(torch.tensor(low_value, dtype=torch.float64) + (high_value - low_value) * (position - lower))
