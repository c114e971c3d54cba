"""A scripted walk-through of README.md and training/README.md (``make walkthrough``).

Every shell block of the two guides is run in order, as a new user would run it, in a
fresh copy of the repository ("a fresh clone": the files git tracks plus the untracked
ones it does not ignore) with its own virtual environment. Nothing is assumed about the
commands beyond :data:`RULES`: each command line of the guides must match exactly one
rule, which runs it as written, runs it with tiny sizes (fewer cases, iterations, smaller
scans: the guides' own commands, made small), or skips it with a stated reason (a
benchmark of minutes, a synopsis). A line no rule knows fails the walk-through, so the
guides cannot drift from the code unnoticed; ``Testing/test_docs.py`` checks that part in
CI without running anything.

After the last command, the copy must hold no new file that git does not ignore and no
changed tracked file: the folders the documented commands create are in ``.gitignore``,
and no documented command writes into the source tree.

Placeholders of the guides are filled in: ``/path/to/scans`` and ``/path/to/heldout`` with
small labelled code phantoms, ``atlas`` (docs/DESIGN.md section 5.2) with the folder given
as ``--atlas`` or, without one, a small fake atlas with the real file names (the one
``Testing/test_synth.py`` builds). ``pip install`` runs offline (``--no-index
--no-build-isolation``, in a venv that sees the system's packages) unless ``--online``.

    python -m Testing.walkthrough [--atlas DIR] [--keep DIR] [--online] [--list]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "training/README.md")

#: Small sizes for `train` (what Testing/test_training.py trains with).
TINY_TRAIN = ("--iterations 2 --spacing 4 --base-features 4 --batch-size 2 --patch 32 48 48 "
              "--canvas 48 48 --log-every 1")


@dataclass(frozen=True)
class Step:
    """One command of a guide and what the walk-through does with it."""

    doc: str
    line: str                  # as written in the guide
    run: Optional[str]         # the command run, or None when skipped
    note: str = ""             # why it is changed or skipped


Handler = Callable[[str], Tuple[Optional[str], str]]


def as_written(line: str) -> Tuple[Optional[str], str]:
    return line, ""


def skip(reason: str) -> Handler:
    return lambda line: (None, reason)


def pip_offline(line: str) -> Tuple[Optional[str], str]:
    """``pip install ARGS`` -> ``python -m pip install --no-index --no-build-isolation ARGS``
    (the venv's own interpreter; no network)."""
    rest = line.split("pip install", 1)[1]
    return f"python -m pip install -q --no-index --no-build-isolation{rest}", "offline"


def docs_tests(line: str) -> Tuple[Optional[str], str]:
    return ("python -m pytest -q -p no:cacheprovider Testing/test_docs.py",
            "the full suite is CI's job (.ci/run); here its documentation part")


def tiny(*changes: Tuple[str, str], append: str = "") -> Handler:
    """The line with regex ``changes`` applied and ``append`` added: the same command, small."""
    def handler(line: str) -> Tuple[Optional[str], str]:
        out = line.split("  #")[0].rstrip()
        for pattern, repl in changes:
            out, n = re.subn(pattern, repl, out)
            if n == 0:
                raise ValueError(f"rule expected {pattern!r} in {line!r}")
        return (out + (" " + append if append else "")), "tiny sizes"
    return handler


#: (regular expression a command line must match in full, what to do). First match wins.
RULES: List[Tuple[str, Handler]] = [
    (r"pip install .*", pip_offline),
    (r"python -m pytest -q(\s+#.*)?", docs_tests),
    (r"brainlobeseg demo -o brainlobeseg-demo", tiny(append="--size 96 96 32")),
    (r"python -m training train --data /path/to/scans --out runs/mine",
     tiny((r"/path/to/scans", "data/scans"), append=TINY_TRAIN)),
    (r"python -m training export --run runs/mine --out my-models( --metrics \S+ --overwrite)?", as_written),
    (r"python -m training evaluate --data /path/to/heldout --model my-models --out reports/mine",
     tiny((r"/path/to/heldout", "data/heldout"), append="--overlays 1")),
    (r"python -m training synth --atlas-dir atlas --out data/synth -n 200 --seed 1",
     tiny((r"-n 200", "-n 2"), append="--inplane 48 --slice-mm 4,6")),
    (r"python -m training synth --atlas-dir atlas --out data/synth256 -n 200 --seed 1 --inplane 256",
     tiny((r"-n 200", "-n 2"), (r"--inplane 256", "--inplane 64"), append="--slice-mm 4,6")),
    (r"make walkthrough\s+#.*", skip("this walk-through itself")),
    (r"make test-numpy126", skip("CI's numpy 1.26 step (.ci/run): minutes in a throwaway venv")),
    (r"make bench( ATLAS=atlas)?\s+#.*", skip("benchmark: minutes of CPU, rewrites Testing/benchmarks/RESULTS.md")),
    (r"python Testing/benchmarks/\w+\.py .*", skip("benchmark on held-out or real scans (minutes, needs data)")),
    (r"python -m training aspects_fit tune\.json bench\.json .*",
     skip("fits on the benchmark's dumps above (Testing/test_aspects_card.py fits on dumps made in code)")),
]

#: The first line of a block that is a synopsis (options in brackets), not commands.
SYNOPSIS = re.compile(r"^(brainlobeseg segment SCAN \[|python -m training synth --atlas-dir DIR )")


def shell_blocks(text: str) -> List[List[str]]:
    """The shell blocks of a markdown text: ``` fences (no language, sh, bash, shell) and
    indented blocks (4 spaces after a blank line, outside lists and tables)."""
    blocks: List[List[str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence:
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            if fence.group(1) in ("", "sh", "bash", "shell", "console"):
                blocks.append(lines[i + 1:j])
            i = j + 1
            continue
        if line.startswith("    ") and line.strip() and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            blocks.append([ln[4:] for ln in lines[i:j]])
            i = j
            continue
        i += 1
    return [b for b in ([ln.rstrip() for ln in block] for block in blocks) if any(b)]


def commands(block: List[str]) -> List[str]:
    """Command lines of a block: comments and blank lines dropped, ``\\`` continuations
    joined, ``a && b`` split (each part is its own step)."""
    joined: List[str] = []
    buf = ""
    for line in block:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1].strip() + " "
            continue
        joined.append((buf + line.strip()).strip())
        buf = ""
    out: List[str] = []
    for line in joined:
        out += [part.strip() for part in line.split(" && ")]
    return out


def plan(root: Path = ROOT) -> List[Union[Step, str]]:
    """Every command of the guides as a :class:`Step`, or the text of a line no rule
    covers (an error: the guides have a command the walk-through does not know)."""
    steps: List[Union[Step, str]] = []
    for doc in DOCS:
        for block in shell_blocks((root / doc).read_text(encoding="utf-8")):
            first = next(ln.strip() for ln in block if ln.strip())
            if SYNOPSIS.match(first):
                steps.append(Step(doc, first + " ...", None, "synopsis of the options, not a command"))
                continue
            for line in commands(block):
                for pattern, handler in RULES:
                    if re.fullmatch(pattern, line):
                        run, note = handler(line)
                        steps.append(Step(doc, line, run, note))
                        break
                else:
                    steps.append(f"{doc}: {line}")
    return steps


# ----------------------------------------------------------------------------- running

def fresh_clone(dest: Path) -> None:
    """The repository's files as a new clone would have them (tracked, plus untracked ones
    git does not ignore: the change under test), committed in a repository of their own so
    that ``git status`` tells afterwards what the commands left behind."""
    listed = subprocess.run(["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.name=walkthrough", "-c", "user.email=walkthrough@localhost"]
    subprocess.run(git + ["init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "fresh clone"], cwd=dest, check=True)


def make_data(clone: Path, atlas: Optional[Path]) -> None:
    """The guides' placeholders: labelled scans and held-out scans (code phantoms) under
    ``data/`` and the ``atlas`` folder (the given one, or a small fake one)."""
    sys.path[:0] = [str(ROOT / "BrainLobeSeg"), str(ROOT / "Testing")]
    from BrainLobeSegLib import phantom
    for folder, seeds in (("scans", (1, 2, 3)), ("heldout", (7, 8))):
        for i, seed in enumerate(seeds):
            case = phantom.make_scan(size=(72, 72, 36), spacing=(3.0, 3.0, 5.0),
                                     angles_deg=(3.0 * i, -2.0 * i, 4.0 * i), seed=seed)
            phantom.write_case(case, str(clone / "data" / folder), str(i + 1))
    if atlas is not None:
        (clone / "atlas").symlink_to(atlas.resolve(), target_is_directory=True)
    else:
        from test_synth import make_fake_atlas
        make_fake_atlas(clone / "atlas")


def leftovers(clone: Path) -> List[str]:
    """What ``git status`` shows after the walk-through: files the commands created that
    .gitignore does not cover, and tracked files they changed."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone,
                         check=True, capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if ln.strip()]


def walk(steps: Sequence[Step], clone: Path, online: bool) -> int:
    venv = clone / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv),
               PYTHONDONTWRITEBYTECODE="1")
    t_all = time.perf_counter()
    for n, step in enumerate(steps, 1):
        label = f"[{n}/{len(steps)}] {step.doc}: {step.line}"
        if step.run is None:
            print(f"{label}\n    skipped: {step.note}", flush=True)
            continue
        command = step.line if (online and step.note == "offline") else step.run
        print(f"{label}\n    $ {command}" + (f"    ({step.note})" if step.note else ""), flush=True)
        t = time.perf_counter()
        proc = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True,
                              text=True, timeout=1800)
        if proc.returncode != 0:
            print(f"    FAILED (exit {proc.returncode}) after {time.perf_counter() - t:.0f} s:\n"
                  + "\n".join("    | " + ln for ln in (proc.stdout + proc.stderr).splitlines()[-40:]))
            return 1
        print(f"    ok in {time.perf_counter() - t:.0f} s", flush=True)
    left = leftovers(clone)
    if left:
        print("FAILED: the documented commands left files that .gitignore does not cover, or "
              "changed tracked files:\n" + "\n".join("    " + ln for ln in left[:20])
              + (f"\n    ... and {len(left) - 20} more" if len(left) > 20 else ""))
        return 1
    print(f"walk-through passed: {sum(s.run is not None for s in steps)} commands run, "
          f"{sum(s.run is None for s in steps)} skipped, {time.perf_counter() - t_all:.0f} s")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m Testing.walkthrough", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--atlas", type=Path, default=None,
                   help="real atlas folder (docs/DESIGN.md section 5.2); default: a small fake one")
    p.add_argument("--keep", type=Path, default=None,
                   help="make the fresh clone here and keep it (default: a temporary folder, removed)")
    p.add_argument("--online", action="store_true", help="run `pip install` lines as written (network)")
    p.add_argument("--list", action="store_true", help="print the plan and stop")
    args = p.parse_args(argv)
    steps = plan()
    unknown = [s for s in steps if isinstance(s, str)]
    if unknown:
        print("the guides have commands the walk-through does not know (add a rule to "
              "Testing/walkthrough.py RULES):\n" + "\n".join("    " + u for u in unknown))
        return 1
    known = [s for s in steps if isinstance(s, Step)]
    if args.list:
        for s in known:
            print(f"{s.doc}: {s.line}\n    -> {s.run or 'skipped'}" + (f"  ({s.note})" if s.note else ""))
        return 0
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=False)
        clone = args.keep
        fresh_clone(clone)
        make_data(clone, args.atlas)
        return walk(known, clone, args.online)
    with tempfile.TemporaryDirectory(prefix="brainlobeseg-walkthrough-") as tmp:
        clone = Path(tmp) / "BrainLobeSeg"
        clone.mkdir()
        fresh_clone(clone)
        make_data(clone, args.atlas)
        return walk(known, clone, args.online)


if __name__ == "__main__":
    sys.exit(main())
