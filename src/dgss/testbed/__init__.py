"""The DG testbed: a small world where domain generalization with a foundation model can show.

Each part is one module:

* :mod:`dgss.testbed.world`: the worlds an experiment runs in (source, targets, validation family,
  label set, foundation, head): the demo's and the testbed's.
* :mod:`dgss.testbed.pool`: the unlabeled pretraining pool (appearance families, the held-out ones).
* :mod:`dgss.testbed.ssl`: the label-free objective (DINO self-distillation, iBOT) and its monitors.
* :mod:`dgss.testbed.ssl_foundation`: the label-free foundation ViT: its recipe, pretraining, the dense
  k-NN probe, the shipped file and manifest.
* :mod:`dgss.testbed.supervised_foundation`: the label-pretrained foundation of the demo's world.
* :mod:`dgss.testbed.experiment`: one (method, seed) experiment in a world, trained by the engine and
  evaluated as ``dgss eval`` does.
* :mod:`dgss.testbed.benchmark`: the rows and budgets, and many seeded runs, resumable run by run.
* :mod:`dgss.testbed.stats` and :mod:`dgss.testbed.report`: the preconditions, claims and intervals,
  and the written report.

``benchmarks/bench_dg.py`` runs it; ``dgss demo`` (:mod:`dgss.demo`) is one small use of it.
"""
