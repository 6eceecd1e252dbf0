"""Speed of the procedural street-scene generator (dgss.data.synthetic), per domain, on one core.

    python benchmarks/bench_synthetic.py [--size 128 256] [--images 300]

Reports images per second for each domain and, measured in the same run, the ratio to the "clean"
domain, plus the cost of one training sample (generation + the full augmentation recipe).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as the issue states the target

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dgss.config import DataConfig, DatasetConfig  # noqa: E402
from dgss.data import DOMAINS, build_dataset, generate  # noqa: E402


def images_per_second(fn, count: int) -> float:
    fn(0)  # warm-up: caches of noise fields
    start = time.perf_counter()
    for i in range(count):
        fn(i)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=2, default=[128, 256], metavar=("H", "W"))
    parser.add_argument("--images", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = tuple(args.size)

    rates = {d: images_per_second(lambda i, d=d: generate(d, i, size), args.images) for d in DOMAINS}
    print(f"generate() at {size[0]} x {size[1]}, one thread, {args.images} images per domain")
    for domain, rate in rates.items():
        print(f"  {domain:<11} {rate:7.0f} images/s   {rate / rates['clean']:.2f} x clean")
    print(f"  all domains  {np.mean(list(rates.values())):7.0f} images/s on average")

    data = DataConfig(crop_size=[size[0], size[0]], scales=[int(size[0] * s) for s in (0.75, 1.0, 1.5)])
    dataset = build_dataset(DatasetConfig(type="synthetic", options={"domain": "textured", "num_images": 10**6,
                                                                      "size": list(size)}), data, train=True)
    sample_rate = images_per_second(lambda i: dataset[i], args.images)
    print(f"training samples (generate + resize/crop/flip/photometric/normalise): {sample_rate:.0f} /s, "
          f"{sample_rate / rates['textured']:.2f} x generation alone")


if __name__ == "__main__":
    main()
