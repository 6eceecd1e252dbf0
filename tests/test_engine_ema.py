"""Weight EMA (train.ema): mmengine's convention in closed form, the tensors it averages for each method,
the trainer's use of it (validation, both final models), an exact resume, and no change with it off."""

import pytest
import torch
from test_baselines import tiny_cfg
from test_engine_support import tiny_config, weights

from dgss.config import ConfigError, load_config, validate_config
from dgss.engine import trainer as trainer_module
from dgss.engine.checkpoint import load_training_state, resolve_checkpoint
from dgss.engine.ema import WeightEMA
from dgss.engine.optim import build_optimizer
from dgss.engine.trainer import Trainer
from dgss.tuning.model import build_segmentor


def closed_form(history, momentum, begin_iter):
    """mmengine's EMAHook + ExponentialMovingAverage after len(history) iterations, summed out:
    a copy up to iteration b = max(begin_iter, 1), then (1 - m)^(T - b) w_b + sum_t m (1 - m)^(T - t) w_t."""
    T, b, m = len(history), max(begin_iter, 1), momentum
    if T <= b:
        return history[-1]
    total = (1 - m) ** (T - b) * history[b - 1]
    for t in range(b + 1, T + 1):
        total = total + m * (1 - m) ** (T - t) * history[t - 1]
    return total


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        self.frozen = torch.nn.Parameter(torch.ones(2, dtype=torch.float64), requires_grad=False)
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))


@pytest.mark.parametrize("begin_iter", [0, 1, 4])
def test_the_ema_of_a_known_sequence_is_the_closed_form(begin_iter):
    model, m = Tiny(), 0.3
    ema = WeightEMA(momentum=m, begin_iter=begin_iter)
    ema.track(model)
    assert list(ema.averages) == ["w"]  # trained tensors only: no frozen parameter, no buffer
    history = []
    for t in range(1, 10):
        with torch.no_grad():
            model.w.copy_(torch.tensor([t, t * t, (-1.0) ** t], dtype=torch.float64))
        history.append(model.w.detach().clone())
        ema.update(model, t)
        expected = closed_form(history, m, begin_iter)
        torch.testing.assert_close(ema.averages["w"], expected, rtol=1e-12, atol=1e-12)
        if t <= max(begin_iter, 1):
            assert torch.equal(ema.averages["w"], model.w)  # before it begins: a copy
    assert not torch.allclose(ema.averages["w"], model.w)
    # swapped in for evaluation, the raw weights come back bit for bit, also after an error
    raw, average = model.w.detach().clone(), ema.averages["w"].clone()
    with pytest.raises(RuntimeError, match="inside"):
        with ema.swapped(model):
            assert torch.equal(model.w, average)
            raise RuntimeError("inside")
    assert torch.equal(model.w, raw) and torch.equal(ema.averages["w"], average)
    assert ema.nbytes == 3 * 8


def test_mmengine_momentum_convention_and_config_checks(tmp_path):
    # momentum is the weight of the new value (mmengine), not the decay of the average
    model = Tiny()
    ema = WeightEMA(momentum=2e-4)
    ema.track(model)
    ema.update(model, 1)
    with torch.no_grad():
        model.w.fill_(1.0)
    ema.update(model, 2)
    torch.testing.assert_close(ema.averages["w"], torch.full((3,), 2e-4, dtype=torch.float64), rtol=1e-12, atol=0)
    cfg = load_config(tiny_config(tmp_path))
    assert (cfg.train.ema.enabled, cfg.train.ema.momentum, cfg.train.ema.begin_iter) == (False, 2e-4, 0)
    for key, value, message in (("momentum", 0, "must be in \\(0, 1\\]"), ("momentum", 1.5, "must be in"),
                                ("begin_iter", -1, "must be at least 0")):
        with pytest.raises(ConfigError, match=f"train.ema.{key}.*{message}"):
            validate_config(load_config(tiny_config(tmp_path), [f"train.ema.{key}={value}"]))


@pytest.mark.filterwarnings("ignore:method 'rein' supplies head queries")
@pytest.mark.parametrize("method, own", [
    ("fishertune", {"method.delta"}),  # the sparse values, not the entry indices (buffers)
    ("rein", {"method.reins.learnable_tokens_a", "method.reins.learnable_tokens_b", "method.reins.scale"}),
    ("soma", {"method.layers.blocks_1_attn_qkv.parts.0.a", "method.layers.blocks_1_attn_qkv.parts.2.b",
              "method.layers.blocks_3_mlp_fc2.bias"}),
    ("full", {"backbone.model.blocks.0.attn.qkv.weight", "backbone.model.pos_embed"}),
])
def test_it_averages_what_the_optimizer_trains_including_each_methods_own_state(method, own):
    cfg = tiny_cfg(method, "method.soma.rank=4", "method.soma.start_block=1")
    model = build_segmentor(cfg)
    optimizer = build_optimizer(model, cfg.train, cfg.method.backbone_lr_mult)
    ema = WeightEMA()
    ema.track(model, [p for g in optimizer.param_groups for p in g["params"]])
    trained = {n for n, p in model.named_parameters() if any(p is q for g in optimizer.param_groups for q in g["params"])}
    assert set(ema.averages) == trained and own <= trained
    assert any(n.startswith("head.") for n in ema.averages)
    buffers = {n for n, _ in model.named_buffers()}
    assert not set(ema.averages) & buffers  # FisherTune's entry_index, SoMA's a_init: taken from the model
    if method != "full":
        assert not [n for n in ema.averages if n.startswith("backbone.model.")]  # the frozen backbone is not copied


