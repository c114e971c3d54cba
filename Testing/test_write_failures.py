"""Writing on a full disk, into a read-only folder, and signals while writing (issue 14).

A full disk is made with ``RLIMIT_FSIZE`` in a subprocess (SIGXFSZ ignored, so a write
past the limit fails with EFBIG as on a full disk): SimpleITK's NIfTI writer then only
prints ``** ERROR: NWAD`` and returns, which used to publish a cut file. Each test checks
the exit status, the one error line, that nothing was published and no staging is left.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
import SimpleITK as sitk

from BrainLobeSegLib import imageio
from BrainLobeSegLib.errors import EXIT_INPUT_ERROR

from test_robustness import head_image, leftovers, tree_hashes, write


@pytest.fixture(autouse=True)
def ctrl_c_reaches_python():
    """Ctrl+C handled as Python does by default, whatever this process inherited.

    A test run started in the background by a shell without job control (``cmd &`` in a
    script) inherits SIGINT *ignored*; Python then installs no KeyboardInterrupt handler,
    the SIGINTs these tests send vanish, and so would a subprocess's (exec keeps an ignored
    signal ignored). Seen as three failures of this file in such a run, none in the
    foreground. A handler set here is reset to the default at exec, so children get
    Python's own handler too."""
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


CANCELLED = 130


