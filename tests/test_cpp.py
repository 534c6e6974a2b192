"""Runs the C++ GoogleTest kernel tests through CMake/CTest; any failing C++ test fails here."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "ctest"


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_googletest_kernels():
    cuda = os.environ.get("AETHER_CMAKE_CUDA", "OFF")  # ON on a GPU machine (bench/gpu_check.sh)
    configure = _run(["cmake", "-S", ".", "-B", str(BUILD), f"-DAETHER_CUDA={cuda}", "-DCMAKE_BUILD_TYPE=Release"])
    assert configure.returncode == 0, configure.stdout + configure.stderr
    jobs = str(os.cpu_count() or 2)
    build = _run(["cmake", "--build", str(BUILD), "-j", jobs])
    assert build.returncode == 0, build.stdout[-5000:] + build.stderr[-5000:]
    test = _run(["ctest", "--test-dir", str(BUILD), "--output-on-failure", "-j", jobs])
    print(test.stdout[-3000:])
    if test.returncode != 0:
        # The parallel log interleaves 75 tests: show the failing ones' own output (the seed and
        # the failed assertions) by running them again alone, with the seeds they failed with
        # where the log names them (a fresh seed could pass).
        rerun = _run(["ctest", "--test-dir", str(BUILD), "--rerun-failed", "--output-on-failure"])
        failures = [line for line in test.stdout.splitlines()
                    if "Failure" in line or "seed " in line or "Which is" in line or "Expected" in line]
        raise AssertionError("GoogleTest failed; lines of the first run:\n" + "\n".join(failures[:60]) +
                             "\n--- the failed tests again, alone (fresh seeds):\n" + rerun.stdout[-8000:] +
                             "\n--- summary of the first run:\n" + test.stdout[-2000:] + test.stderr[-2000:])
    assert "tests passed" in test.stdout and "No tests were found" not in test.stdout
