"""Build of the `aether._C` extension.

CUDA sources are compiled when torch was built with CUDA and nvcc is found (CUDA_HOME); set
AETHER_CPU_ONLY=1 to skip them. Target architectures come from TORCH_CUDA_ARCH_LIST; by default
the GPU that is present (sm_90 becomes sm_90a so Hopper-only paths are available), else "9.0a".
Kernel sources never include torch: only csrc/torch/*.cpp does, which keeps nvcc fast.
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda() -> bool:
    if os.environ.get("AETHER_CPU_ONLY", "0") == "1":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def _default_arch_list() -> str:
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        # sm_90a unlocks wgmma/setmaxnreg; portable paths stay valid for any 9.0 card.
        return f"{major}.{minor}a" if (major, minor) == (9, 0) else f"{major}.{minor}"
    return "9.0a"


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cxx_flags = ["-O3", "-Wall", "-Wno-unused-parameter"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cpu_sources = _sources("csrc/cpu/*.cpp") + ["csrc/torch/ops.cpp", "csrc/torch/module.cpp"]
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_arch_list())
        sources = cpu_sources + _sources("csrc/kernels/*.cu")
        return [
            CUDAExtension(
                "aether._C",
                sources,
                include_dirs=include_dirs,
                define_macros=[("AETHER_WITH_CUDA", "1")],
                extra_compile_args={
                    "cxx": cxx_flags,
                    "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
                },
                libraries=["dl"],
            )
        ]
    return [CppExtension("aether._C", cpu_sources, include_dirs=include_dirs, extra_compile_args=cxx_flags)]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    packages=find_packages(include=["aether", "aether.*"]),
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
)
