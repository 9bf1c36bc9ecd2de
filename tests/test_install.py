"""The install: setup.py's CUDA build switch, the editable-install layout, py.typed."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_setup():
    spec = importlib.util.spec_from_file_location("fastattn_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the helpers, runs no setup()
    return module


setup_py = _load_setup()
choice = setup_py.cuda_build_choice


def _never_asked():
    raise AssertionError("gpu_visible must not be asked here")


@pytest.mark.parametrize("gpu", [True, False])
def test_default_builds_cuda_only_when_a_gpu_is_visible(gpu):
    build, reason = choice({}, "/usr/local/cuda", "13.0", lambda: gpu)
    assert build is gpu
    assert reason == ("a CUDA GPU is visible" if gpu else "no CUDA GPU visible (FASTATTN_CUDA=1 builds them anyway)")


def test_fastattn_cuda_0_skips_without_asking_anything():
    assert choice({"FASTATTN_CUDA": "0"}, "/usr/local/cuda", "13.0", _never_asked) == (False, "FASTATTN_CUDA=0")
    assert choice({"FASTATTN_CUDA": "0"}, None, None, _never_asked) == (False, "FASTATTN_CUDA=0")


def test_fastattn_cuda_1_forces_the_build_without_a_gpu():
    assert choice({"FASTATTN_CUDA": " 1 "}, "/usr/local/cuda", "13.0", _never_asked) == (True, "FASTATTN_CUDA=1")


@pytest.mark.parametrize("cuda_home, torch_cuda, match", [
    (None, "13.0", "no CUDA toolkit found"), ("/usr/local/cuda", None, "CPU-only build"), (None, None, "CPU-only"),
])
def test_fastattn_cuda_1_fails_loudly_when_it_cannot_build(cuda_home, torch_cuda, match):
    with pytest.raises(SystemExit, match=f"FASTATTN_CUDA=1 .*{match}"):
        choice({"FASTATTN_CUDA": "1"}, cuda_home, torch_cuda, _never_asked)


def test_arch_list_asks_for_cuda_without_a_gpu():
    env = {"TORCH_CUDA_ARCH_LIST": "9.0a"}
    assert choice(env, "/usr/local/cuda", "13.0", _never_asked) == (True, "TORCH_CUDA_ARCH_LIST is set")
    # ... but only where it can be built; an empty value does not count.
    assert choice(env, None, "13.0", _never_asked)[0] is False
    assert choice({"TORCH_CUDA_ARCH_LIST": " "}, "/usr/local/cuda", "13.0", lambda: False)[0] is False


@pytest.mark.parametrize("cuda_home, torch_cuda, reason", [
    (None, "13.0", "no CUDA toolkit found (nvcc; set CUDA_HOME)"),
    ("/usr/local/cuda", None, "torch is a CPU-only build"),
])
def test_no_toolkit_or_cpu_torch_skips_with_the_reason(cuda_home, torch_cuda, reason):
    assert choice({}, cuda_home, torch_cuda, _never_asked) == (False, reason)


def test_bad_fastattn_cuda_value_names_the_variable():
    with pytest.raises(SystemExit, match="FASTATTN_CUDA must be 0 .* or 1 .*got 'yes'"):
        choice({"FASTATTN_CUDA": "yes"}, "/usr/local/cuda", "13.0", _never_asked)


def test_ci_compiles_every_cuda_source_explicitly():
    """CI runs on a machine without a GPU, so it asks for the CUDA kernels itself."""
    text = (ROOT / ".ci" / "run").read_text()
    assert "\nexport FASTATTN_CUDA=1\n" in text


def test_py_typed_is_package_data():
    assert (ROOT / "fastattn" / "py.typed").exists()
    assert 'fastattn = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()


def _editable_site(tmp_path: Path, mode: str | None) -> tuple[Path, Path]:
    """A copy of the project in ``<tmp>/parent/fastattn`` (a clone named like the package), its editable
    wheel (no extension) unpacked into ``<tmp>/site``. Returns ``(parent folder, site folder)``."""
    clone = tmp_path / "parent" / "fastattn"
    for name in ("setup.py", "pyproject.toml", "README.md"):
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, clone / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
    for name in ("fastattn", "triton_kernels"):
        shutil.copytree(ROOT / name, clone / name, ignore=ignore)
    settings = "" if mode is None else f"{{'editable_mode': {mode!r}}}"
    code = f"from setuptools import build_meta as b; print(b.build_editable({str(tmp_path / 'dist')!r}, {settings or 'None'}))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["FASTATTN_SKIP_EXTENSION"] = "1"
    out = subprocess.run([sys.executable, "-c", code], cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    wheel = tmp_path / "dist" / out.stdout.strip().splitlines()[-1]
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return clone.parent, site


def _import_from(parent: Path, site: Path) -> subprocess.CompletedProcess:
    """``import fastattn`` with the working directory at the clone's parent and ``site`` as a site dir."""
    # Forget a fastattn this Python already has installed (CI runs the tests from an editable install),
    # whether as a path entry or as an import hook, so only ``site`` and the working directory compete.
    forget = ("import os, sys; "
              "sys.path[:] = [p for p in sys.path if not p or not os.path.isfile(os.path.join(p, 'fastattn', '__init__.py'))]; "
              "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]; ")
    code = (forget + f"import site; site.addsitedir({str(site)!r}); import fastattn; "
            "print(fastattn.__file__); print(fastattn.attention.__name__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=parent, env=env, capture_output=True, text=True, timeout=300)


def test_editable_install_is_not_shadowed_by_a_clone_named_fastattn(tmp_path):
    parent, site = _editable_site(tmp_path, None)
    pth = [p.read_text().strip() for p in site.glob("*.pth")]
    assert len(pth) == 1 and not pth[0].startswith("import"), pth  # a path entry, not an import hook
    out = _import_from(parent, site)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [str(Path(pth[0]) / "fastattn" / "__init__.py"), "attention"]
    # fastattn.triton_kernels is inside the installed package, mapped from the top-level folder.
    assert (Path(pth[0]) / "fastattn" / "triton_kernels" / "__init__.py").exists()


def test_setuptools_default_editable_mode_has_the_trap(tmp_path):
    """The control: setuptools' default import hook loses to the clone folder, which is why setup.py
    picks the strict mode (if this starts passing, setuptools fixed it and the choice can be revisited)."""
    parent, site = _editable_site(tmp_path, "lenient")
    out = _import_from(parent, site)
    assert out.returncode != 0 and "has no attribute 'attention'" in out.stderr
