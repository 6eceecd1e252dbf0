"""Checkpointing that does not replay what need not be replayed (issue 38): no checkpointed block while
nothing in the backbone trains (Frozen; LPFT while it probes, checkpointed again once it fine-tunes), and
the plan's verdict on whether checkpointing is needed at all."""

import warnings

import pytest
import torch
import torch.utils.checkpoint
from test_engine_support import tiny_config

from dgss.config import load_config
from dgss.engine.memory_plan import GIB, plan_memory
from dgss.engine.speed import checkpointing_needed
from dgss.engine.trainer import Trainer


@pytest.fixture
def checkpoint_calls(monkeypatch):
    calls = [0]
    original = torch.utils.checkpoint.checkpoint

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    return calls


def _trainer(tmp_path, method, *overrides):
    cfg = load_config(tiny_config(tmp_path, method, method=method, iters=4, grad_checkpointing=True),
                      overrides=list(overrides))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Trainer(cfg)


@pytest.mark.parametrize("method,checkpointed", [("frozen", False), ("rein", True), ("full", True)])
def test_a_step_checkpoints_blocks_only_when_something_in_the_backbone_trains(tmp_path, checkpoint_calls, method,
                                                                             checkpointed):
    trainer = _trainer(tmp_path, method)
    assert checkpointing_needed(trainer.model) is checkpointed
    trainer.train_step(0)
    assert checkpoint_calls[0] == (len(trainer.model.backbone.blocks) if checkpointed else 0)
    assert trainer.model.backbone.grad_checkpointing  # the option stays on: it is skipped, not removed


def test_lpft_is_checkpointed_once_it_fine_tunes_the_backbone(tmp_path, checkpoint_calls):
    trainer = _trainer(tmp_path, "lp-ft", "method.lpft.probe_fraction=0.5")
    method = trainer.model.method
    method.on_train_iteration(0, trainer)  # probing: the backbone is frozen
    trainer.train_step(0)
    assert checkpoint_calls[0] == 0
    method.on_train_iteration(2, trainer)  # fine-tuning: every backbone tensor trains
    trainer.rebuild_optimizer()
    assert checkpointing_needed(trainer.model)
    trainer.train_step(2)
    assert checkpoint_calls[0] == len(trainer.model.backbone.blocks)


def test_the_plan_says_whether_checkpointing_is_needed(tmp_path):
    from dgss.engine.memory_plan import Planner

    cfg = load_config(tiny_config(tmp_path, "full", method="full"))
    planner = Planner(cfg, device="cpu")
    assert plan_memory(cfg, device="cpu", variants=False, planner=planner).checkpointing is None  # no GPU size
    assert plan_memory(cfg, device="cpu", gpu_memory=64 * GIB, variants=False, planner=planner).checkpointing == \
        "not needed"
    plain = planner.plan(grad_checkpointing=False).training_peak
    checkpointed = planner.plan(grad_checkpointing=True).training_peak
    assert checkpointed < plain
    between = GIB + (plain + checkpointed) // 2  # usable: the size less its 1 GiB reserve
    assert plan_memory(cfg, device="cpu", gpu_memory=between, variants=False, planner=planner).checkpointing == \
        "needed"
    assert plan_memory(cfg, device="cpu", gpu_memory=GIB + checkpointed // 2, variants=False,
                       planner=planner).checkpointing == "not enough"
    frozen = plan_memory(load_config(tiny_config(tmp_path, "frozen", method="frozen")), device="cpu",
                         gpu_memory=64 * GIB, variants=False)
    assert frozen.checkpointing == "no effect"
