"""train.tf32 and train.fused_adamw (issue 38): the flags really set, false giving torch's defaults (the
numerics before the options), the setting in each run's config and log, and fused/foreach AdamW taking
the same steps as torch's per-tensor loop."""

import copy
import subprocess
import sys
import warnings

import pytest
import torch
import yaml
from test_engine_support import tiny_config

from dgss.config import load_config
from dgss.engine.optim import adamw_implementation, build_optimizer, load_optimizer_state_by_name, \
    optimizer_state_by_name
from dgss.engine.trainer import Trainer
from dgss.precision import apply_tf32, describe_precision, tf32_state


@pytest.fixture(autouse=True)
def _restore_flags():
    before = tf32_state()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before["matmul"], before["cudnn"]


def fresh_process_flags() -> dict:
    code = "import torch; print(torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return {"matmul": out[0] == "True", "cudnn": out[1] == "True"}


def test_tf32_on_a_gpu_sets_both_flags_and_false_restores_a_fresh_process_defaults():
    assert apply_tf32(True, "cuda") == {"matmul": True, "cudnn": True}
    assert torch.get_float32_matmul_precision() == "high"  # what the matmul flag means to torch
    assert apply_tf32(False, "cuda") == fresh_process_flags()  # the numerics before train.tf32, bit for bit
    assert torch.get_float32_matmul_precision() == "highest"
    assert "fp32 matmuls full fp32" in describe_precision("none", "cuda")


def test_tf32_leaves_a_cpu_as_it_is_and_refuses_non_booleans():
    before = tf32_state()
    assert apply_tf32(True, torch.device("cpu")) == before
    assert describe_precision("none", "cpu").startswith("precision: fp32 on cpu")
    with pytest.raises(ValueError, match="train.tf32.*'yes'"):
        apply_tf32("yes", "cuda")


def test_a_run_records_tf32_in_its_config_and_log(tmp_path, capsys):
    cfg = load_config(tiny_config(tmp_path, iters=1), overrides=["train.tf32=false"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(cfg)
    trainer.train()
    saved = yaml.safe_load((cfg.run_dir / "config.yaml").read_text())
    assert saved["train"]["tf32"] is False and saved["train"]["fused_adamw"] is True
    assert "precision: fp32 on cpu" in capsys.readouterr().out  # the run's log (stdout)
    assert load_config(None).train.tf32 is True  # on by default


def _params():
    torch.manual_seed(0)
    return [torch.randn(31, 17, requires_grad=True), torch.randn(17, requires_grad=True), torch.randn(5, 3, 2)]


def _run(kind: dict, steps: int = 6, params=None, optimizer=None):
    params = params or [p.detach().clone().requires_grad_() for p in _params()]
    groups = [{"params": params[:2], "weight_decay": 0.05}, {"params": params[2:], "weight_decay": 0.0}]
    optimizer = optimizer or torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.999), **kind)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
    return params, optimizer


def test_foreach_adamw_is_torch_loop_bit_for_bit_and_fused_within_rounding():
    loop, _ = _run({})
    foreach, _ = _run(adamw_implementation([{"params": loop}], True))  # a CPU: foreach
    assert adamw_implementation([{"params": loop}], True) == {"foreach": True}
    assert adamw_implementation([{"params": loop}], False) == {}
    fused, _ = _run({"fused": True})  # the CUDA choice; torch also has a fused CPU kernel to compare with
    for a, b, c in zip(loop, foreach, fused):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-7)


def test_fused_adamw_resumes_from_a_foreach_state_by_name():
    class Holder(torch.nn.Module):
        def __init__(self, params):
            super().__init__()
            self.a, self.b, self.c = (torch.nn.Parameter(p.detach().clone()) for p in params)

    source = Holder(_params())
    _, optimizer = _run({"foreach": True}, steps=3, params=list(source.parameters()))
    saved = copy.deepcopy(optimizer_state_by_name(optimizer, source))  # as read back from a file
    # continue the same run with foreach, and a copy resumed into a fused optimizer
    target = Holder(list(source.parameters()))
    groups = [{"params": [target.a, target.b], "weight_decay": 0.05}, {"params": [target.c], "weight_decay": 0.0}]
    fused = torch.optim.AdamW(groups, lr=3e-3, fused=True)
    assert load_optimizer_state_by_name(fused, target, saved) == {}
    assert all(s["step"].device == p.device for p, s in fused.state.items())
    continued, _ = _run({}, steps=3, params=list(source.parameters()), optimizer=optimizer)
    resumed, _ = _run({}, steps=3, params=list(target.parameters()), optimizer=fused)
    for a, b in zip(continued, resumed):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_build_optimizer_picks_foreach_on_a_cpu_and_the_default_when_off(tmp_path):
    cfg = load_config(tiny_config(tmp_path))
    from dgss.tuning.model import build_segmentor

    model = build_segmentor(cfg)
    assert build_optimizer(model, cfg.train, 1.0).param_groups[0]["foreach"] is True
    cfg.train.fused_adamw = False
    assert build_optimizer(model, cfg.train, 1.0).param_groups[0]["foreach"] is None


def _step_temporary(kind: dict) -> int:
    """Bytes AdamW's second step allocates and frees (its moments exist after the first), measured."""
    from dgss.engine.memory_probe import LiveBytes

    params = [torch.randn(64, 32, requires_grad=True), torch.randn(128, requires_grad=True)]
    optimizer = torch.optim.AdamW(params, lr=1e-3, **kind)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    with LiveBytes() as tracker:
        optimizer.step()
    return tracker.phases[-1].total


def test_the_planner_counts_the_temporary_of_the_adamw_that_runs(tmp_path):
    from dgss.engine.memory_plan import Planner

    state_sized, largest = (64 * 32 + 128) * 4, 64 * 32 * 4
    assert _step_temporary({"foreach": True}) >= state_sized  # foreach: the second moments' sqrt, all at once
    assert _step_temporary({"foreach": False}) <= 2 * largest  # the loop: one tensor's at a time
    assert _step_temporary({"fused": True}) < largest // 4  # fused: in place
    cfg = load_config(tiny_config(tmp_path))
    gpu, cpu = Planner(cfg, device="cuda"), Planner(cfg, device="cpu")
    assert gpu._optimizer_transient(1) == 0  # fused on CUDA
    # foreach: the sqrt of one parameter group's second moments at a time, the largest group's bytes
    assert gpu._optimizer_transient(8) == -(-max(gpu.group_bytes) // 8)  # FSDP: foreach
    assert cpu._optimizer_transient(1) == max(cpu.group_bytes)  # foreach on a CPU
    for planner in (gpu, cpu):
        planner.cfg.train.fused_adamw = False
    assert gpu._optimizer_transient(1) == max(gpu.group_bytes)  # torch's own choice on CUDA: foreach
    assert cpu._optimizer_transient(1) == 2 * cpu.largest_trainable  # torch's own on a CPU: the loop
