"""Screen a pretraining recipe of the testbed's label-free foundation: a short run, its dense k-NN monitor.

    python benchmarks/bench_ssl_recipe.py OUT_DIR --pool-version 3 --views two_looks --iters 500

Runs ``dgss.testbed.ssl_foundation.pretrain_ssl_foundation`` with the shipped recipe updated by the
options, on one thread, and writes OUT_DIR/foundation.safetensors and its manifest (the monitor history:
the dense k-NN probe on the source look, a pool look and the validation family, never a target). The
recipe choices of docs/figures/testbed_log.md ("Designs tried") were screened so.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dgss.testbed.ssl_foundation import pretrain_ssl_foundation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder for the foundation file, its manifest and the resumable state")
    parser.add_argument("--iters", type=int, default=500)
    parser.add_argument("--pool-version", type=int, default=3)
    parser.add_argument("--views", choices=("one_look", "two_looks"), default="one_look")
    parser.add_argument("--objective", choices=("dino", "dino_ibot"), default="dino")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--monitor-every", type=int, default=250)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0, help="processes that render and crop ahead (GPU: 12+)")
    parser.add_argument("--stop-at", type=int, help="end this chunk at this iteration (state kept in OUT/state.pt)")
    parser.add_argument("--time-limit", type=float, help="end this chunk after this many seconds")
    args = parser.parse_args()
    overrides = {"pool_version": args.pool_version, "views": args.views, "ssl": {"objective": args.objective}}
    overrides.update({k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr)) if v is not None})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = pretrain_ssl_foundation(out / "foundation.safetensors", iters=args.iters, device=args.device,
                                   checkpoint=out / "state.pt", monitor_every=args.monitor_every, progress=False,
                                   overrides=overrides, log_every=50, workers=args.workers, stop_at=args.stop_at,
                                   time_limit=args.time_limit, snapshots=out / "snapshots")
    if path is None:
        return  # a chunk ended; the same command resumes it
    manifest = json.loads(path.with_suffix(".json").read_text())
    for row in manifest["monitor"]:
        print(json.dumps({k: v for k, v in row.items() if k == "iteration" or k.startswith("knn_")}))


if __name__ == "__main__":
    main()
