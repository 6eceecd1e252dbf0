"""One CLI convention, walked over every subcommand as a table, and the checks that come before any work:
--checkpoint takes a file or a run folder, --device and --no-progress on every command that runs a model,
no progress bars without a terminal, real examples in every help, dataset roots and weights checked
up front, backbone aliases, and `dgss compare` finding runs by their recorded config."""

import argparse
import json
import shlex

import pytest
import yaml
from test_compare import write_results
from test_engine_support import tiny_config

from dgss import cli
from dgss.cli import COMMANDS, MODEL_COMMANDS, build_parser, main
from dgss.config import load_config, resolve_config_path
from dgss.models.weight_sources import WEIGHT_SOURCES


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def example_commands(name: str, first_only: bool = False) -> list[list[str]]:
    """The `dgss ...` commands of a subcommand's examples, as argument lists (torchrun's `-m dgss` too;
    `a && b` gives both, or only a with ``first_only``)."""
    text = subparsers()[name].epilog
    commands = []
    for line in text.splitlines()[1:]:
        line = line.strip()
        if line.startswith("#"):
            continue
        for part in line.split("&&")[: 1 if first_only else None]:
            words = shlex.split(part)
            if words[0] == "torchrun":
                words = words[words.index("dgss"):]
            assert words[0] == "dgss", line
            commands.append(words[1:])
    return commands


SUBCOMMANDS = sorted(subparsers())


def test_the_table_walks_every_subcommand():
    assert set(SUBCOMMANDS) == set(COMMANDS) and set(MODEL_COMMANDS) <= set(SUBCOMMANDS)
    assert "configs" in SUBCOMMANDS


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_a_description_and_examples_that_parse(name):
    parser = subparsers()[name]
    assert len(parser.description) > 80  # a page of the docs, not the one-line summary
    assert parser.epilog.startswith("examples:\n")
    examples = example_commands(name)
    assert examples and all(words[0] == name for words in example_commands(name, first_only=True))
    for words in examples:
        # every option an example uses exists, and the overrides are accepted where they stand
        args, extra = build_parser().parse_known_args(words)
        assert all("=" in e for e in extra) and (not extra or hasattr(args, "overrides")), words
        config = getattr(args, "config", None)
        if config and config.endswith(".yaml") and args.command not in ("convert",):
            if not config.startswith(("my_", "/")):
                resolve_config_path(config)  # a shipped config, not a made-up path
        for override in [*getattr(args, "overrides", []), *extra]:  # the keys are the schema's
            load_config(None, [override]) if not override.startswith("data.") else None
    # the examples of one command are not another command's (the old `train.lr=2e-4` under eval)
    assert not any("train.lr" in " ".join(w) for w in examples if name == "eval")


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_the_shared_flags(name):
    parser = subparsers()[name]
    flags = option_strings(parser)
    if name in MODEL_COMMANDS:
        assert {"--device", "--no-progress"} <= flags, name
    checkpoint = [a for a in parser._actions if a.dest == "checkpoint"]
    if checkpoint:  # the checkpoint is always --checkpoint, and says it takes a run folder
        assert checkpoint[0].option_strings == ["--checkpoint"] and "run folder" in checkpoint[0].help
    if name in ("eval", "predict", "export", "convert"):
        assert checkpoint, name
    if "config" in {a.dest for a in parser._actions if not a.option_strings} and name != "configs":
        overrides = next(a for a in parser._actions if a.dest == "overrides")
        assert "train.lr" not in overrides.help  # no command shows another command's override


def test_device_and_progress_become_the_config_keys(monkeypatch):
    args = argparse.Namespace(device="cpu", no_progress=False)
    monkeypatch.setattr(cli, "_interactive", lambda: True)
    assert cli._runtime_overrides(args) == ("train.device=cpu",)
    args.no_progress = True
    assert cli._runtime_overrides(args) == ("train.device=cpu", "train.progress_bar=false")
    monkeypatch.setattr(cli, "_interactive", lambda: False)  # a pipe or a SLURM log: log lines only
    assert cli._runtime_overrides(argparse.Namespace(device=None, no_progress=False)) == ("train.progress_bar=false",)
    asked = argparse.Namespace(device=None, no_progress=False, overrides=["train.progress_bar=true"])
    assert cli._runtime_overrides(asked) == ()  # bars asked for on the command line: shown anyway
    asked.no_progress = True
    assert cli._runtime_overrides(asked) == ("train.progress_bar=false",)
    with pytest.raises(cli.UsageError, match="--device must be auto, cuda or cpu"):
        cli._runtime_overrides(argparse.Namespace(device="gpu", no_progress=False))


