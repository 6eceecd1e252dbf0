"""Packaging: the wheel holds the configs and assets and works outside the source tree (--help, the
shipped configs, one tiny train); `dgss configs list|show|copy`; a config path not on disk resolves to the
shipped config of that name; LICENSE and CITATION.cff."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from dgss import __version__
from dgss.cli import main
from dgss.config import SHIPPED_CONFIGS, ConfigError, load_config, resolve_config_path
from dgss.config_files import copy_configs, list_configs

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# the shipped configs
# ------------------------------------------------------------------------------------------------


def test_configs_list_shows_every_shipped_config_but_the_bases(capsys):
    assert main(["configs", "list"]) == 0
    listed = capsys.readouterr().out.split()
    on_disk = sorted(p.relative_to(SHIPPED_CONFIGS).as_posix() for p in SHIPPED_CONFIGS.rglob("*.yaml"))
    assert listed == [n for n in on_disk if not n.startswith("_base_/")]
    assert "rein/dinov2-l_gtav_512.yaml" in listed and "fishertune/dinov2-l_gtav_512.yaml" in listed
    assert main(["configs", "list", "rein"]) == 0
    assert all(n.startswith("rein/") for n in capsys.readouterr().out.split())
    assert main(["configs", "list", "nosuch"]) == 2
    assert "no shipped config folder 'nosuch'" in capsys.readouterr().err


def test_configs_show_prints_the_file(capsys):
    assert main(["configs", "show", "configs/rein/dinov2-l_gtav_512"]) == 0  # configs/ and .yaml may be given or not
    assert capsys.readouterr().out == (SHIPPED_CONFIGS / "rein/dinov2-l_gtav_512.yaml").read_text()
    assert main(["configs", "show", "rein/dinov2-l_gtav_521.yaml"]) == 2
    assert "did you mean rein/dinov2-l_gtav_512.yaml" in capsys.readouterr().err


def test_configs_copy_brings_the_bases_and_the_copy_wins(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["configs", "copy", "rein/dinov2-l_gtav_512.yaml"]) == 0
    written = {Path(p).relative_to("configs").as_posix() for p in capsys.readouterr().out.split()}
    assert written == {"rein/dinov2-l_gtav_512.yaml", "_base_/gtav_512.yaml", "_base_/dinov2-l.yaml",
                       "_base_/rein.yaml", "_base_/schedule_512.yaml"} | _bases_of("rein/dinov2-l_gtav_512.yaml")
    # the copy loads as the shipped file does, and an edit of it wins over the shipped file
    assert load_config("configs/rein/dinov2-l_gtav_512.yaml") == load_config(SHIPPED_CONFIGS / "rein/dinov2-l_gtav_512.yaml")
    local = Path("configs/rein/dinov2-l_gtav_512.yaml")
    local.write_text(local.read_text() + "train: {iters: 7}\n")
    assert resolve_config_path("configs/rein/dinov2-l_gtav_512.yaml") == local
    assert load_config("configs/rein/dinov2-l_gtav_512.yaml").train.iters == 7
    # an edited copy is never overwritten without --force; a folder copies every config in it
    assert main(["configs", "copy", "rein/dinov2-l_gtav_512.yaml"]) == 2
    assert "not overwriting configs/rein/dinov2-l_gtav_512.yaml" in capsys.readouterr().err
    assert load_config("configs/rein/dinov2-l_gtav_512.yaml").train.iters == 7
    copied = copy_configs(["lora"], tmp_path / "elsewhere")
    assert {p.relative_to(tmp_path / "elsewhere").as_posix() for p in copied} >= set(list_configs("lora"))


def _bases_of(name):
    from dgss.config_files import config_dependencies

    root = SHIPPED_CONFIGS.resolve()
    return {p.relative_to(root).as_posix() for p in config_dependencies(SHIPPED_CONFIGS / name)}


def test_a_config_not_on_disk_resolves_to_the_shipped_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    for spelling in ("rein/dinov2-l_gtav_512.yaml", "configs/rein/dinov2-l_gtav_512.yaml"):
        assert resolve_config_path(spelling) == SHIPPED_CONFIGS / "rein/dinov2-l_gtav_512.yaml"
    assert load_config("rein/dinov2-l_gtav_512.yaml").method.name == "rein"
    from dgss.compare import resolve_runs  # compare finds the published sibling of a shipped protocol

    (rein,) = resolve_runs("frozen/dinov2-l_gtav_512.yaml", ["rein"])
    assert rein.cfg == load_config("rein/dinov2-l_gtav_512.yaml")
    with pytest.raises(ConfigError) as err:
        load_config("rein/nosuch.yaml")
    assert str(tmp_path / "rein/nosuch.yaml") in str(err.value) and str(SHIPPED_CONFIGS / "rein/nosuch.yaml") in str(err.value)


def test_license_and_citation():
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = "Apache-2.0"' in pyproject
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "Apache-2.0" and cff["type"] == "software"
    assert f'version = "{cff["version"]}"' in pyproject
    references = {r["conference"]["name"]: r for r in cff["references"]}
    assert set(references) == {"CVPR 2025", "CVPR 2024"}
    assert references["CVPR 2025"]["title"].startswith("FisherTune:")
    assert references["CVPR 2024"]["title"].startswith("Stronger, Fewer, & Superior")
    assert {a["family-names"] for a in references["CVPR 2024"]["authors"]} >= {"Wei", "Zheng"}


# ------------------------------------------------------------------------------------------------
# the wheel, installed outside the source tree
# ------------------------------------------------------------------------------------------------


def _build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of the source tree (the build writes nothing into the working tree)."""
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(ROOT / "src", source / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    str(source), "-w", str(out)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = out.glob("dgss-*.whl")
    return wheel


def test_the_wheel_installs_and_trains_outside_the_source_tree(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"dgss/configs/{n}" for n in list_configs(include_bases=True)}
    assert shipped <= names, sorted(shipped - names)[:5]
    assets = {f"dgss/assets/{p.name}" for p in (ROOT / "src/dgss/assets").iterdir() if p.is_file()}
    assert assets and assets <= names
    assert "dgss/py.typed" in names and any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    entry_points = zipfile.ZipFile(wheel).read(f"dgss-{__version__}.dist-info/entry_points.txt").decode()
    assert "dgss = dgss.cli:main" in entry_points  # the `dgss` command

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    # only the installed copy is importable: the dependencies come from this interpreter's site-packages
    env = dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")

    def dgss(*args):
        return subprocess.run([sys.executable, "-m", "dgss", *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=300)

    where = subprocess.run([sys.executable, "-c", "import dgss; print(dgss.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(target), where
    helped = dgss("--help")
    assert helped.returncode == 0 and "configs" in helped.stdout
    listed = dgss("configs", "list")
    assert listed.returncode == 0 and "rein/dinov2-l_gtav_512.yaml" in listed.stdout.split()
    resolved = dgss("config", "configs/rein/dinov2-l_gtav_512.yaml")  # the README's path, no configs/ here
    assert resolved.returncode == 0 and yaml.safe_load(resolved.stdout)["method"]["name"] == "rein"
    # the CPU example as the README gives it: the shipped config and the shipped foundation ViT it names
    trained = dgss("train", "configs/examples/synthetic_cpu.yaml", "train.iters=2", "--device", "cpu")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (work / "runs" / "synthetic_cpu" / "model_final.safetensors").is_file()
    saved = yaml.safe_load((work / "runs" / "synthetic_cpu" / "config.yaml").read_text())
    assert Path(saved["model"]["weights"]) == target / "dgss" / "assets" / "demo_foundation_vit.safetensors"


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    # `dgss configs list | head -n 1`: the reader has gone before the output is written
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "dgss", "configs", "list", "_base_"], stdout=write,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
                              cwd=tmp_path, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 0 and "Traceback" not in done.stderr and "Broken" not in done.stderr, done.stderr
    assert list_configs("_base_")[0].startswith("_base_/")  # a folder asked for by name lists its bases
