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


def _step_counts(tmp_path, name, mode, checkpoint_calls, monkeypatch):
    """One training step with checkpointing ``mode``: loss, gradients, Rein refinements run (0 for other
    methods), block MLP calls, checkpoint calls."""
    from dgss.engine.speed import set_checkpointing
    from dgss.tuning.rein import Reins

    tmp_path.mkdir(exist_ok=True)
    trainer = _trainer(tmp_path, name)
    model = trainer.model
    set_checkpointing(model.backbone, mode)
    refinements, inner = [0], [0]
    refine = Reins.refine

    def counted(self, *args, **kwargs):
        refinements[0] += 1
        return refine(self, *args, **kwargs)

    monkeypatch.setattr(Reins, "refine", counted)
    for block in model.backbone.blocks:
        block.mlp.register_forward_hook(lambda *a: inner.__setitem__(0, inner[0] + 1))
    checkpoint_calls[0] = 0
    torch.manual_seed(0)
    losses, _ = trainer.train_step(0)
    monkeypatch.setattr(Reins, "refine", refine)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return model, losses["loss"], grads, refinements[0], inner[0], checkpoint_calls[0]


@pytest.mark.parametrize("method", ["rein", "vpt"])
def test_keep_mode_recomputes_the_blocks_but_runs_their_hooks_once(tmp_path, checkpoint_calls, monkeypatch, method):
    _, loss, grads, refined, _, _ = _step_counts(tmp_path / "plain", method, None, checkpoint_calls, monkeypatch)
    counts = {}
    for mode in ("replay", "keep"):
        model, loss_m, grads_m, refined_m, inner_m, ckpt_m = _step_counts(tmp_path / mode, method, mode,
                                                                          checkpoint_calls, monkeypatch)
        blocks = len(model.backbone.blocks)
        # every block's own forward is recomputed where a gradient passes; under "keep" none passes through
        # Rein's first block (its own forward has nothing to differentiate: only the hook after it does)
        assert ckpt_m == blocks and inner_m == 2 * blocks - int(mode == "keep" and method == "rein")
        counts[mode] = refined_m
        assert loss_m == pytest.approx(loss, rel=1e-6)
        assert grads_m.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grads_m[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    if method == "rein":  # Rein's refinement: once per block and step under "keep", again in the re-runs under "replay"
        assert refined == counts["keep"] == blocks
        assert counts["replay"] == 2 * blocks


def test_checkpoint_modes_keep_the_keys_switch_off_and_back_and_name_bad_values(tmp_path):
    from dgss.engine.speed import checkpoint_mode, set_checkpointing, without_checkpointing

    trainer = _trainer(tmp_path, "rein", "train.checkpoint_hooks=keep")
    backbone = trainer.model.backbone
    assert checkpoint_mode(backbone) == "keep" and not backbone.grad_checkpointing  # timm's own is off
    keys = list(trainer.model.state_dict())
    with without_checkpointing(backbone):
        assert checkpoint_mode(backbone) is None
        assert all("forward" not in block.__dict__ for block in backbone.blocks)
    assert checkpoint_mode(backbone) == "keep" and list(trainer.model.state_dict()) == keys
    set_checkpointing(backbone, "replay")
    assert backbone.grad_checkpointing and all("forward" not in block.__dict__ for block in backbone.blocks)
    with pytest.raises(ValueError, match="train.checkpoint_hooks.*'sometimes'"):
        set_checkpointing(backbone, "sometimes")