def run(tmp_path, name, **train):
    cfg = load_config(tiny_config(tmp_path, name, method="soma", **{"iters": 4, **train}),
                      ["method.soma.rank=4", "method.soma.start_block=1"])
    return Trainer(cfg)


def test_the_trainer_validates_and_saves_the_average_and_ema_off_changes_nothing(tmp_path, monkeypatch):
    m, begin = 0.3, 2
    trainer = run(tmp_path, "ema", eval_interval=2, checkpoint_interval=4,
                  ema={"enabled": True, "momentum": m, "begin_iter": begin})
    history, seen_in_validation = [], []
    original_step = trainer.train_step

    def recording_step(iteration):
        out = original_step(iteration)
        history.append({n: p.detach().clone().double() for n, p in trainer.model.named_parameters() if p.requires_grad})
        return out

    real_evaluate = trainer_module.evaluate_datasets

    def recording_evaluate(model, *args, **kwargs):
        seen_in_validation.append({n: p.detach().clone().double() for n, p in model.named_parameters()})
        return real_evaluate(model, *args, **kwargs)

    trainer.train_step = recording_step
    monkeypatch.setattr(trainer_module, "evaluate_datasets", recording_evaluate)
    final = trainer.train()
    run_dir = tmp_path / "runs" / "ema"
    ema_file, raw_file = weights(final), weights(run_dir / "model_final_raw.safetensors")
    assert final == run_dir / "model_final.safetensors"
    names = sorted(history[0])
    assert any(n.startswith("method.layers.") for n in names) and any(n.startswith("head.") for n in names)
    for name in names:
        expected = closed_form([h[name] for h in history], m, begin)
        torch.testing.assert_close(ema_file[name].double(), expected, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(raw_file[name].double(), history[-1][name]), name
        # validation at iteration 2 (before it begins: the weights) and 4 (the average)
        assert torch.equal(seen_in_validation[0][name], history[1][name])
        torch.testing.assert_close(seen_in_validation[1][name], expected, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(ema_file[n], raw_file[n]) for n in names)  # the files differ
    for key in ema_file:  # untrained tensors (buffers, the frozen start factors) are the model's
        if key not in history[0]:
            assert torch.equal(ema_file[key], raw_file[key]), key
    # the training state carries the averages, CPU tensors by name
    _, state_file = resolve_checkpoint(None, run_dir / "checkpoints")
    saved = load_training_state(state_file)["ema"]
    assert set(saved) == set(names) and torch.equal(saved[names[0]], ema_file[names[0]])

    # with EMA off: the same training bit for bit, the same files as before the option existed
    Trainer(load_config(tiny_config(tmp_path, "plain", method="soma", iters=4, eval_interval=2,
                                    checkpoint_interval=4), ["method.soma.rank=4", "method.soma.start_block=1"])).train()
    plain = tmp_path / "runs" / "plain"
    plain_final = weights(plain / "model_final.safetensors")
    assert plain_final.keys() == raw_file.keys()
    assert all(torch.equal(plain_final[k], raw_file[k]) for k in plain_final)
    assert not (plain / "model_final_raw.safetensors").exists()
    assert "ema" not in load_training_state(resolve_checkpoint(None, plain / "checkpoints")[1])


def test_resume_with_ema_is_bit_exact(tmp_path):
    ema = {"enabled": True, "momentum": 0.3, "begin_iter": 2}
    straight = run(tmp_path, "straight", iters=6, checkpoint_interval=3, ema=ema)
    straight.train()
    checkpoint = tmp_path / "runs" / "straight" / "checkpoints" / "iter_0000003.safetensors"
    assert set(load_training_state(checkpoint.with_suffix(".state.pt"))["ema"]) == set(straight.ema.averages)
    cfg = load_config(tiny_config(tmp_path, "resumed", method="soma", iters=6, checkpoint_interval=3, ema=ema),
                      ["method.soma.rank=4", "method.soma.start_block=1"])
    resumed = Trainer(cfg, resume=str(checkpoint))
    assert resumed.iteration == 3
    resumed.train()
    for name in ("model_final.safetensors", "model_final_raw.safetensors"):
        expected, actual = weights(tmp_path / "runs/straight" / name), weights(tmp_path / "runs/resumed" / name)
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), (name, key)
