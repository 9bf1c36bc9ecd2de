"""The prebuilt extension that travels to the GPU machine: its tag, its installation, its check.

    python benchmarks/prebuilt.py tag                 # the running Python/torch's tag, e.g. py312-torch2.11.0-cu130-cxx11abi1
    python benchmarks/prebuilt.py install [--dir prebuilt]   # copy prebuilt/<tag>/_C*.so into fastattn/ if it fits
    python benchmarks/prebuilt.py check SO            # load SO into torch, list torch.ops.fastattn.*, fail if broken
    python benchmarks/prebuilt.py source-hash         # hash of the sources the extension is built from

``benchmarks/build_gpu_extension.sh`` builds ``prebuilt/<tag>/`` (the stripped ``_C.cpython-*.so`` and a
``manifest.json`` naming the tag and the source hash). ``benchmarks/gpu_check.sh`` calls ``install`` before
anything imports fastattn: the library is used only when the running interpreter has the same tag (Python
version, torch version, CUDA version, C++ ABI) and the C++/CUDA sources hash the same as when it was built;
otherwise ``install`` says why and exits 3, and the check builds the extension itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_SUFFIXES = (".cpp", ".cu", ".cuh", ".h")
NOT_USABLE = 3  # exit code of ``install`` when the prebuilt library does not fit this machine


def tag() -> str:
    """Names what a compiled extension must match to load: Python, torch, its CUDA, its C++ ABI."""
    import torch

    cuda = (torch.version.cuda or "none").replace(".", "")
    abi = int(bool(torch._C._GLIBCXX_USE_CXX11_ABI))
    return f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.split('+')[0]}-cu{cuda}-cxx11abi{abi}"


def source_hash(root: Path = ROOT) -> str:
    """sha256 over setup.py and the C++/CUDA sources under csrc/ (paths and contents), 16 hex digits."""
    digest = hashlib.sha256()
    files = [root / "setup.py"] + sorted(p for p in (root / "csrc").rglob("*") if p.suffix in SOURCE_SUFFIXES)
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def install(prebuilt_dir: Path, root: Path = ROOT) -> tuple[bool, str]:
    """Copies ``prebuilt_dir/<tag>/_C*.so`` to ``root/fastattn/`` when tag and source hash match.

    Returns:
        (used, message): whether the library was installed, and why (not).
    """
    want = tag()
    folder = prebuilt_dir / want
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        have = sorted(p.name for p in prebuilt_dir.iterdir() if p.is_dir()) if prebuilt_dir.is_dir() else []
        return False, f"no prebuilt extension for {want} in {prebuilt_dir} (there: {', '.join(have) or 'none'})"
    manifest = json.loads(manifest_path.read_text())
    libs = sorted(folder.glob("_C*.so"))
    if len(libs) != 1:
        return False, f"{folder} holds {len(libs)} _C*.so files, expected one"
    sources = source_hash(root)
    if manifest.get("source_hash") != sources:
        return False, (f"prebuilt {want} was built from sources {manifest.get('source_hash')}, this tree's are "
                       f"{sources} (csrc/ or setup.py changed since; rebuild with benchmarks/build_gpu_extension.sh)")
    shutil.copy2(libs[0], root / "fastattn" / libs[0].name)
    return True, (f"using prebuilt {want} ({libs[0].stat().st_size / 2**20:.1f} MiB, sources {sources}, "
                  f"built {manifest.get('built_utc', '?')}, arch {manifest.get('arch_list', '?')})")


def check(so_path: Path, need_cuda: bool = True) -> list[str]:
    """Loads the library into torch and returns its ops; raises RuntimeError when it is broken.

    Loading needs no GPU: the ops register with the dispatcher when the library is opened.
    """
    import importlib.util

    import torch

    torch.ops.load_library(str(so_path))
    spec = importlib.util.spec_from_file_location("fastattn._C", so_path)
    module = importlib.util.module_from_spec(spec)  # runs PyInit__C: the Python module imports too
    spec.loader.exec_module(module)
    if need_cuda and not module.build_info().get("cuda"):
        raise RuntimeError(f"{so_path} was built without its CUDA kernels (build_info: {module.build_info()})")
    ops = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("fastattn::"))
    for op in ("fastattn::attention_fwd", "fastattn::attention_bwd"):
        if op not in ops:
            raise RuntimeError(f"{so_path} does not define {op} (ops: {ops})")
        keys = ["CPU", "CUDA"] if need_cuda else ["CPU"]
        missing = [key for key in keys if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key)]
        if missing:
            raise RuntimeError(f"{so_path} registers no {'/'.join(missing)} kernel for {op}")
    return ops


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("tag")
    sub.add_parser("source-hash")
    i = sub.add_parser("install")
    i.add_argument("--dir", type=Path, default=ROOT / "prebuilt")
    c = sub.add_parser("check")
    c.add_argument("so", type=Path)
    c.add_argument("--cpu-only", action="store_true", help="do not require the CUDA kernels")
    args = parser.parse_args(argv)
    if args.command == "tag":
        print(tag())
    elif args.command == "source-hash":
        print(source_hash())
    elif args.command == "install":
        used, message = install(args.dir)
        print(message)
        return 0 if used else NOT_USABLE
    else:
        try:
            ops = check(args.so, need_cuda=not args.cpu_only)
        except (OSError, RuntimeError) as exc:
            print(f"check: {exc}", file=sys.stderr)
            return 1
        for op in ops:
            print(f"torch.ops.{op.replace('::', '.')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
