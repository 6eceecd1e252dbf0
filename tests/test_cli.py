"""The command line: --help lists the sub-commands, --version, config validation errors."""

import subprocess
import sys

import yaml

from dgss import __version__
from dgss.cli import COMMANDS, main


def run(*args):
    return subprocess.run([sys.executable, "-m", "dgss", *args], capture_output=True, text=True, timeout=120)


def test_version_and_help_list_the_sub_commands():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"dgss {__version__}"
    helped = run("--help")
    assert helped.returncode == 0
    for name in COMMANDS:
        assert name in helped.stdout


def test_config_prints_the_resolved_config_and_saves_it(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  backbone: dinov2_s\ntrain:\n  iters: 5\n")
    saved = tmp_path / "resolved.yaml"
    assert main(["config", str(path), "train.lr=3e-4", "--save", str(saved)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 3e-4 and printed["model"]["backbone"] == "dinov2_s"
    assert yaml.safe_load(saved.read_text()) == printed


def test_config_errors_are_one_clear_line_with_exit_status_2(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text("trian:\n  iters: 5\n")
    assert main(["config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'trian'" in err and "did you mean 'train'" in err and "Traceback" not in err
    assert main(["config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_backbones_lists_the_zoo_with_counts(capsys):
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("dinov2_l "))
    assert "304.20" in line and "7,11,15,23" in line
    assert "dinov3_hplus" in out and "sam_h" in out
