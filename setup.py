"""Build script: the native extension `thinkless._C` from csrc/ (everything else is in pyproject.toml).

    pip install torch==2.13.0 "setuptools>=70.1" && pip install --no-build-isolation .

`--no-build-isolation` compiles against the torch already installed, which is the one that will load it.
THINKLESS_SKIP_BUILD=1 installs pure Python; the kernels then fall back to torch on CPU (with a warning).

SIMD: the row kernels use ATen's `at::vec` (Sleef exp/log from libtorch). They are built for AVX2 + FMA when the
building CPU has them (almost every x86-64 CPU since 2013), else for ATen's portable DEFAULT; override with
THINKLESS_CPU_CAPABILITY=DEFAULT|AVX2|AVX512 (e.g. DEFAULT for a wheel that must run on any x86-64). The module
records what it was built for, and thinkless refuses to use it on a CPU without that instruction set.

CUDA sources (csrc/*.cu) would be compiled only when both a CUDA build of torch and nvcc are present; on GPUs the
kernels are Triton, so there are none today.
"""

import glob
import os
import platform
import shutil
import sys

from setuptools import setup

CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}

HOW_TO_FIX = (
    "  install a C++17 compiler (Debian/Ubuntu: apt install g++; Fedora: dnf install gcc-c++;\n"
    "  macOS: xcode-select --install; conda: conda install -c conda-forge cxx-compiler),\n"
    "  or skip the native extension: THINKLESS_SKIP_BUILD=1 pip install --no-build-isolation .\n"
    "  (the kernels then fall back to torch on CPU)."
)


def _cpu_capability() -> str:
    chosen = os.environ.get("THINKLESS_CPU_CAPABILITY")
    if chosen:
        if chosen not in CAPABILITY_FLAGS:
            raise SystemExit(f"THINKLESS_CPU_CAPABILITY must be one of {', '.join(CAPABILITY_FLAGS)}; got {chosen!r}")
        return chosen
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "DEFAULT"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "DEFAULT"
    return "AVX2" if {"avx2", "fma", "f16c"} <= set(flags) else "DEFAULT"


def _extensions():
    if os.environ.get("THINKLESS_SKIP_BUILD", "0") == "1":
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as err:  # pragma: no cover - depends on the build environment
        raise SystemExit(
            "thinkless: building the native extension needs torch in the build environment.\n"
            "  pip install torch==2.13.0 && pip install --no-build-isolation .\n"
            "or skip the extension with THINKLESS_SKIP_BUILD=1 (the kernels fall back to torch)."
        ) from err
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler.split()[0]) is None:
        raise SystemExit(f"thinkless: no C++ compiler ({compiler!r}) to build the native CPU extension.\n" + HOW_TO_FIX)

    capability = _cpu_capability()
    cxx = ["-O3", "-std=c++17", f"-DCPU_CAPABILITY={capability}", f'-DTHINKLESS_CPU_CAPABILITY="{capability}"']
    cxx += [f"-DCPU_CAPABILITY_{capability}"] if capability != "DEFAULT" else []
    cxx += CAPABILITY_FLAGS[capability]
    # at::parallel_for is OpenMP in torch's CPU builds; without -fopenmp it would run on one thread. The linked
    # libgomp.so.1 resolves to the copy torch has already loaded.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    use_cuda = bool(cu_sources) and torch.version.cuda is not None and CUDA_HOME is not None
    if use_cuda:
        ext = CUDAExtension(
            "thinkless._C",
            sources + cu_sources,
            extra_compile_args={"cxx": cxx + openmp, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=openmp,
        )
    else:
        ext = CppExtension("thinkless._C", sources, extra_compile_args={"cxx": cxx + openmp}, extra_link_args=openmp)

    class Build(BuildExtension):
        """BuildExtension whose failure says how to get a compiler or skip the build."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as err:
                raise SystemExit(f"thinkless: compiling the native CPU extension failed: {err}\n" + HOW_TO_FIX) from err

    return [ext], {"build_ext": Build}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
