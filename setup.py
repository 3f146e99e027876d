"""Build script: the optional native extension `thinkless._C` from csrc/.

Everything else is declared in pyproject.toml. The extension is optional: with no C++ sources, or with
THINKLESS_SKIP_BUILD=1, the package installs as pure Python and the kernels fall back to torch on CPU.
Install with `pip install --no-build-isolation .` so the extension compiles against the torch already installed.
"""

import glob
import os

from setuptools import setup


def _extensions():
    if os.environ.get("THINKLESS_SKIP_BUILD", "0") == "1":
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as err:  # pragma: no cover - depends on the build environment
        raise SystemExit(
            "thinkless: building the native extension needs torch in the build environment.\n"
            "  pip install torch==2.13.0 && pip install --no-build-isolation .\n"
            "or skip the extension with THINKLESS_SKIP_BUILD=1 (the kernels fall back to torch)."
        ) from err
    ext = CppExtension(
        "thinkless._C",
        sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
