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
    assert test.returncode == 0, test.stdout[-8000:] + test.stderr[-2000:]
    assert "tests passed" in test.stdout and "No tests were found" not in test.stdout
