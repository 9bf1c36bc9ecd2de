"""Builds the C++/CUDA extension ``fastattn._C``; everything else is in pyproject.toml.

* The C++ CPU kernels (``csrc/*.cpp``, ``csrc/cpu/*.cpp``) are always built.
* The CUDA kernels (``csrc/cuda/*.cu``) are built when a CUDA GPU is visible here (torch sees one,
  or ``nvidia-smi`` lists one) and nvcc and a CUDA build of torch are there. ``FASTATTN_CUDA=1``
  forces them (and fails loudly without nvcc), ``FASTATTN_CUDA=0`` skips them, and a set
  ``TORCH_CUDA_ARCH_LIST`` (the architectures, default ``8.0;9.0a``) also asks for them.
  :func:`cuda_build_choice` is the rule; the build prints what it compiles and why.
* The Hopper forward (``csrc/cuda/sm90/``, on CUTLASS/CuTe headers) is added when the arch list
  holds ``9.0a`` and the headers are found: ``FASTATTN_CUTLASS_DIR`` (a folder with ``cute/`` and
  ``cutlass/``, or a CUTLASS checkout) or the ``nvidia-cutlass`` wheel
  (``pip install --no-deps nvidia-cutlass``; headers only).
* ``FASTATTN_SKIP_EXTENSION=1`` builds no extension at all (the Triton and reference paths still work).

Install with ``pip install --no-build-isolation -e .`` after installing torch: the extension
compiles against the torch that is already installed (``pip -v`` shows ninja's ``[n/N]`` progress).
An editable install is a link tree (setuptools' ``strict`` mode) found through a plain ``.pth``
path entry, so a clone in a folder named ``fastattn`` cannot shadow the package as an empty
namespace package when Python runs from the clone's parent folder.
"""

import glob
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping

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


def cuda_build_choice(
    env: Mapping[str, str], cuda_home: str | None, torch_cuda: str | None, gpu_visible: Callable[[], bool]
) -> tuple[bool, str]:
    """Whether to compile the CUDA kernels, and why (pure: every input is an argument).

    Args:
        env: the environment (``FASTATTN_CUDA``, ``TORCH_CUDA_ARCH_LIST`` are read).
        cuda_home: the CUDA toolkit folder, or None when there is none.
        torch_cuda: ``torch.version.cuda`` (None for a CPU-only torch).
        gpu_visible: asked only when nothing else decides: is a CUDA GPU visible here?

    Returns:
        ``(build, reason)``.

    Raises:
        SystemExit: ``FASTATTN_CUDA=1`` without a usable toolkit, or ``FASTATTN_CUDA`` not 0/1.
    """
    flag = env.get("FASTATTN_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"FASTATTN_CUDA must be 0 (skip the CUDA kernels) or 1 (build them), got {flag!r}")
    if flag == "0":
        return False, "FASTATTN_CUDA=0"
    missing = []
    if cuda_home is None:
        missing.append("no CUDA toolkit found (nvcc; set CUDA_HOME)")
    if torch_cuda is None:
        missing.append("torch is a CPU-only build")
    if flag == "1":
        if missing:
            raise SystemExit("FASTATTN_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(missing))
        return True, "FASTATTN_CUDA=1"
    if missing:
        return False, "; ".join(missing)
    if env.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return True, "TORCH_CUDA_ARCH_LIST is set"
    if gpu_visible():
        return True, "a CUDA GPU is visible"
    return False, "no CUDA GPU visible (FASTATTN_CUDA=1 builds them anyway)"


def _gpu_visible() -> bool:
    """Does torch see a CUDA GPU, or does ``nvidia-smi -L`` list one?"""
    import torch

    if torch.cuda.is_available():
        return True
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def _say(text: str) -> None:
    """Build messages: pip shows them with ``-v`` (and in its log when the build fails)."""
    print(f"fastattn build: {text}", flush=True)


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
        _say("FASTATTN_SKIP_EXTENSION=1: no C++/CUDA extension (the Triton and reference backends still work)")
        return [], {}
    import torch

    cuda_home = _find_cuda_home()
    with_cuda, why = cuda_build_choice(os.environ, cuda_home, torch.version.cuda, _gpu_visible)
    if with_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    from torch.utils.cpp_extension import BuildExtension as _TorchBuildExtension
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    class BuildExtension(_TorchBuildExtension):
        """Keeps the object files in this checkout's build/ folder, not in pip's throw-away one.

        `pip install -e .` builds in a new temporary folder each time, so a second install (the
        README's second Quickstart line, or a reinstall after editing one kernel) recompiled every
        source: minutes per CUDA file. With a fixed folder, ninja recompiles only the sources whose
        text, included headers or compile command changed. One folder per kind of build (CPU-only
        or with CUDA) and Python version, so switching between them does not throw the other away.
        """

        def finalize_options(self):
            super().finalize_options()
            kind = "cuda" if with_cuda else "cpu"
            self.build_temp = os.path.join(ROOT, "build", f"objects-{sys.implementation.cache_tag}-{kind}")

    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # No -std flag: torch.utils.cpp_extension picks the standard the installed torch needs (C++20 for 2.14).
    cxx_flags = ["-O3", "-fopenmp"]
    if os.environ.get("FASTATTN_NATIVE", "0") == "1":
        cxx_flags.append("-march=native")
    include_dirs = [os.path.join(ROOT, "csrc")]
    _say(f"C++ CPU kernels: {len(cpp_sources)} sources")
    if not with_cuda:
        _say(f"CUDA kernels: not built ({why})")
        ext = CppExtension(
            "fastattn._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
        return [ext], {"build_ext": BuildExtension}

    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    _say(f"CUDA kernels: {len(cuda_sources)} sources for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
         f"with {cuda_home}/bin/nvcc ({why}); the slow part: minutes per source and architecture")
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
    _say(hopper_note)
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


if __name__ == "__main__":  # also under pip: setuptools runs this file as __main__
    ext_modules, cmdclass = _extensions()
    _say(f"compiling with ninja, MAX_JOBS={os.environ.get('MAX_JOBS', 'all cores')}; "
         "its [n/N] progress lines show under pip -v" if ext_modules else "no extension to compile")
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
        # An editable install as a link tree behind a plain .pth path entry, not setuptools' default
        # import hook (which Python consults after a same-named folder in the working directory).
        options={"editable_wheel": {"mode": "strict"}},
    )