def run_limited(args: List[str], limit: int, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m BrainLobeSegLib.cli *args`` with files limited to ``limit`` bytes."""
    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "BrainLobeSegLib.cli", *args], capture_output=True,
                          text=True, timeout=timeout, preexec_fn=limit_files, env=env)


def error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{stderr}"
    assert lines[0].startswith("brainlobeseg: error: "), lines[0]
    return lines[0]


def published(folder: Path) -> List[str]:
    return sorted(p.name for p in Path(folder).rglob("*") if p.is_file()) if Path(folder).exists() else []


def test_verify_written_catches_a_cut_file(tmp_path):
    """The check itself: each format cut short is found, each complete file passes."""
    img = head_image()
    for name in ("a.nii.gz", "a.nii", "a.nrrd", "a.seg.nrrd"):
        path = tmp_path / name
        sitk.WriteImage(img, str(path), useCompression=name != "a.nii")
        imageio.verify_written(str(path), img)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 40])
        with pytest.raises(imageio.IncompleteWrite, match="came out incomplete"):
            imageio.verify_written(str(path), img)


@pytest.mark.parametrize("limit", [300, 6000])
def test_segment_on_a_full_disk(limit, tmp_path, tiny_models):
    """The first (limit 300 bytes) or a later file (6000) does not fit: exit 2, one
    "no space left on" line, nothing published, no staging left, inputs unchanged."""
    indir, outdir = tmp_path / "in", tmp_path / "out"
    indir.mkdir()
    scan = write(head_image(), indir / "case.nii.gz")
    before = tree_hashes(indir)
    proc = run_limited(["segment", str(scan), "-o", str(outdir), "--model", str(tiny_models),
                        "--device", "cpu", "--assume-upright"], limit)
    assert proc.returncode == EXIT_INPUT_ERROR, proc.stderr
    line = error_line(proc.stderr)
    assert f"no space left on {outdir}" in line and "nothing was written" in line, line
    assert published(outdir) == [] and leftovers(outdir) == []
    assert tree_hashes(indir) == before


def test_save_case_on_a_full_disk(tmp_path):
    """``save-case`` said "saved case 1" and left a cut 1.nii.gz in the training set."""
    indir, dataset = tmp_path / "in", tmp_path / "set"
    indir.mkdir()
    scan = write(head_image(), indir / "case.nii.gz")
    seg = sitk.Cast(head_image() > 20, sitk.sitkUInt8)
    write(seg, indir / "seg.nii.gz")
    proc = run_limited(["save-case", str(scan), str(indir / "seg.nii.gz"), "--dataset", str(dataset)],
                       2000)
    assert proc.returncode == EXIT_INPUT_ERROR, proc.stderr + proc.stdout
    line = error_line(proc.stderr)
    assert f"no space left on {dataset}" in line, line
    assert "saved" not in proc.stdout
    assert published(dataset) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("command", ["segment", "align"])
def test_read_only_output_folder(command, tmp_path, tiny_models, capfd):
    from BrainLobeSegLib import cli
    indir, outdir = tmp_path / "in", tmp_path / "out"
    indir.mkdir()
    outdir.mkdir()
    scan = write(head_image(), indir / "case.nii.gz")
    outdir.chmod(0o555)
    try:
        args = (["segment", str(scan), "-o", str(outdir), "--model", str(tiny_models), "--device",
                 "cpu", "--assume-upright"] if command == "segment"
                else ["align", str(scan), "-o", str(outdir / "t.txt"), "--force"])
        code = cli.main(args)
    finally:
        outdir.chmod(0o755)
    line = error_line(capfd.readouterr().err)
    assert code == EXIT_INPUT_ERROR
    assert "Permission denied" in line and "Free some space" not in line, line
    assert published(outdir) == []


def test_os_errors_get_their_own_advice(tmp_path):
    """Free space is advised for a full disk only (the read-only test above is skipped
    when the tests run as root, who may write anywhere)."""
    import errno
    from BrainLobeSegLib.errors import from_os_error
    target = str(tmp_path / "out" / "x.nii.gz")
    full = from_os_error(OSError(errno.ENOSPC, "No space left on device", target), str(tmp_path / "out"))
    assert str(full).startswith(f"no space left on {tmp_path / 'out'}") and "Free some space" in str(full)
    for code in (errno.EACCES, errno.EROFS, errno.ENOTDIR):
        err = str(from_os_error(OSError(code, os.strerror(code), target)))
        assert "Free some space" not in err and os.strerror(code) in err and "\n" not in err


def _signal_while_writing(tmp_path, tiny_models, signum, attempts: int = 3):
    """Start ``segment`` and send ``signum`` as soon as its staging folder appears.

    The write phase of the small test scan lasts milliseconds, so now and then the run
    publishes and exits 0 before the signal lands (seen once in a full suite run on a busy
    2-core machine): such a run missed the window and says nothing about signals, so the
    scenario is tried again, in a fresh folder, up to ``attempts`` times."""
    for attempt in range(attempts):
        result = _signal_once(tmp_path / f"try{attempt}", tiny_models, signum)
        if result[0] != 0:
            break
    return result


def _signal_once(tmp_path, tiny_models, signum, ignored: bool = False):
    """One run of ``segment`` that gets ``signum`` while writing; the child starts with the
    signal ignored (``ignored``) or at its default, whatever this test process inherited
    (under ``nohup`` SIGHUP arrives ignored, and the CLI now keeps an ignored signal so)."""
    tmp_path.mkdir()
    indir, outdir = tmp_path / "in", tmp_path / "out"
    indir.mkdir()
    outdir.mkdir()
    scan = write(head_image(size=(160, 160, 60), spacing=(1.4, 1.4, 2.0)), indir / "case.nii.gz")
    proc = subprocess.Popen([sys.executable, "-m", "BrainLobeSegLib.cli", "segment", str(scan),
                             "-o", str(outdir), "--model", str(tiny_models), "--device", "cpu",
                             "--assume-upright"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True,
                            preexec_fn=lambda: signal.signal(signum, signal.SIG_IGN if ignored else signal.SIG_DFL))
    deadline = time.monotonic() + 180
    while not leftovers(outdir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    caught = bool(leftovers(outdir))
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err, outdir, caught


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_while_writing(signum, tmp_path, tiny_models):
    """SIGTERM left a hidden .partial-* folder (exit 143, nothing printed); now each of
    SIGTERM, SIGHUP and SIGINT ends like Ctrl+C: exit 130, one line, nothing published."""
    code, out, err, outdir, caught = _signal_while_writing(tmp_path, tiny_models, signum)
    assert caught, f"the run ended before its write phase: {err}"
    assert code == CANCELLED, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["brainlobeseg: cancelled; nothing was written."], err
    assert published(outdir) == [] and leftovers(outdir) == []


def test_an_ignored_signal_does_not_stop_the_run(tmp_path, tiny_models):
    """``nohup brainlobeseg ...`` ignores SIGHUP so that the run outlives the terminal; the
    CLI used to install its interrupt handler over the ignored one, so a closed terminal
    still cancelled the run (exit 130). A SIGHUP sent while it writes now changes nothing:
    it finishes, exit 0, and publishes its outputs."""
    code, out, err, outdir, caught = _signal_once(tmp_path / "run", tiny_models, signal.SIGHUP, ignored=True)
    assert caught, f"the run ended before its write phase: {err}"
    assert code == 0, err
    assert published(outdir) and leftovers(outdir) == []


def test_a_signal_just_after_the_staging_folder_is_made_leaves_nothing(tmp_path, monkeypatch):
    """A real SIGINT sent to this process the moment the staging folder exists (the
    window where ``__exit__`` cannot run yet, seen as a leftover ``.partial-*`` folder
    after SIGHUP under load): the interrupt goes through, and neither the staging folder
    nor the output folder it made is left."""
    from BrainLobeSegLib import output
    real_mkdir = Path.mkdir

    def mkdir_then_signal(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        if self.name.startswith(".partial-"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)   # the handler runs at the next bytecode, well within this

    monkeypatch.setattr(Path, "mkdir", mkdir_then_signal)
    with pytest.raises(KeyboardInterrupt):
        output.OutputSet(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_ctrl_c_during_commit_waits_for_the_whole_set(tmp_path, monkeypatch):
    """An interrupt that lands between two of the commit's moves (a real SIGINT to this
    process) is held until every staged file is in place, then raised: the case's outputs
    are all new, never half old and half new, and no staging folder is left."""
    from BrainLobeSegLib import output
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (out / name).write_text("old")
    real_replace = os.replace
    moves = []

    def replace_then_signal(src, dst):
        real_replace(src, dst)
        moves.append(dst)
        if len(moves) == 1:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)   # the handler runs at the next bytecode, well within this

    with pytest.raises(KeyboardInterrupt):
        with output.OutputSet(str(out)) as staged:
            for name in ("a.txt", "b.txt", "c.txt"):
                Path(staged.path(name)).write_text("new")
            monkeypatch.setattr(os, "replace", replace_then_signal)
            staged.commit()
    assert len(moves) == 3
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a.txt": "new", "b.txt": "new", "c.txt": "new"}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
