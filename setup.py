"""Builds the C++/CUDA extension ``fastattn._C``; everything else is in pyproject.toml.

* The C++ CPU kernels (``csrc/*.cpp``, ``csrc/cpu/*.cpp``) are always built.
* The CUDA kernels (``csrc/cuda/*.cu``) are built when nvcc is usable:
  ``FASTATTN_CUDA=1`` forces them (and fails loudly without nvcc), ``FASTATTN_CUDA=0`` skips them.
  ``TORCH_CUDA_ARCH_LIST`` picks the architectures (default ``8.0;9.0a``).
* The Hopper forward (``csrc/cuda/sm90/``, on CUTLASS/CuTe headers) is added when the arch list
  holds ``9.0a`` and the headers are found: ``FASTATTN_CUTLASS_DIR`` (a folder with ``cute/`` and
  ``cutlass/``, or a CUTLASS checkout) or the ``nvidia-cutlass`` wheel
  (``pip install --no-deps nvidia-cutlass``; headers only).
* ``FASTATTN_SKIP_EXTENSION=1`` builds no extension at all (the Triton and reference paths still work).

Install with ``pip install --no-build-isolation -e .`` after installing torch: the extension
compiles against the torch that is already installed.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home() -> str | None:
    """The real CUDA toolkit folder. ``nvcc`` on the PATH may be a wrapper script, so its
    folder is only trusted when it holds the toolkit headers."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for path in candidates:
        if path and os.path.exists(os.path.join(path, "include", "cuda_runtime.h")) and os.path.exists(
            os.path.join(path, "bin", "nvcc")
        ):
            return path
    return None


def _want_cuda(cuda_home: str | None) -> bool:
    flag = os.environ.get("FASTATTN_CUDA", "").strip()
    if flag == "0":
        return False
    import torch

    usable = cuda_home is not None and torch.version.cuda is not None
    if flag == "1" and not usable:
        sys.exit(
            "FASTATTN_CUDA=1 but the CUDA extension cannot be built: "
            f"CUDA toolkit {'not found (set CUDA_HOME)' if cuda_home is None else 'found at ' + cuda_home}, "
            f"torch CUDA version {torch.version.cuda}"
        )
    return usable


# ---- Hopper (sm_90a) forward on CuTe: its sources, include folder and the note printed at build ----
def _cutlass_include() -> str | None:
    """The folder holding CUTLASS's ``cute/`` and ``cutlass/`` headers, or None."""
    import importlib.util

    candidates = []
    if os.environ.get("FASTATTN_CUTLASS_DIR"):
        root = os.environ["FASTATTN_CUTLASS_DIR"]
        candidates += [root, os.path.join(root, "include")]
    spec = importlib.util.find_spec("cutlass_library")  # the nvidia-cutlass wheel; not imported
    if spec is not None and spec.origin:
        candidates.append(os.path.join(os.path.dirname(spec.origin), "source", "include"))
    for path in candidates:
        if os.path.exists(os.path.join(path, "cute", "tensor.hpp")) and os.path.exists(
            os.path.join(path, "cutlass", "cutlass.h")
        ):
            return path
    return None


def _hopper_build() -> tuple[list[str], str | None, str]:
    """(sources, CUTLASS include folder, one-line note) of the Hopper forward. Its kernel file's
    device code is compiled for 9.0a targets only (an arch guard empties it for the others)."""
    arches = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(";", " ").split()
    if "9.0a" not in arches:
        return [], None, "Hopper forward (csrc/cuda/sm90) skipped: TORCH_CUDA_ARCH_LIST has no 9.0a"
    include = _cutlass_include()
    if include is None:
        return [], None, (
            "Hopper forward (csrc/cuda/sm90) skipped: CUTLASS headers not found "
            "(pip install --no-deps nvidia-cutlass, or set FASTATTN_CUTLASS_DIR)"
        )
    sources = sorted(glob.glob("csrc/cuda/sm90/*.cu") + glob.glob("csrc/cuda/sm90/*.cpp"))
    return sources, include, f"Hopper forward (csrc/cuda/sm90) built for sm_90a with CUTLASS headers from {include}"


def _extensions():
    if os.environ.get("FASTATTN_SKIP_EXTENSION") == "1":
        return [], {}
    cuda_home = _find_cuda_home()
    with_cuda = _want_cuda(cuda_home)
    if with_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # No -std flag: torch.utils.cpp_extension picks the standard the installed torch needs (C++20 for 2.14).
    cxx_flags = ["-O3", "-fopenmp"]
    if os.environ.get("FASTATTN_NATIVE", "0") == "1":
        cxx_flags.append("-march=native")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not with_cuda:
        ext = CppExtension(
            "fastattn._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
        return [ext], {"build_ext": BuildExtension}

    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    extra_includes = []
    # torch's CUDA headers include cusparse.h, which a pip-installed torch ships in
    # site-packages/nvidia/cu13/include rather than in the toolkit. It goes last, after the
    # toolkit's own headers, so it only fills that gap.
    try:
        import nvidia

        for base in nvidia.__path__:
            for sub in ("cu13/include", "cusparse/include"):
                path = os.path.join(base, sub)
                if os.path.exists(os.path.join(path, "cusparse.h")):
                    extra_includes.append(path)
    except ImportError:
        pass
    idirafter = [f"-idirafter{p}" for p in extra_includes]
    nvcc_flags = [
        "-O3",
        "--use_fast_math",
        "--expt-relaxed-constexpr",
        "--expt-extended-lambda",
        "-lineinfo",
        "--resource-usage" if os.environ.get("FASTATTN_RESOURCE_USAGE") == "1" else "",
        *[f"-Xcompiler={flag}" for flag in idirafter],
        f"--threads={os.environ.get('FASTATTN_NVCC_THREADS', '2')}",
    ]
    define_macros = [("FASTATTN_WITH_CUDA", "1")]
    hopper_sources, cutlass_include, hopper_note = _hopper_build()
    print(f"fastattn: {hopper_note}")
    if hopper_sources:
        cuda_sources += hopper_sources
        include_dirs.append(cutlass_include)
        define_macros.append(("FASTATTN_WITH_SM90", "1"))
    ext = CUDAExtension(
        "fastattn._C",
        cpp_sources + cuda_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags + idirafter, "nvcc": [f for f in nvcc_flags if f]},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    package_dir={"fastattn": "fastattn", "fastattn.triton_kernels": "triton_kernels"},
    packages=[
        "fastattn",
        *[f"fastattn.{p}" for p in find_packages("fastattn")],
        "fastattn.triton_kernels",
        *[f"fastattn.triton_kernels.{p}" for p in find_packages("triton_kernels")],
    ],
)
