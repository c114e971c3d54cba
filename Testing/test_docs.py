"""The documentation stays inside the repository and matches the code.

The design document lives in ``docs/DESIGN.md``; README.md, training/README.md and every
``--help`` text refer to it by that path, and none refers to a folder outside the
repository (the atlases are described, with their sources and licences, in
docs/DESIGN.md section 5, and laid out by the user).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from BrainLobeSegLib import cli
from training.__main__ import build_parser as training_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "training/README.md", "docs/DESIGN.md"]


def subparsers(parser: argparse.ArgumentParser, prefix: str) -> Iterator[Tuple[str, argparse.ArgumentParser]]:
    """(command line, parser) of a parser and each of its sub-commands."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub


def all_parsers() -> List[Tuple[str, argparse.ArgumentParser]]:
    return list(subparsers(cli.build_parser(), "brainlobeseg")) + \
        list(subparsers(training_parser(), "python -m training"))


def test_design_document_is_in_the_repository():
    text = (ROOT / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    for heading in ("## 1. The 20 regions", "## 2. Dataset layout and the transform convention",
                    "## 3. Architecture and data flow", "## 4. Models and the model card",
                    "## 5. Atlases", "### 5.2 Laying out the `--atlas-dir` folder",
                    "### 5.3 The bundled upright reference head", "## 6. Performance targets"):
        assert heading in text, heading


@pytest.mark.parametrize("name", DOCS)
def test_docs_point_inside_the_repository(name):
    text = (ROOT / name).read_text(encoding="utf-8")
    assert "../shared" not in text and "INDEX.md" not in text
    for match in re.finditer(r"[\w./-]*DESIGN\.md", text):
        assert match.group(0) in ("docs/DESIGN.md", "../docs/DESIGN.md", "DESIGN.md") and (
            name == "docs/DESIGN.md" or match.group(0) != "DESIGN.md"), (name, match.group(0))
    for target in re.findall(r"\]\(([^)#]+)\)", text):      # relative markdown links resolve
        if "://" not in target:
            assert ((ROOT / name).parent / target).exists(), (name, target)


@pytest.mark.parametrize("command,parser", all_parsers(), ids=lambda v: v if isinstance(v, str) else "")
def test_help_points_inside_the_repository(command, parser):
    text = parser.format_help()
    assert "../shared" not in text and "INDEX.md" not in text, command
    assert not re.search(r"(?<!docs/)DESIGN\.md", text), command


def options(parser: argparse.ArgumentParser) -> List[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.dest not in ("help", "version")]


@pytest.mark.parametrize("command,parser", all_parsers(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_option_has_help_with_its_default(command, parser):
    """Every option says what it does, and the help shows the default of each option that
    has one (argparse's defaults formatter, or the help text's own words)."""
    for action in options(parser):
        assert action.help, f"{command} {action.option_strings[0]} has no help text"
        if action.default not in (None, False):
            formatted = parser.formatter_class(prog="x")._get_help_string(action)
            assert "default" in formatted.lower(), (command, action.option_strings[0])
    assert "(default: None)" not in parser.format_help()


def _mentioned(option: argparse.Action, text: str) -> bool:
    return any(re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text) for o in option.option_strings)


def test_readme_synopsis_lists_every_option_and_format():
    """README's command-line synopsis names every option of every brainlobeseg command
    (so `--force` and `--threads` cannot go missing again) and every accepted format."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Command line"):readme.index("## For clinicians")]
    missing = [f"{command} {a.option_strings[-1]}" for command, parser in all_parsers()
               if command.startswith("brainlobeseg") for a in options(parser) if not _mentioned(a, section)]
    assert missing == []
    for fmt in (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", "DICOM", "glob"):
        assert fmt in section, fmt


def test_training_docs_list_every_option():
    text = (ROOT / "README.md").read_text(encoding="utf-8") + \
        (ROOT / "training" / "README.md").read_text(encoding="utf-8")
    missing = [f"{command} {a.option_strings[-1]}" for command, parser in all_parsers()
               if command.startswith("python") for a in options(parser) if not _mentioned(a, text)]
    assert missing == []


def test_walkthrough_knows_every_command_of_the_guides():
    """Every command line of README.md and training/README.md matches a rule of the
    scripted walk-through (`make walkthrough` runs them); a new or changed command fails
    here until the walk-through knows how to run it small, or why it is skipped."""
    from walkthrough import Step, plan
    steps = plan()
    assert [s for s in steps if isinstance(s, str)] == []
    ran = [s for s in steps if isinstance(s, Step) and s.run]
    assert {s.doc for s in ran} == {"README.md", "training/README.md"}
    for needed in ("brainlobeseg demo", "training train", "training export", "training evaluate",
                   "training synth"):
        assert any(needed in s.run for s in ran), needed


def test_the_folders_documented_commands_create_are_ignored():
    """What the guides' commands write into the repository (outputs, runs, model folders,
    reports, datasets, the atlas folder) is matched by .gitignore."""
    import subprocess
    made = ["brainlobeseg-demo/demo-overlay.png", "runs/mine/log.jsonl", "my-models/mine-3d/model.json",
            "reports/mine/metrics.json", "data/synth/1.nii.gz", "atlas",    # atlas: a folder or a link
            "demo-output/demo-overlay.png", ".venv/bin/python"]
    proc = subprocess.run(["git", "check-ignore", "--no-index", *made], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split()) == sorted(made)
