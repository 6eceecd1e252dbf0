"""train.grad_checkpointing and train.compile: the same losses and gradients as without them, the option
really in effect, and clear errors.

Checkpointing is checked by counting block calls: with it, every block runs a second time during the
backward pass (the recomputation); without it, once. torch.compile is tested through the ``aot_eager``
backend (dynamo tracing, hooks included, and AOT autograd, as in real training): inductor's C++
compilation of even a tiny model costs minutes on a small CPU, and it changes nothing about how the
trainer applies compile."""

import warnings

import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file
from test_engine_support import tiny_config

from dgss.config import load_config
from dgss.engine.speed import CompileError, compile_errors, compile_segmentor, is_compiled
from dgss.engine.trainer import Trainer
from dgss.models.backbones import build_backbone

METHOD_OVERRIDES = ["method.fishertune.warmup_iters=0", "method.fishertune.selection=random",
                    "method.vpt.num_tokens=3", "method.soma.start_block=1"]


@pytest.fixture(autouse=True)
def _dynamo_state():
    import torch._dynamo as dynamo

    # compile_segmentor sets this global; keep it from leaking into other tests of the worker
    with dynamo.config.patch(skip_nnmodule_hook_guards=dynamo.config.skip_nnmodule_hook_guards):
        yield
    dynamo.reset()


def _count_block_calls(backbone) -> list[int]:
    calls = [0]
    for block in backbone.blocks:
        block.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


