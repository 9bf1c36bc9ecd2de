#!/usr/bin/env bash
# Builds fastattn._C for the GPU machine ahead of time, on a machine without a GPU, into prebuilt/<tag>/.
#
#   benchmarks/build_gpu_extension.sh [--force]
#
# The GPU machine runs Python 3.12 with torch 2.11.0 (CUDA 13.0 build); compiling the extension there
# would spend its scarce minutes, so this script compiles it here against exactly that Python and torch,
# for Hopper (TORCH_CUDA_ARCH_LIST=9.0a), strips it and puts it in prebuilt/<tag>/ (git-ignored) with a
# manifest.json. <tag> names Python, torch, CUDA and C++ ABI (benchmarks/prebuilt.py tag), e.g.
# py312-torch2.11.0-cu130-cxx11abi1. Send it along with `carry: ["prebuilt"]`; benchmarks/gpu_check.sh
# installs it when the machine's tag and this tree's C++/CUDA sources match, else builds there.
#
# Idempotent: the build runs in a persistent copy of the sources (BUILD_DIR), so a re-run recompiles only
# what changed, and a prebuilt whose source hash already matches is only re-checked (--force rebuilds).
# It ends by loading the library in that venv and listing torch.ops.fastattn.* (no GPU needed), so a
# broken build never travels. Rebuild after every change to csrc/ or setup.py (gpu_check.sh refuses a
# prebuilt built from other sources).
#
# Environment: VENV (default /work/venv312-torch211; created with PY312 and torch 2.11.0 + triton 3.6.0
# from the package index when missing), PY312 (a Python 3.12 interpreter to create it with), BUILD_DIR
# (default ~/.cache/fastattn-gpu-build/<tag>), PREBUILT (default prebuilt), MAX_JOBS (default 1).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
FORCE=0
case "${1:-}" in
  --force) FORCE=1 ;;
  -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
  "") ;;
  *) echo "build_gpu_extension: unknown argument '$1' (see --help)" >&2; exit 2 ;;
esac

START=$SECONDS
VENV=${VENV:-/work/venv312-torch211}
if [ ! -x "$VENV/bin/python" ]; then
  PY312=${PY312:-$(ls -d /root/.pyenv/versions/3.12.*/bin/python 2>/dev/null | tail -n 1)}
  PY312=${PY312:-python3.12}
  echo "creating $VENV with $PY312 (torch 2.11.0, triton 3.6.0 from the package index; several GB)"
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==2.11.0" "triton==3.6.0" numpy setuptools wheel ninja
fi
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"  # always the venv's ninja: another ninja's build log makes it start over
# The Hopper forward (csrc/cuda/sm90) compiles against CUTLASS's headers; without them setup.py skips it
# and the GPU run would never see that kernel. Headers only, hence --no-deps.
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('cutlass_library') is None)"; then
  "$VENV/bin/pip" install -q --no-deps nvidia-cutlass
fi
TAG=$("$PY" benchmarks/prebuilt.py tag)
HASH=$("$PY" benchmarks/prebuilt.py source-hash)
PREBUILT=${PREBUILT:-prebuilt}
DEST="$PREBUILT/$TAG"
echo "tag $TAG, sources $HASH, destination $DEST"

if [ $FORCE -eq 0 ] && [ -f "$DEST/manifest.json" ] && grep -q "\"source_hash\": \"$HASH\"" "$DEST/manifest.json"; then
  echo "prebuilt $DEST is up to date (same sources); re-checking it (--force rebuilds)"
else
  BUILD_DIR=${BUILD_DIR:-$HOME/.cache/fastattn-gpu-build/$TAG}
  mkdir -p "$BUILD_DIR"
  # Only what setup.py reads; cp -p keeps modification times, so ninja recompiles only changed files.
  rm -rf "$BUILD_DIR/csrc"
  cp -rp csrc setup.py pyproject.toml "$BUILD_DIR/"
  mkdir -p "$BUILD_DIR/fastattn" "$BUILD_DIR/triton_kernels"  # setup.py names these packages
  (
    cd "$BUILD_DIR"
    FASTATTN_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=${MAX_JOBS:-1} "$PY" setup.py -q build_ext --inplace
  )
  shopt -s nullglob
  libs=("$BUILD_DIR"/fastattn/_C*.so)
  shopt -u nullglob
  if [ ${#libs[@]} -ne 1 ]; then
    echo "build_gpu_extension: expected one $BUILD_DIR/fastattn/_C*.so, found ${#libs[@]}" >&2
    exit 1
  fi
  STAGE=$(mktemp -d)
  trap 'rm -rf "$STAGE"' EXIT
  cp "${libs[0]}" "$STAGE/"
  strip --strip-unneeded "$STAGE/$(basename "${libs[0]}")"
  "$PY" - "$STAGE/manifest.json" "$TAG" "$HASH" <<'EOF'
import datetime, json, sys, torch
path, tag, source_hash = sys.argv[1:]
json.dump({"tag": tag, "source_hash": source_hash, "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": sys.version.split()[0], "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI), "arch_list": "9.0a",
           "built_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")},
          open(path, "w"), indent=1)
EOF
  rm -rf "$DEST"
  mkdir -p "$PREBUILT"
  mv "$STAGE" "$DEST"
  trap - EXIT
  chmod 755 "$DEST"
fi

# The check: load it in the target venv and list its ops, and find Hopper code in it and the Hopper
# forward's CUDA kernel registered; else it is removed.
if ! "$PY" benchmarks/prebuilt.py check "$DEST"/_C*.so || ! grep -qa sm_90a "$DEST"/_C*.so; then
  echo "build_gpu_extension: $DEST does not load; removing it" >&2
  rm -rf "$DEST"
  exit 1
fi
if ! "$PY" -c "import sys, torch; torch.ops.load_library(sys.argv[1]);
sys.exit(not torch._C._dispatch_has_kernel_for_dispatch_key('fastattn::attention_fwd_sm90', 'CUDA'))" "$DEST"/_C*.so; then
  echo "build_gpu_extension: $DEST lacks the Hopper forward (attention_fwd_sm90 has no CUDA kernel); removing it" >&2
  rm -rf "$DEST"
  exit 1
fi
echo "prebuilt $DEST: $(du -h "$DEST"/_C*.so | cut -f1) library, folder $(du -sh "$PREBUILT" | cut -f1), in $((SECONDS - START)) s"
