#!/usr/bin/env bash
# Download, on a machine with PyPI, what bench/gpu_check.sh installs on a GPU machine that has
# CUDA, Python 3.12 and PyTorch but no package registry. Run from anywhere:
#
#     bash bench/gpu_wheels.sh
#
# Writes the git-ignored folder bench/gpu_wheels/:
#   core/    always installed there (they shadow any other version): pytorch-ignite, hydra-core,
#            omegaconf, antlr4-python3-runtime, submitit, cloudpickle
#   extra/   installed there only when the distribution is missing (a torch image often has
#            numpy, PyYAML, tqdm, packaging ...): tensorboard and what it needs, nvidia-ml-py,
#            safetensors, PyYAML, tqdm, pytest and what it needs
#   build/   setuptools, to build igniter's wheel there from the checkout as it is then
#   igniter/ igniter's wheel built here now (the fallback when the build there fails: it is
#            this commit's code, see igniter/BUILT_FROM)
#   data/MNIST/raw/  the MNIST IDX files (the GPU machine does not see ../shared)
# Versions are pinned to those of the dev venv (.venv) when this script was written; wheels
# for CPython 3.12, x86_64 manylinux. Existing files are kept (pip skips what is there).
# WITH_NUMPY=1 adds a numpy wheel to extra/ (for a GPU machine whose torch has no numpy).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$REPO/bench/gpu_wheels"
MNIST_SRC="${MNIST_SRC:-$REPO/../shared/data/MNIST/raw}"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY=python3

# pinned to `pip show` in /work/main/.venv (Python 3.11 there; the wheels are for 3.12)
CORE=(
  pytorch-ignite==0.5.5
  hydra-core==1.3.8
  omegaconf==2.3.1
  antlr4-python3-runtime==4.9.3
  submitit==1.5.4
  cloudpickle==3.1.3
)
EXTRA=(
  # igniter's own dependencies that a bare torch install lacks
  tensorboard==2.21.0
  nvidia-ml-py==13.615.71
  safetensors==0.8.0
  tqdm==4.70.1
  PyYAML==6.0.4
  packaging==26.4
  typing_extensions==4.16.0
  # tensorboard's Requires-Dist (numpy, packaging, pillow, setuptools: usually there with torch)
  absl-py==2.5.1
  grpcio==1.85.3
  Markdown==3.11.3
  protobuf==7.36.2
  tensorboard-data-server==0.7.2
  Werkzeug==3.1.9
  MarkupSafe==3.0.4
  pillow==13.0.0
  # pytest and its Requires-Dist
  pytest==9.2.0
  iniconfig==2.3.1
  pluggy==1.7.0
  Pygments==2.21.0
)
# numpy (16 MiB) only on request: a PyTorch install nearly always has it
[ "${WITH_NUMPY:-}" = 1 ] && EXTRA+=(numpy==2.4.6)
BUILD=(setuptools==84.2.1)

PLATFORM=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any)

download() {  # download <subdir> <name==version>...
  local sub="$1"; shift
  mkdir -p "$DEST/$sub"
  for spec in "$@"; do
    local name="${spec%%==*}" version="${spec##*==}"
    if compgen -G "$DEST/$sub/$(echo "$name" | tr 'A-Z.-' 'a-z__')-$version-*.whl" >/dev/null; then
      continue  # already here
    fi
    if "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORM[@]}" -d "$DEST/$sub" "$spec" 2> >(grep -v "^WARNING: Location" >&2); then
      continue
    fi
    # no wheel on PyPI (antlr4-python3-runtime 4.9.3 is an sdist only): build a pure-Python one here
    echo "no 3.12 wheel for $spec: building one here" >&2
    "$PY" -m pip wheel -q --no-deps "$spec" -w "$DEST/$sub" 2> >(grep -v "^WARNING: Location" >&2)
  done
}

download core "${CORE[@]}"
download extra "${EXTRA[@]}"
download build "${BUILD[@]}"

# every wheel must be installable by CPython 3.12 on x86_64 Linux
"$PY" - "$DEST" <<'EOF'
import re, sys
from pathlib import Path
bad = []
for whl in sorted(Path(sys.argv[1]).glob("*/*.whl")):
    py, abi, plat = whl.name[:-4].split("-")[-3:]
    ok_py = any(t in ("py3", "cp312") or (re.fullmatch(r"cp3\d+", t) and abi == "abi3") for t in py.split("."))
    ok_abi = any(t in ("none", "abi3", "cp312") for t in abi.split("."))
    ok_plat = any(t == "any" or re.fullmatch(r"manylinux(1|2010|2014|_2_\d+)_x86_64", t) for t in plat.split("."))
    if not (ok_py and ok_abi and ok_plat):
        bad.append(whl.name)
if bad:
    sys.exit("wheels that CPython 3.12 x86_64 Linux may not install:\n  " + "\n  ".join(bad))
EOF

# what the downloaded wheels need that this folder does not hold (expected: numpy, torch ...)
echo "Requires-Dist not in bench/gpu_wheels (must be on the GPU machine already):"
"$PY" - "$DEST" <<'EOF'
import re, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "extra": ""}
dest = Path(sys.argv[1])
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
have, needs = set(), {}
for whl in sorted(dest.glob("*/*.whl")):
    have.add(norm(whl.name.split("-")[0]))
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                req = Requirement(line.split(":", 1)[1].strip())
                if req.marker is not None and not req.marker.evaluate(ENV):
                    continue  # backports for older Pythons, Windows-only ...
                name = norm(req.name)
                needs.setdefault(name, []).append(whl.name.split("-")[0])
for name, by in sorted(needs.items()):
    if name not in have:
        print(f"  {name:20s} (needed by {', '.join(sorted(set(by)))})")
EOF

# igniter itself, from this checkout (the fallback: gpu_check.sh builds it from the tree there)
rm -rf "$DEST/igniter" && mkdir -p "$DEST/igniter"
"$PY" -m pip wheel -q --no-deps --no-build-isolation "$REPO" -w "$DEST/igniter"
git -C "$REPO" rev-parse HEAD > "$DEST/igniter/BUILT_FROM" 2>/dev/null || true
git -C "$REPO" status --porcelain -- igniter configs pyproject.toml | sed 's/^/  uncommitted: /' >> "$DEST/igniter/BUILT_FROM" || true

# the MNIST IDX files (torchvision's layout: data/MNIST/raw/*.gz)
mkdir -p "$DEST/data/MNIST/raw"
cp -p "$MNIST_SRC"/*.gz "$DEST/data/MNIST/raw/"
chmod u+w "$DEST"/data/MNIST/raw/*.gz

echo
( cd "$DEST" && du -sh core extra build igniter data 2>/dev/null )
echo "total: $(du -sh "$DEST" | cut -f1) in $DEST ($(du -sb "$DEST" | cut -f1) bytes)"
