"""The documentation site: `mkdocs build --strict` passes, the nav has every page the site promises,
and the generated pages (one per `dgss` subcommand, the config reference) say what the code says."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# every page the documentation promises (issue 39), by its file under docs/
REQUIRED_PAGES = [
    "index.md", "getting-started.md", "commands/index.md", "data.md", "backbones.md", "multi-gpu.md",
    "reliability.md", "performance.md", "testbed.md", "coming-from.md", "reference/config.md",
    "reference/api.md", "inference.md", "speed.md",
    "methods/fishertune.md", "methods/rein.md", "methods/soma.md", "methods/fada.md", "methods/geco.md",
    "methods/frozen.md", "methods/full.md", "methods/lp-ft.md", "methods/lora.md", "methods/vpt.md",
    "methods/adaptformer.md", "methods/vqt.md", "methods/childtune.md",
]


def load_generator():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "_hooks" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nav_pages(nav) -> list[str]:
    pages: list[str] = []
    for entry in nav:
        value = entry if isinstance(entry, str) else next(iter(entry.values()))
        if isinstance(value, list):
            pages += nav_pages(value)
        else:
            pages.append(value)
    return pages


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site, built once with --strict: any warning (a broken link or anchor, a page missing from
    the nav, a docstring mkdocstrings cannot render) fails the build."""
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_strict_build_has_every_required_page_in_the_nav(site):
    # the nav as MkDocs sees it after the hook's on_config (which fills "Commands")
    generator = load_generator()
    config = generator.on_config({"nav": yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]})
    pages = nav_pages(config["nav"])
    missing = [p for p in REQUIRED_PAGES if p not in pages]
    assert not missing, f"pages missing from the nav: {missing}"
    for page in REQUIRED_PAGES:
        html = site / (page[:-3].removesuffix("index") if page.endswith("index.md") else page[:-3]) / "index.html"
        assert html.is_file(), f"{page} was not built ({html})"


def test_every_subcommand_has_a_page_with_its_options_and_the_examples_of_its_help(site):
    from dgss.cli import build_parser

    generator = load_generator()
    parser = build_parser()
    subs = generator.subcommands(parser)
    assert {"train", "eval", "predict", "export", "plan", "convert", "fisher", "compare", "demo"} <= set(subs)
    config = generator.on_config({"nav": yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]})
    nav = nav_pages(config["nav"])
    for name, sub in subs.items():
        assert f"commands/{name}.md" in nav, name
        html = (site / "commands" / name / "index.html").read_text()
        for action in sub._actions:
            for option in action.option_strings:
                assert option in html, f"dgss {name}: {option} is not on its page"
        assert sub.epilog, f"dgss {name} --help has no examples"
        # the help's epilog, examples included, word for word (argparse may re-wrap prose)
        page = " ".join(generator.command_page(name, sub).split())
        assert " ".join(sub.epilog.split()) in page, f"dgss {name}: the epilog is not on its page"


def test_a_command_page_follows_a_new_option_and_epilog():
    """The page is the parser's: an option or example added to the parser appears on the page."""
    generator = load_generator()
    parser = argparse.ArgumentParser(prog="dgss demo-x", description="a test command",
                                     epilog="examples:\n  dgss demo-x --fast cfg.yaml",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="experiment YAML file")
    parser.add_argument("--fast", action="store_true", help="skip the slow part | really")
    parser.add_argument("--size", metavar=("H", "W"), type=int, nargs=2, default=[512, 512], help="input size")
    page = generator.command_page("demo-x", parser)
    assert "# dgss demo-x" in page and "a test command" in page
    assert "| `--fast` |  | skip the slow part \\| really |" in page  # a pipe in help cannot split the row
    assert "| `--size H W` | `512 512` | input size |" in page
    assert "examples:\n  dgss demo-x --fast cfg.yaml" in page  # the epilog as the help prints it
    assert "usage" not in page.split("```text")[1]  # the usage block without argparse's "usage: "


@dataclasses.dataclass
class _Inner:
    # a comment block above a field
    # on two lines
    alpha: float = 0.5
    beta: Optional[str] = None  # beside the field; a "# in a string" is not a comment

    gamma: Literal["a", "b"] = "a"


@dataclasses.dataclass
class _Outer:
    """An outer config."""

    name: str = "x"  # the name
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    items: list[_Inner] = dataclasses.field(default_factory=list)  # a list of inner entries
    sizes: list[int] = dataclasses.field(default_factory=lambda: [1, 2])


def test_config_sections_read_types_defaults_and_comments_from_the_dataclasses():
    generator = load_generator()
    sections = {key: rows for key, _, rows in generator.config_sections(_Outer)}
    assert list(sections) == ["(top level)", "inner", "items.N"]
    top = {row[0]: row for row in sections["(top level)"]}
    assert top["name"] == ("name", "str", "`'x'`", "the name")
    assert top["sizes"][1:3] == ("list of int", "`[1, 2]`")
    assert top["items"][3] == "a list of inner entries"
    inner = {row[0]: row for row in sections["inner"]}
    assert inner["inner.alpha"] == ("inner.alpha", "float", "`0.5`", "a comment block above a field on two lines")
    assert inner["inner.beta"][1:] == ("str or null", "`null`", 'beside the field; a "# in a string" is not a comment')
    assert inner["inner.gamma"][1:] == ("one of 'a', 'b'", "`'a'`", "")  # a blank line ends a comment block
    assert [row[0] for row in sections["items.N"]] == ["items.N.alpha", "items.N.beta", "items.N.gamma"]


def test_config_reference_lists_every_key_of_the_experiment_config(site):
    from dgss.config import ExperimentConfig

    seen: set[type] = set()

    def keys(cls, prefix=""):
        # a class listed twice (data.train, data.val, data.test) has its table once, under its first key
        import typing

        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            tp = hints[field.name]
            args = typing.get_args(tp)
            if dataclasses.is_dataclass(tp):
                yield from keys(tp, f"{prefix}{field.name}.")
            elif typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
                yield prefix + field.name
                if args[0] not in seen:
                    seen.add(args[0])
                    yield from keys(args[0], f"{prefix}{field.name}.N.")
            else:
                yield prefix + field.name

    html = (site / "reference" / "config" / "index.html").read_text()
    all_keys = list(keys(ExperimentConfig))
    assert "train.lr" in all_keys and "method.fishertune.domain_balance" in all_keys
    missing = [k for k in all_keys if f"<code>{k}</code>" not in html]
    assert not missing, missing
    # a default and a comment from the code, as the code writes them
    assert "<code>0.0001</code>" in html  # train.lr's default 1e-4
    assert "balance 2 is the smallest at which the variational estimate" in html
