"""Mutation check of the CPU-side CUDA checks: every mutant in tests/cuda_emu/mutants.txt must be caught.

Each mutant is a small, realistic bug in csrc/ (a missing PDL wait, a dropped bounds guard, an
unaligned vector load, a dropped barrier, swapped MMA fragments, one wrong output element...). The
mutated copy of csrc/ is built into the host emulator and run by ``python -m tests.cuda_emu.check``
in a subprocess (a crash counts as caught and does not take pytest down); the test fails if that
check passes, i.e. if the emulator tests would let the bug through. The unmutated sources must pass
the same check, or every mutant would be "caught" for nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cuda_emu import emulator

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = ROOT / "tests" / "cuda_emu" / "mutants.txt"


@dataclass
class Mutant:
    name: str
    why: str
    file: str = ""
    find: str = ""
    replace: str = ""


def load_mutants(path: Path = MUTANTS) -> list[Mutant]:
    """Parse mutants.txt: blocks of '== name: why', 'file: F', '- find', '+ replace'."""
    out: list[Mutant] = []
    for line in path.read_text().splitlines():
        if line.startswith("== "):
            name, _, why = line[3:].partition(":")
            out.append(Mutant(name.strip(), why.strip()))
        elif line.startswith("file: "):
            out[-1].file = line[6:].strip()
        elif line.startswith("- "):
            out[-1].find = line[2:]
        elif line.startswith("+ "):
            out[-1].replace = line[2:]
    for m in out:
        assert m.file and m.find and m.replace is not None, f"incomplete mutant {m.name} in {path}"
    return out


def _check(csrc: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.cuda_emu.check", str(csrc)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


needs_cxx = pytest.mark.skipif(emulator.compiler() is None, reason="no C++ compiler")


@needs_cxx
def test_unmutated_sources_pass():
    proc = _check(ROOT / "csrc")
    assert proc.returncode == 0, f"the check fails on the real sources:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@needs_cxx
def test_sanitized_emulator_is_clean():
    """The emulator built with ASan + UBSan runs every check case with no report (no stray store, no
    shared-memory overflow, no misaligned access), which the checked loads alone would not show."""
    import os

    env = dict(os.environ, **emulator.sanitizer_env())
    if not all(os.path.isfile(p) for p in env["LD_PRELOAD"].split(":")):
        pytest.skip("no ASan/UBSan runtime for this compiler")
    proc = subprocess.run([sys.executable, "-m", "tests.cuda_emu.check", "--sanitize"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0 and "all cases pass" in proc.stdout, (
        f"sanitized emulator run failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")


def _mutate_and_check(mutant: Mutant, root: Path) -> subprocess.CompletedProcess | str:
    """Build and check a copy of csrc/ with ``mutant`` applied; a str says why it could not be applied."""
    csrc = root / mutant.name / "csrc"
    shutil.copytree(ROOT / "csrc", csrc)
    src = csrc / mutant.file
    text = src.read_text()
    if text.count(mutant.find) != 1:
        return (f"mutant {mutant.name}: {mutant.find!r} occurs {text.count(mutant.find)} times in csrc/{mutant.file} "
                "(must be once): update tests/cuda_emu/mutants.txt")
    src.write_text(text.replace(mutant.find, mutant.replace))
    return _check(csrc)


@pytest.fixture(scope="module")
def mutant_checks(request, tmp_path_factory) -> dict:
    """{mutant name: its check's result} for every selected mutant, run in parallel subprocesses (each
    builds its own emulator: the list would otherwise take ~11 s of one core per mutant, in series)."""
    selected = [item.callspec.params["mutant"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_mutant_is_caught" and hasattr(item, "callspec")]
    root = tmp_path_factory.mktemp("mutants")
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        futures = {m.name: pool.submit(_mutate_and_check, m, root) for m in selected}
        return {name: f.result() for name, f in futures.items()}


@needs_cxx
@pytest.mark.parametrize("mutant", load_mutants(), ids=lambda m: m.name)
def test_mutant_is_caught(mutant, mutant_checks):
    proc = mutant_checks[mutant.name]
    assert not isinstance(proc, str), proc
    assert proc.returncode != 0, (f"mutant {mutant.name} ({mutant.why}) survives: the CPU checks pass on it\n"
                                  f"{proc.stdout[-2000:]}")
