"""Hardening from a new user's audit (issue 17, part A): TorchScript weights read without running them,
a new run never mixing with an old one in its folder, `dgss compare` never reusing stale results,
`dgss eval` keeping each finished dataset, and NaN handling that never leaves an unusable model."""

import collections
import json
import os
import pickle
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_engine_support import tiny_config
from torch import nn

import dgss
from conftest import TINY_VIT
from dgss.cli import main
from dgss.config import load_config
from dgss.models.backbone_weights import BackboneWeightsError, read_state_dict
from dgss.models.backbones import build_backbone
from dgss.tuning.model import build_segmentor
from dgss.models.torchscript_weights import read_torchscript_state_dict
from dgss.predict.loading import CheckpointError

# --------------------------------------------------------------------------------------------
# 2. TorchScript weights files are taken apart, never run
# --------------------------------------------------------------------------------------------


class ResidualAttentionBlock(nn.Module):
    """OpenAI CLIP's block, tiny: the attribute names its state dict is known by."""

    def __init__(self, width: int, heads: int, attn_mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(collections.OrderedDict(
            [("c_fc", nn.Linear(width, 4 * width)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)
        self.attn_mask = attn_mask  # a plain tensor attribute: not part of the state dict

    def forward(self, x):
        x = x + self.attn(self.ln_1(x), self.ln_1(x), self.ln_1(x), need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, attn_mask=None):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    def __init__(self, patch: int, width: int, layers: int, heads: int, grid: int, output_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, output_dim))

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(2, 0, 1)
        return self.ln_post(self.transformer(self.ln_pre(x)))


class TinyCLIP(nn.Module):
    """The names of OpenAI's ``ViT-*.pt`` modules (a text side with a causal mask attribute, fp16 tensors)."""

    def __init__(self, width=32, layers=2, heads=2, patch=14, grid=4):
        super().__init__()
        self.visual = VisionTransformer(patch, width, layers, heads, grid, output_dim=16)
        mask = torch.full((5, 5), float("-inf")).triu(1)
        self.transformer = Transformer(16, 1, 2, attn_mask=mask)
        self.token_embedding = nn.Embedding(10, 16)
        self.logit_scale = nn.Parameter(torch.ones([]) * 4.6)
        self.register_buffer("input_resolution", torch.tensor(56))

    def forward(self, x):
        return self.visual(x)


class Pair:
    """A TorchScript class (not a module): an attribute of it is not part of the state dict."""

    def __init__(self, a: torch.Tensor, b: int):
        self.a = a
        self.b = b


class WithPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.pair = Pair(torch.ones(2), 3)

    def forward(self, x):
        return self.lin(x) + self.pair.a


def scripted_archive(module: nn.Module, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        torch.jit.save(torch.jit.script(module), str(path))
    return path


def openai_layout(source) -> TinyCLIP:
    """A TinyCLIP whose visual tensors are the timm CLIP backbone's, as OpenAI's file stores them."""
    clip = TinyCLIP(width=TINY_VIT["embed_dim"], layers=TINY_VIT["depth"], heads=TINY_VIT["num_heads"])
    sd = source.model.state_dict()
    visual = clip.visual
    with torch.no_grad():
        visual.conv1.weight.copy_(sd["patch_embed.proj.weight"])
        visual.class_embedding.copy_(sd["cls_token"].reshape(-1))
        visual.positional_embedding.copy_(sd["pos_embed"][0])
        for ours, theirs in (("ln_pre", "norm_pre"), ("ln_post", "norm")):
            getattr(visual, ours).weight.copy_(sd[f"{theirs}.weight"])
            getattr(visual, ours).bias.copy_(sd[f"{theirs}.bias"])
        for i, block in enumerate(visual.transformer.resblocks):
            p = f"blocks.{i}."
            block.attn.in_proj_weight.copy_(sd[p + "attn.qkv.weight"])
            block.attn.in_proj_bias.copy_(sd[p + "attn.qkv.bias"])
            block.attn.out_proj.weight.copy_(sd[p + "attn.proj.weight"])
            block.attn.out_proj.bias.copy_(sd[p + "attn.proj.bias"])
            for ours, theirs in (("ln_1", "norm1"), ("ln_2", "norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                module = block.get_submodule(ours)
                module.weight.copy_(sd[f"{p}{theirs}.weight"])
                module.bias.copy_(sd[f"{p}{theirs}.bias"])
    return clip.half()  # OpenAI's files are fp16


@pytest.fixture
def no_torchscript_loading(monkeypatch):
    """Any route through torch.jit's loader (which runs the archive's code) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load was called on a weights file")

    monkeypatch.setattr(torch.jit, "load", refuse)
    monkeypatch.setattr(torch._C, "import_ir_module", refuse)


def test_torchscript_archive_gives_the_modules_exact_state_dict_without_running_it(tmp_path):
    clip = TinyCLIP()
    for p in clip.parameters():
        p.data.normal_()
    clip.visual.proj.data = clip.visual.proj.data.half()  # mixed dtypes, as in real files
    path = scripted_archive(clip, tmp_path / "ViT-T-14.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = torch.jit.load(str(path)).state_dict()  # the reference, here only, on our own file
    torch_jit_load = torch.jit.load
    try:
        torch.jit.load = None  # the reader must not need it
        got = read_torchscript_state_dict(path)
    finally:
        torch.jit.load = torch_jit_load
    assert list(got) == list(expected) == list(clip.state_dict())  # names and state_dict() order
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in got and "visual.conv1.weight" in got
    assert not any(k.endswith("attn_mask") for k in got)  # a plain attribute, not a parameter or buffer
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(Pair)
    pair = read_torchscript_state_dict(scripted_archive(WithPair(), tmp_path / "pair.pt"))
    assert list(pair) == ["lin.weight", "lin.bias"]


def test_openai_clip_archive_loads_into_the_clip_backbone(tmp_path, no_torchscript_loading):
    source = build_backbone("clip_l", img_size=56, patch_size=14, **TINY_VIT)
    path = scripted_archive(openai_layout(source), tmp_path / "ViT-L-14.pt")
    loaded = build_backbone("clip_l", img_size=56, patch_size=14, weights=str(path), **TINY_VIT)
    expected = source.model.state_dict()
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, expected[key].half().float(), msg=key)  # through fp16, as the file


class Sentinel(nn.Module):
    """A module whose TorchScript ``__setstate__`` changes its weights when the archive is loaded."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return x + self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        self.weight = state[0] + 7.0  # the archive's code, run by torch.jit.load
        self.training = state[1]


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Sentinel()

    def forward(self, x):
        return self.inner(x)


class RunsCommand:
    """Unpickling this calls os.system: what a crafted data.pkl does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo ran > {self.marker}",)


def crafted_archive(tmp_path, marker):
    """A real TorchScript archive whose data.pkl is replaced by a pickle that runs a shell command."""
    legit = scripted_archive(nn.Linear(2, 2), tmp_path / "legit.pt")
    path = tmp_path / "crafted.pt"
    with zipfile.ZipFile(legit) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                data = pickle.dumps(RunsCommand(marker), protocol=2)
            dst.writestr(info, data)
    return path


def test_archive_code_is_never_run_and_is_refused(tmp_path, no_torchscript_loading):
    setstate = scripted_archive(Holder(), tmp_path / "setstate.pt")
    with pytest.raises(BackboneWeightsError, match=r"setstate.pt.*custom state.*__setstate__"):
        read_state_dict(setstate)
    marker = tmp_path / "ran.txt"
    crafted = crafted_archive(tmp_path, marker)
    with pytest.raises(BackboneWeightsError, match=r"crafted.pt.*names posix.system.*refused"):
        read_state_dict(crafted)
    assert not marker.exists()


def test_every_weights_entry_point_refuses_a_crafted_archive(tmp_path, capsys, no_torchscript_loading):
    marker = tmp_path / "ran.txt"
    crafted = crafted_archive(tmp_path, marker)
    config = tiny_config(tmp_path, "ts", method="frozen")
    cfg = load_config(config)
    plain = tmp_path / "plain.safetensors"  # a dgss segmentor's state dict without the backbone's tensors
    save_file({k: v.contiguous() for k, v in build_segmentor(cfg).state_dict().items()
               if not k.startswith("backbone.model.")}, str(plain))
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)

    with pytest.raises(BackboneWeightsError, match="crafted.pt"):  # build_backbone(weights=)
        build_backbone("dinov2_s", img_size=64, weights=str(crafted), **TINY_VIT)
    with pytest.raises(BackboneWeightsError, match="crafted.pt"):  # model.weights
        build_segmentor(load_config(config, [f"model.weights={crafted}"]))
    with pytest.raises(CheckpointError, match="crafted.pt"):  # dgss.load(..., config=)
        dgss.load(crafted, config=config)
    with pytest.raises(BackboneWeightsError, match="crafted.pt"):  # dgss.load(..., backbone_weights=)
        dgss.load(plain, config=config, backbone_weights=crafted)
    status = main(["predict", str(image), "--out", str(tmp_path / "out"), "--no-progress", "--checkpoint",
                   str(crafted), "--config", str(config)])
    err = capsys.readouterr().err
    assert status == 2 and "crafted.pt" in err and "posix.system" in err
    status = main(["predict", str(image), "--out", str(tmp_path / "out"), "--no-progress", "--checkpoint", str(plain),
                   "--config", str(config), "--backbone-weights", str(crafted)])
    err = capsys.readouterr().err
    assert status == 2 and "crafted.pt" in err and "posix.system" in err
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# 1. A new run never mixes with an earlier one in its folder; `last` never names a missing file
# --------------------------------------------------------------------------------------------


def folder_snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_new_run_in_a_used_run_folder_is_refused_and_changes_nothing(tmp_path, capsys):
    config = tiny_config(tmp_path, "used", iters=2, checkpoint_interval=1, keep_checkpoints=1)
    assert main(["train", str(config)]) == 0
    run = tmp_path / "runs" / "used"
    before = folder_snapshot(run)
    capsys.readouterr()
    # the repro: the same name again, another lr, without --resume
    assert main(["train", str(config), "train.lr=5e-4"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert str(run) in err and "already holds a training run" in err and "--resume" in err
    assert "name=" in err and "output_dir=" in err
    assert folder_snapshot(run) == before  # nothing written, nothing pruned
    # the ways out work: --resume continues the run, another name starts a new one
    assert main(["train", str(config), "--resume", "train.iters=3"]) == 0
    assert json.loads((run / "checkpoints" / "last").read_text())["iteration"] == 3
    assert main(["train", str(config), "name=used_again"]) == 0

    final_only = tiny_config(tmp_path, "final_only", iters=1)  # no checkpoint: --resume is not offered
    assert main(["train", str(final_only)]) == 0
    capsys.readouterr()
    assert main(["train", str(final_only)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint to resume from" in err and "continue it with --resume" not in err


def test_pruning_never_deletes_the_checkpoint_last_names(tmp_path):
    from dgss.engine.checkpoint import latest_checkpoint
    from dgss.engine.trainer import Trainer

    config = tiny_config(tmp_path, "prune", iters=4, checkpoint_interval=1, keep_checkpoints=0)
    Trainer(load_config(config)).train()
    checkpoints = tmp_path / "runs" / "prune" / "checkpoints"
    # continue from an earlier checkpoint (iterations 3 and 4 of the first attempt stay on disk), keeping 1
    cfg = load_config(config, ["train.iters=3", "train.keep_checkpoints=1"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(cfg, resume=str(checkpoints / "iter_0000002.safetensors")).train()
    newest = latest_checkpoint(checkpoints)
    assert newest == checkpoints / "iter_0000003.safetensors" and newest.is_file()
    assert newest.with_suffix(".state.pt").is_file()
    names = sorted(p.name for p in checkpoints.glob("iter_*.safetensors"))
    assert names == ["iter_0000003.safetensors", "iter_0000004.safetensors"]  # older pruned, later left alone


# --------------------------------------------------------------------------------------------
# 3. `dgss compare` never reuses the results of another experiment
# --------------------------------------------------------------------------------------------


def finished_run(config, method, scores):
    """A finished compare run: its saved config and eval/results.json."""
    from dgss.compare import resolve_runs
    from dgss.config import save_config

    cfg = resolve_runs(config, [method])[0].cfg
    save_config(cfg, cfg.run_dir / "config.yaml")
    datasets = {name: {"miou": v, "pixel_accuracy": 90.0, "num_images": 2, "eval_class_ids": None, "iou": {}}
                for name, v in scores.items()}
    (cfg.run_dir / "eval").mkdir()
    (cfg.run_dir / "eval" / "results.json").write_text(json.dumps({"checkpoint": "x", "datasets": datasets}))
    return cfg.run_dir


def test_compare_refuses_stale_runs_naming_the_keys_and_ignores_run_only_keys(tmp_path, capsys):
    config = tiny_config(tmp_path, "frozen_tiny", method="frozen", iters=2)
    finished_run(config, "frozen", {"night": 10.0, "fog": 30.0})
    out = ["--out", str(tmp_path / "table")]
    # keys that do not change the experiment: the finished run is collected
    assert main(["compare", str(config), "--methods", "frozen", "--no-run", *out, "train.log_interval=7",
                 "data.num_workers=1", "train.progress_bar=true", "train.checkpoint_interval=5"]) == 0
    capsys.readouterr()
    # iterations and a test set changed: refused before anything runs (the missing LoRA run is not trained)
    status = main(["compare", str(config), "--methods", "lora,frozen", *out, "train.iters=8",
                   "data.test.1.options.num_images=3"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "frozen_tiny" in err and "train.iters: 2 -> 8" in err and "data.test.1.options.num_images: 2 -> 3" in err
    assert "delete" in err and "name=" in err
    assert not (tmp_path / "runs" / "lora_tiny").exists()


def test_compare_does_not_collect_a_half_written_results_file(tmp_path):
    from dgss.compare import collect_or_run, resolve_runs

    config = tiny_config(tmp_path, "frozen_tiny", method="frozen", iters=2)
    run = finished_run(config, "frozen", {"night": 10.0})
    results = run / "eval" / "results.json"
    assert collect_or_run(resolve_runs(config, ["frozen"])[0], allow_run=False).status == "collected"
    # what an evaluation interrupted after its first dataset leaves: not a result to put in a table
    results.write_text(json.dumps({**json.loads(results.read_text()), "pending": ["fog"]}))
    assert collect_or_run(resolve_runs(config, ["frozen"])[0], allow_run=False).status == "missing"


def test_compare_resumes_an_interrupted_run_of_the_same_config(tmp_path):
    from dgss.compare import resolve_runs
    from dgss.engine.trainer import NonFiniteLossError, Trainer

    config = tiny_config(tmp_path, "frozen_tiny", method="frozen", iters=3, checkpoint_interval=2)
    trainer = Trainer(resolve_runs(config, ["frozen"])[0].cfg)
    _poison_loss_at(trainer, 2)  # the run stops after its checkpoint of iteration 2
    with pytest.raises(NonFiniteLossError):
        trainer.train()
    assert main(["compare", str(config), "--methods", "frozen", "--out", str(tmp_path / "t")]) == 0
    run = tmp_path / "runs" / "frozen_tiny"
    lines = (run / "logs" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3]  # iteration 3 once, after the resume
    assert set(json.loads((run / "eval" / "results.json").read_text())["datasets"]) == {"night", "fog"}


# --------------------------------------------------------------------------------------------
# 5. `dgss eval` writes and prints each dataset as it finishes
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    from dgss.engine.checkpoint import save_model

    tmp_path = tmp_path_factory.mktemp("eval")
    config = tiny_config(tmp_path, "ev")
    cfg = load_config(config)
    return config, save_model(build_segmentor(cfg), cfg, tmp_path / "model.safetensors")


def test_eval_keeps_each_finished_dataset_when_a_later_one_fails(model_file, tmp_path, monkeypatch, capsys):
    from dgss.engine import evaluate

    config, model = model_file
    real = evaluate.evaluate_dataset
    calls = []

    def second_fails(model, ds_cfg, *args, **kwargs):
        calls.append(ds_cfg.name)
        if len(calls) == 2:
            raise RuntimeError("the second test set broke")
        return real(model, ds_cfg, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_dataset", second_fails)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="second test set"):
        main(["eval", str(config), "--checkpoint", str(model), "--out", str(out)])
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert list(results["datasets"]) == ["night"] and results["pending"] == ["fog"]
    assert f"night: mIoU {results['datasets']['night']['miou']:.2f}" in printed
    assert "night" in (out / "results.md").read_text() and "still being evaluated: fog" in (out / "results.md").read_text()
    assert not list(out.glob(".*tmp*"))  # written through temporary files, none left


def test_eval_writes_results_after_each_dataset_and_drops_pending_at_the_end(model_file, tmp_path, monkeypatch):
    from dgss.engine import evaluate

    config, model = model_file
    seen = []
    real = evaluate.evaluate_dataset
    out = tmp_path / "out"

    def record(model, ds_cfg, *args, **kwargs):
        path = out / "results.json"
        seen.append(json.loads(path.read_text()) if path.exists() else None)  # what is on disk before each dataset
        return real(model, ds_cfg, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_dataset", record)
    assert main(["eval", str(config), "--checkpoint", str(model), "--out", str(out)]) == 0
    assert seen[0] is None and list(seen[1]["datasets"]) == ["night"] and seen[1]["pending"] == ["fog"]
    final = json.loads((out / "results.json").read_text())
    assert list(final["datasets"]) == ["night", "fog"] and "pending" not in final


def test_eval_checks_out_before_evaluating_anything(model_file, tmp_path, monkeypatch, capsys):
    from dgss.engine import evaluate

    config, model = model_file
    calls = []
    monkeypatch.setattr(evaluate, "evaluate_dataset", lambda *a, **k: calls.append(1))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["eval", str(config), "--checkpoint", str(model), "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert str(blocker) in err and len(err.strip().splitlines()) == 1
    assert calls == []


# --------------------------------------------------------------------------------------------
# 9. NaN handling never leaves an unusable model
# --------------------------------------------------------------------------------------------


def _poison_loss_at(trainer, *bad_iterations):
    head_loss = trainer.model.head.loss

    def loss(*args, **kwargs):
        losses = head_loss(*args, **kwargs)
        if trainer.iteration in bad_iterations:
            losses = {k: v * float("nan") for k, v in losses.items()}
        return losses

    trainer.model.head.loss = loss


def test_diverged_tensors_are_nan_inf_or_beyond_float32_squares():
    from dgss.engine.checkpoint import DIVERGED_WEIGHT, diverged_tensors

    module = nn.Module()
    values = {"fine": 1e19, "large": 1e30, "nan": float("nan"), "inf": float("-inf"), "edge": DIVERGED_WEIGHT}
    for name, value in values.items():
        module.register_buffer(name, torch.tensor([0.5, value]))
    module.register_buffer("ints", torch.tensor([2**62]))  # not floating point: not a weight to judge
    assert diverged_tensors(module) == ["large", "nan", "inf"]
    assert DIVERGED_WEIGHT == pytest.approx(1.8446743e19, rel=1e-6)  # sqrt(float32 max)
    assert torch.isinf(torch.tensor([1e30]) ** 2).all() and torch.isfinite(torch.tensor([1e19]) ** 2).all()


def test_a_checkpoint_of_diverged_weights_is_not_written(tmp_path):
    from dgss.engine.trainer import DivergedWeightsError, NonFiniteLossError, Trainer

    trainer = Trainer(load_config(tiny_config(tmp_path, "diverged", iters=4, checkpoint_interval=2)))
    original_step = trainer.train_step

    def step(iteration):
        result = original_step(iteration)
        if iteration == 2:  # the weights blow up, the loss is still finite
            with torch.no_grad():
                trainer.model.head.classifier.weight.fill_(1e30)
        return result

    trainer.train_step = step
    with pytest.raises(DivergedWeightsError, match=r"head\.classifier\.weight.*iteration 4 .*not written.*"
                                                   r"iter_0000002.*checked finite and in range") as raised:
        trainer.train()
    assert isinstance(raised.value, NonFiniteLossError)
    checkpoints = tmp_path / "runs" / "diverged" / "checkpoints"
    assert json.loads((checkpoints / "last").read_text())["iteration"] == 2
    assert not (checkpoints / "iter_0000004.safetensors").exists()
    assert not (tmp_path / "runs" / "diverged" / "model_final.safetensors").exists()
    # a diverged checkpoint written some other way (the library function does not judge) is not resumed
    from dgss.engine.checkpoint import CheckpointError, save_training_checkpoint

    save_training_checkpoint(checkpoints, 4, trainer.model, trainer.cfg, trainer._training_state())
    with pytest.raises(CheckpointError, match=r"iter_0000004.safetensors holds diverged weights \(head.classifier"):
        Trainer(trainer.cfg, resume=True)


def test_nan_policy_skip_is_bounded_and_reported(tmp_path, capsys):
    from safetensors import safe_open

    from dgss.engine.checkpoint import load_training_state
    from dgss.engine.trainer import NonFiniteLossError, Trainer

    bounded = Trainer(load_config(tiny_config(tmp_path, "bounded", iters=6, nan_policy="skip",
                                              max_consecutive_skips=2)))
    _poison_loss_at(bounded, 1, 2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NonFiniteLossError, match=r"iteration 4 of 6, 3 in a row \(train.max_consecutive_skips=2\)"):
            bounded.train()
    assert not (tmp_path / "runs" / "bounded" / "model_final.safetensors").exists()

    trainer = Trainer(load_config(tiny_config(tmp_path, "reported", iters=4, nan_policy="skip", checkpoint_interval=2)))
    _poison_loss_at(trainer, 0, 2)  # two skips, never two in a row
    with pytest.warns(UserWarning, match="optimizer step skipped"):
        final = trainer.train()
    assert "skipped 2 of 4 optimizer steps" in capsys.readouterr().out
    with safe_open(str(final), framework="pt") as f:
        assert json.loads(f.metadata()["dgss"])["skipped_steps"] == 2
    state = load_training_state(tmp_path / "runs" / "reported" / "checkpoints" / "iter_0000002.state.pt")
    assert state["skipped_steps"] == 1 and state["consecutive_skips"] == 0  # resumed runs keep counting
    assert load_config(tiny_config(tmp_path, "default")).train.max_consecutive_skips == 5