def test_train_without_a_terminal_logs_lines_and_eval_takes_the_run_folder(tmp_path, capsys):
    config = tiny_config(tmp_path, "conv", iters=2, progress_bar=True, device="auto")
    assert main(["train", str(config), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "[train] iter 2:" in captured.out  # plain log lines, no tqdm
    run = tmp_path / "runs" / "conv"
    saved = load_config(run / "config.yaml")
    assert saved.train.device == "cpu" and saved.train.progress_bar is False
    assert main(["eval", str(config), "--checkpoint", str(run), "--device", "cpu"]) == 0  # the run folder
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["checkpoint"] == str(run / "model_final.safetensors") and set(results["datasets"]) == {"night", "fog"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", str(config), "--checkpoint", str(empty)]) == 2
    assert "without model_final.safetensors" in capsys.readouterr().err


def test_train_checks_the_test_roots_before_the_first_iteration(tmp_path, capsys):
    config = tiny_config(tmp_path, "roots")
    raw = yaml.safe_load(config.read_text())
    raw["data"]["test"].append({"type": "cityscapes", "split": "val", "root": str(tmp_path / "no_cityscapes")})
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "data.test[2].root" in err and "no_cityscapes" in err
    assert not (tmp_path / "runs" / "roots").exists()  # refused before the run folder was made


def test_config_refuses_what_train_refuses(tmp_path, capsys):
    config = tiny_config(tmp_path, "same")
    for override, words in (("data.test.0.options.domain=nigth", ("data.test[0]", "did you mean 'night'")),
                            ("data.val.0.options.colour=red", ("data.val[0]", "unknown option 'colour'")),
                            ("data.train.0.with_labels=false", ("data.train[0]", "training needs labels"))):
        for command in ("config", "train"):
            assert main([command, str(config), override]) == 2, (command, override)
            err = capsys.readouterr().err
            assert all(w in err for w in words), (command, err)
    assert not (tmp_path / "runs" / "same").exists()
    # with --check-files, the files too: a test root and the weights, as train refuses them
    missing_root = f"data.test.0={{type: cityscapes, split: val, root: {tmp_path / 'nowhere'}}}"
    for extra, words in (([missing_root], "data.test[0].root"), (["model.weights=/no/vit.pth"], "/no/vit.pth")):
        assert main(["config", str(config), *extra]) == 0
        capsys.readouterr()
        for command in (["config", str(config), "--check-files"], ["train", str(config)]):
            assert main([*command, *extra]) == 2
            assert words in capsys.readouterr().err


@pytest.mark.parametrize("spelling", ["dinov2-s", "DINOv2-S", "Dinov2_S"])
def test_backbone_names_are_case_and_dash_insensitive(tmp_path, capsys, spelling):
    config = tiny_config(tmp_path, "alias")
    assert main(["config", str(config), f"model.backbone={spelling}"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["backbone"] == "dinov2_s"
    assert main(["config", str(config), "model.backbone=dinov2-x"]) == 2
    assert "did you mean 'dinov2_" in capsys.readouterr().err


def test_the_missing_weights_error_names_the_download_address(tmp_path, capsys):
    config = tiny_config(tmp_path, "weights", weights=str(tmp_path / "ckpt" / "dinov2_vits14_pretrain.pth"))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth" in err
    assert f"wget -O {tmp_path / 'ckpt' / 'dinov2_vits14_pretrain.pth'}" in err and err.count("\n") == 1
    # a file of another name (the user's own weights): where the official file is, and no download command
    mine = tiny_config(tmp_path, "mine", weights=str(tmp_path / "my_vit_s.pth"))
    assert main(["train", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "(the official dinov2_s weights: https://dl.fbaipublicfiles.com/dinov2/" in err and "wget" not in err
    # every address the configs' weights files come from is the same file name
    for base in ("dinov2-l", "eva02-l", "clip-l", "sam-h"):
        model = load_config(f"_base_/{base}.yaml").model
        assert WEIGHT_SOURCES[model.backbone].rsplit("/", 1)[1] == model.weights.rsplit("/", 1)[1], base


def test_convert_takes_checkpoint_and_the_positional_form(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    out = str(tmp_path / "model.safetensors")
    # a run folder means its checkpoints folder (here without an FSDP checkpoint: the error says so)
    assert main(["convert", "--checkpoint", str(run), "--out", out]) == 2
    assert f"no FSDP checkpoint to resume from in {run / 'checkpoints'}" in capsys.readouterr().err
    assert main(["convert", str(run / "checkpoints"), "--out", out]) == 2  # the older positional form
    assert "no FSDP checkpoint" in capsys.readouterr().err
    assert main(["convert", str(run), "--checkpoint", str(run), "--out", out]) == 2
    assert "give --checkpoint only" in capsys.readouterr().err
    assert main(["convert", "--out", out]) == 2
    assert "--checkpoint is required" in capsys.readouterr().err


def test_compare_finds_a_run_by_its_recorded_config(tmp_path, capsys):
    config = tiny_config(tmp_path, "frozen_tiny", method="frozen")
    runs = tmp_path / "runs"
    frozen = write_results(config, "frozen", {"night": 10.0, "fog": 20.0})
    # a run of another experiment (another lr) is not taken for lora's
    other = write_results(config, "lora", {"night": 1.0, "fog": 1.0})
    other_cfg = yaml.safe_load((other / "config.yaml").read_text())
    other_cfg["train"]["lr"] = 0.5
    other.rename(runs / "a_lora_other_lr")
    (runs / "a_lora_other_lr" / "config.yaml").write_text(yaml.safe_dump(other_cfg))
    # lora's run as `dgss train CONFIG method.name=lora name=my_lora` names it
    lora = write_results(config, "lora", {"night": 30.0, "fog": 40.0})
    lora.rename(runs / "my_lora")
    saved = yaml.safe_load((runs / "my_lora" / "config.yaml").read_text())
    saved["name"] = "my_lora"
    (runs / "my_lora" / "config.yaml").write_text(yaml.safe_dump(saved))
    out = tmp_path / "table"
    assert main(["compare", str(config), "--methods", "frozen,lora", "--out", str(out), "--no-run"]) == 0
    assert "| lora | 0.00 | 30.0 | 40.0 | 35.0 |" in capsys.readouterr().out
    assert frozen.name == "frozen_tiny"


def test_the_run_folders_in_the_examples_are_those_the_shipped_configs_make():
    from dgss.cli_help import EXAMPLES
    from dgss.config_files import list_configs

    names = {load_config(name).name for name in list_configs() if not name.startswith(("datasets/", "eval/"))}
    used = {word.split("/")[1] for examples in EXAMPLES.values() for _, command in examples
            for word in shlex.split(command) if word.startswith("runs/")}
    assert used and used <= names, used - names