def _one_step(tmp_path, method, head, **train):
    """A tiny trainer after one optimizer step: (loss, gradients by name, block calls in the step)."""
    cfg = load_config(tiny_config(tmp_path, f"{method}_{len(train)}", head=head, method=method, iters=1, **train),
                      overrides=METHOD_OVERRIDES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(cfg)
    if method == "fishertune":  # stage 3 from the first step: selected entries, sparse hooks active
        trainer.model.method.on_train_iteration(0, trainer)
        assert trainer.model.method.is_selected and int(trainer.model.method.num_active) > 0
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # a delta away from zero, so the forward really uses theta_pt + delta
            trainer.model.method.delta.copy_(0.05 * torch.randn(trainer.model.method.delta.shape, generator=gen))
    calls = _count_block_calls(trainer.model.backbone)
    losses, _ = trainer.train_step(0)
    grads = {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return trainer, losses["loss"], grads, calls[0]


@pytest.mark.parametrize("method,head", [("full", "fpn"), ("rein", "mask2former"), ("fishertune", "fpn"),
                                         ("lora", "fpn"), ("vpt", "fpn"), ("soma", "fpn"), ("frozen", "fpn")])
def test_grad_checkpointing_gives_the_same_step_and_recomputes_every_block(tmp_path, method, head):
    plain, loss, grads, calls = _one_step(tmp_path, method, head)
    ckpt, loss_ckpt, grads_ckpt, calls_ckpt = _one_step(tmp_path, method, head, grad_checkpointing=True)
    assert ckpt.model.backbone.grad_checkpointing and not plain.model.backbone.grad_checkpointing
    blocks = len(plain.model.backbone.blocks)
    assert calls == blocks
    # the backward pass re-ran every block (hooks included); the frozen backbone runs without autograd
    # (SoMA's frozen first block, start_block 1, has nothing to differentiate: it is not re-run)
    assert calls_ckpt == (blocks if method == "frozen" else 2 * blocks - (method == "soma"))
    assert loss_ckpt == pytest.approx(loss, rel=1e-6, abs=1e-7)
    assert grads_ckpt.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # the method's own tensors (inside the blocks for Rein, VPT, LoRA; FisherTune's delta; Full's
    # backbone) got gradients through the checkpointed blocks
    backbone_side = [g for n, g in grads_ckpt.items() if not n.startswith("head.")]
    if method == "frozen":
        assert not backbone_side
    else:
        assert backbone_side and any(g.abs().sum() > 0 for g in backbone_side)


def test_a_methods_own_passes_run_without_checkpointing(tmp_path):
    """FisherTune's estimate takes its gradients after functional_call and the x' context have exited, so
    a recomputation there would use other weights and inputs: the trainer turns checkpointing off for
    ``on_train_iteration`` and the selection, hence the training, is the same as without checkpointing."""
    estimate = ["method.fishertune.warmup_iters=1", "method.fishertune.num_batches=2"]
    methods = []
    for name, train in (("plain", {}), ("ckpt", {"grad_checkpointing": True})):
        cfg = load_config(tiny_config(tmp_path, name, method="fishertune", iters=3, **train), overrides=estimate)
        trainer = Trainer(cfg)
        seen = []
        on_iteration = trainer.model.method.on_train_iteration

        def record(iteration, trainer, on_iteration=on_iteration, seen=seen):
            seen.append(trainer.model.backbone.grad_checkpointing)
            on_iteration(iteration, trainer)

        trainer.model.method.on_train_iteration = record
        trainer.train()
        assert seen == [False] * 3 and trainer.model.backbone.grad_checkpointing == bool(train)
        methods.append(trainer.model.method)
    plain, ckpt = methods
    assert ckpt.is_selected and torch.equal(ckpt.entry_index, plain.entry_index)
    torch.testing.assert_close(ckpt.delta, plain.delta, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ["dinov2_s_reg", "eva02_l", "dinov3_s", "clip_l", "sam_b", "convnext_l", "resnet50"])
def test_every_family_checkpoints_its_blocks_through_forward_intermediates(name):
    backbone = build_backbone(name, img_size=64, **tiny_overrides(name))
    calls = _count_block_calls(backbone)
    images = torch.randn(2, 3, 64, 64)
    results = []
    for enable in (False, True):
        backbone.set_grad_checkpointing(enable)
        backbone.zero_grad(set_to_none=True)
        calls[0] = 0
        feats = backbone(images)
        sum(f.square().mean() for f in feats).backward()
        results.append((calls[0], {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}))
    (calls_off, grads_off), (calls_on, grads_on) = results
    blocks = len(backbone.blocks)
    assert (calls_off, calls_on) == (blocks, 2 * blocks)
    assert grads_on.keys() == grads_off.keys()
    for key, grad in grads_off.items():
        torch.testing.assert_close(grads_on[key], grad, rtol=1e-5, atol=1e-7, msg=key)


def test_grad_checkpointing_is_non_reentrant_and_refusals_are_clear(monkeypatch):
    import timm.layers.config

    backbone = build_backbone("dinov2_s", img_size=64, **tiny_overrides("dinov2_s"))
    monkeypatch.setattr(timm.layers.config, "_USE_REENTRANT_CKPT", True)  # as TIMM_REENTRANT_CKPT=1 does
    with pytest.warns(UserWarning, match="non-reentrant"):
        backbone.set_grad_checkpointing(True)
    assert timm.layers.config.use_reentrant_ckpt() is False
    # a frozen backbone (nothing before block 0 requires grad) still passes gradients to a parameter
    # used inside a block, which reentrant checkpointing would drop
    backbone.requires_grad_(False)
    extra = torch.nn.Parameter(torch.zeros(backbone.embed_dim))
    backbone.blocks[1].register_forward_hook(lambda module, args, out: out + extra)
    sum(f.sum() for f in backbone(torch.randn(1, 3, 64, 64))).backward()
    assert extra.grad is not None and extra.grad.abs().sum() > 0

    def refuse(enable=True):
        raise AssertionError("not for this model")

    monkeypatch.setattr(backbone.model, "set_grad_checkpointing", refuse)
    with pytest.raises(ValueError, match="does not support activation checkpointing.*train.grad_checkpointing=false"):
        backbone.set_grad_checkpointing(True)


def test_compiled_training_matches_eager_and_keeps_the_checkpoint_keys(tmp_path):
    from torch._dynamo.utils import counters

    def run(name, **train):
        """One step by hand (loss, gradients), then train() for the second step, validation and the final file."""
        cfg = load_config(tiny_config(tmp_path, name, head="mask2former", method="rein", iters=2, eval_interval=2,
                                      **train))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = Trainer(cfg)
            losses, _ = trainer.train_step(0)
            grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
            trainer.iteration = 1
            final = trainer.train()
        return trainer, losses, grads, final

    eager, eager_losses, eager_grads, eager_file = run("eager")
    counters.clear()
    compiled, losses, grads, compiled_file = run("compiled", compile=True, compile_backend="aot_eager",
                                                 grad_checkpointing=True)
    assert is_compiled(compiled.model.backbone) and is_compiled(compiled.model.head)
    assert not is_compiled(compiled.model) and not is_compiled(eager.model.backbone)
    assert counters["stats"]["unique_graphs"] >= 2  # dynamo really traced (backbone and head at least)
    for key, value in eager_losses.items():
        assert losses[key] == pytest.approx(value, rel=1e-5), key
    # the same gradients, Rein's hooks traced, up to float reassociation: absolute to the largest
    # gradient (a bias before a GroupNorm has a true gradient of 0 and gets rounding noise either way)
    assert grads.keys() == eager_grads.keys()
    scale = max(g.abs().max().item() for g in eager_grads.values())
    for key, grad in eager_grads.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-4, atol=1e-5 * scale, msg=key)
    # compiled in place: the same state-dict keys and model file
    assert compiled.model.state_dict().keys() == eager.model.state_dict().keys()
    assert load_file(str(compiled_file)).keys() == load_file(str(eager_file)).keys()
    assert torch.isfinite(torch.stack([p.detach().sum() for p in compiled.model.parameters()])).all()
    assert compiled.validate() == pytest.approx(eager.validate(), abs=1e-3)  # inference through the compiled modules


def test_compile_refusals_and_failures_name_the_option(tmp_path):
    cfg = load_config(tiny_config(tmp_path, "bad", iters=1, compile=True, compile_backend="no_such_backend"))
    with pytest.raises(CompileError, match="train.compile_backend: unknown torch.compile backend 'no_such_backend'"):
        Trainer(cfg)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

    with pytest.raises(CompileError, match="train.compile_mode='max-autotune' applies to the inductor backend only"):
        compile_segmentor(Tiny(), mode="max-autotune", backend="aot_eager")

    from torch._dynamo import register_backend

    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler")

    register_backend(broken, "dgss_test_broken")
    model = Tiny()
    compile_segmentor(model, backend="dgss_test_broken")
    train = load_config(tiny_config(tmp_path, "broken", compile=True, compile_backend="dgss_test_broken")).train
    with pytest.raises(CompileError, match=r"train.compile \(backend 'dgss_test_broken'.*no C\+\+ compiler.*"
                                           r"train.compile=false"):
        with compile_errors(train):
            model.head(model.backbone(torch.randn(2, 4)))


def test_ddp_with_grad_checkpointing_equals_one_plain_process(tmp_path):
    """Two gloo processes with checkpointing (DDP's gradient hooks fire during the recomputing backward,
    find_unused_parameters on) train the same weights as one process with the doubled batch without."""
    from test_engine_ddp import TORCHRUN
    from test_engine_support import run_python, weights

    single = tiny_config(tmp_path, "single", batch_size=2, iters=2)
    ddp = tiny_config(tmp_path, "ddp", batch_size=1, iters=2, grad_checkpointing=True)
    one = run_python("-m", "dgss", "train", str(single))
    assert one.returncode == 0, one.stderr
    two = run_python(*TORCHRUN, "-m", "dgss", "train", str(ddp))
    assert two.returncode == 0, two.stderr
    expected = weights(tmp_path / "runs/single/model_final.safetensors")
    actual = weights(tmp_path / "runs/ddp/model_final.safetensors")
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-4, atol=1e-6, msg=key)
