"""Builds posenc._C (the package metadata is in pyproject.toml): the C++ CPU rotary op always, the CUDA op where nvcc and a CUDA-enabled torch exist.

POSENC_CUDA=0 skips the CUDA part, POSENC_CUDA=1 requires it. A CPU-only torch cannot link a CUDA
extension, so "auto" (the default) builds CUDA only when both torch.version.cuda and nvcc are present.
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def want_cuda() -> bool:
    flag = os.environ.get("POSENC_CUDA", "auto").lower()
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag in ("1", "true", "yes"):
        if not available:
            raise RuntimeError("POSENC_CUDA=1 but no CUDA-enabled torch or nvcc (CUDA_HOME) was found")
        return True
    return flag not in ("0", "false", "no") and available


def extension():
    sources = ["csrc/ops.cpp", "csrc/rotary_cpu.cpp"]
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off"]  # no FMA contraction: round as the reference
    if not want_cuda():
        return CppExtension("posenc._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    arches = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", arches)
    # No --use_fast_math: it swaps sincosf for the approximate __sincosf. --fmad=false: no contraction of
    # x1*c - x2*s into an FMA, so the CUDA kernel rounds exactly as the CPU kernel and the reference do.
    nvcc = ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr", "--fmad=false"]
    return CUDAExtension(
        "posenc._C",
        sources + sorted(glob.glob("csrc/*.cu")),
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
