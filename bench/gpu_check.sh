#!/usr/bin/env bash
# The GPU checks, on one machine with CUDA, Python 3.12 and PyTorch but no package registry:
#
#     bash bench/gpu_wheels.sh     # beforehand, on a machine with PyPI: fills bench/gpu_wheels/
#     bash bench/gpu_check.sh      # on the GPU machine, from a copy of the checkout with bench/gpu_wheels/
#
# 1. installs into $GPU_SITE (/tmp/site), from bench/gpu_wheels/ only (pip --no-index): the
#    core wheels (pytorch-ignite, hydra-core, omegaconf, antlr4, submitit, cloudpickle) always,
#    the extra ones (tensorboard & co, nvidia-ml-py, safetensors, PyYAML, tqdm, pytest ...) only
#    where the machine lacks the distribution, and igniter built from this checkout (setuptools
#    from bench/gpu_wheels/build/; the prebuilt bench/gpu_wheels/igniter/ wheel if that fails).
#    The machine's torch is used as it is: this script never installs one.
# 2. prints Python, torch, CUDA, cuDNN, NCCL and the GPUs (nvidia-smi);
# 3. runs `pytest -m gpu tests/gpu` on MNIST (bench/gpu_wheels/data) -> bench/results/gpu/pytest.{txt,xml}
#    (tests/gpu/test_gpu_figures.py, a bf16 GPT's MFU and the peak table's NVML lookup, needs the machine's
#    transformers; it generates its own text);
# 4. runs bench/overhead.py on MNIST on CUDA: loop vs igniter -> bench/results/gpu/overhead_mnist.json,
#    and bf16 / 4-micro-batch accumulation -> bench/results/gpu/overhead_mnist_precision.json.
# Each step has a time budget (the whole script stays under 8 minutes); a failed step does not stop
# the next ones; the exit status is 1 when any step failed (2: the machine cannot run them at all).
# The log is bench/results/gpu/gpu_check.log; where $OUT is set, results and log are copied there too.
# GPU_CHECK_CPU=1: a dry run on a machine without CUDA (installs, then every GPU test skips).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$PWD"
WHEELS="$REPO/bench/gpu_wheels"
RESULTS="$REPO/bench/results/gpu"
SITE="${GPU_SITE:-/tmp/site}"
PY="${PYTHON:-python3}"
TOTAL_S="${GPU_CHECK_BUDGET_S:-450}"   # under 8 minutes, all steps together
START=$(date +%s)

export PY SITE WHEELS REPO RESULTS
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
exec 3>&1 4>&2
exec > >(tee "$LOG") 2>&1
TEE_PID=$!

FAILED=()
finish() {  # finish <exit status>: let tee write the whole log, copy results and log to $OUT, exit
  exec 1>&3 2>&4
  wait "$TEE_PID" 2>/dev/null
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/gpu" && cp -p "$RESULTS"/* "$OUT/gpu/" 2>/dev/null
    echo "gpu_check: results and log copied to $OUT/gpu"
  fi
  exit "$1"
}
die() {  # the machine cannot run the checks at all
  echo "gpu_check: ERROR: $*"
  finish 2
}
elapsed() { echo $(( $(date +%s) - START )); }
budget() {  # budget <seconds wanted>: what is left of TOTAL_S (minus 10 s for the end), at most that
  local left=$(( TOTAL_S - $(elapsed) - 10 ))
  (( left < $1 )) && echo "$left" || echo "$1"
}
step() {  # step <name> <seconds> <command or exported function...>: run it under timeout, record a failure, go on
  local name="$1" want="$2"; shift 2
  local secs; secs=$(budget "$want")
  echo
  echo "=== $name (budget ${secs} s, $(elapsed) s elapsed)"
  if (( secs < 15 )); then
    echo "=== $name: SKIPPED, no time left"
    FAILED+=("$name (no time left)")
    return 1
  fi
  local t0 rc=0; t0=$(date +%s)
  timeout --kill-after=15 "$secs" bash -c '"$@"' _ "$@" || rc=$?
  local took=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then
    echo "=== $name: ok in ${took} s"
  elif (( rc == 124 || rc == 137 )); then
    echo "=== $name: TIMED OUT after ${took} s (budget ${secs} s)"
    FAILED+=("$name (timed out)")
  else
    echo "=== $name: FAILED (exit $rc) after ${took} s"
    FAILED+=("$name (exit $rc)")
  fi
  return "$rc"
}

echo "gpu_check: $(date -u +%FT%TZ) on ${HOSTNAME:-?}, checkout $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"

# --- the machine: Python, torch with CUDA, numpy (never installed here), the wheels
command -v "$PY" >/dev/null || die "no $PY"
[ -d "$WHEELS/core" ] || die "no $WHEELS/core: run 'bash bench/gpu_wheels.sh' on a machine with PyPI first (and carry bench/gpu_wheels along)"
"$PY" -c "import torch" || die "torch does not import with $PY: this script uses the machine's PyTorch and never installs one"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch.cuda.is_available() is False (torch %s, built for CUDA %s)' % (torch.__version__, torch.version.cuda))" \
  || { [ "${GPU_CHECK_CPU:-}" = 1 ] && echo "gpu_check: WARNING: no CUDA (GPU_CHECK_CPU=1: a dry run of this script, the GPU tests skip)"; } \
  || die "CUDA is not usable from torch: the GPU checks need a GPU"
"$PY" -c "import numpy" || { ls "$WHEELS"/extra/numpy-*.whl >/dev/null 2>&1 || die "numpy does not import and bench/gpu_wheels has none: run 'WITH_NUMPY=1 bash bench/gpu_wheels.sh'"; }
"$PY" -c "import sys; v = sys.version_info[:2]; v == (3, 12) or print('gpu_check: WARNING: Python %d.%d: the binary wheels in bench/gpu_wheels are for 3.12' % v)"

# --- install: pip --no-index from bench/gpu_wheels into $SITE (or unzip the wheels where pip is missing)
install_wheels() {  # install_wheels <target dir> <wheel>...
  local target="$1"; shift
  (( $# )) || return 0
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --disable-pip-version-check \
      --target "$target" "$@"
  else  # a wheel is a zip archive laid out for site-packages
    echo "no pip: unpacking the wheels into $target"
    local w; for w in "$@"; do "$PY" -m zipfile -e "$w" "$target" || return 1; done
  fi
}
missing_wheels() {  # the wheels in <dir> whose distribution the machine's Python does not have
  "$PY" - "$1" <<'EOF'
import importlib.metadata as md, sys
from pathlib import Path
for whl in sorted(Path(sys.argv[1]).glob("*.whl")):
    name = whl.name.split("-")[0]
    try:
        print(f"  has {name} {md.version(name)}", file=sys.stderr)
    except md.PackageNotFoundError:
        print(whl)
EOF
}

package_dirs() {  # the top-level source directories of pyproject.toml's packages (what the build reads)
  "$PY" - "$REPO/pyproject.toml" <<'EOF'
import sys, tomllib
setup = tomllib.load(open(sys.argv[1], "rb"))["tool"]["setuptools"]
where = setup.get("package-dir", {})
print("\n".join(sorted({where.get(p, p.replace(".", "/")).split("/")[0] for p in setup["packages"]})))
EOF
}

install_all() {
  rm -rf "$SITE" /tmp/gpu_build /tmp/gpu_igniter && mkdir -p "$SITE" /tmp/gpu_igniter
  echo "core wheels (always):"; ls "$WHEELS"/core/*.whl | sed 's|.*/|  |'
  install_wheels "$SITE" "$WHEELS"/core/*.whl || return 1
  local extra; mapfile -t extra < <(missing_wheels "$WHEELS/extra")
  echo "extra wheels the machine lacks:"; if (( ${#extra[@]} )); then printf '  %s\n' "${extra[@]##*/}"; else echo "  (none)"; fi
  install_wheels "$SITE" "${extra[@]}" || return 1
  # igniter from this checkout as it is now (a copy: the build leaves build/ and *.egg-info behind)
  local src=/tmp/gpu_build/src
  local tops; mapfile -t tops < <(package_dirs)  # igniter, configs, hydra_plugins ...
  mkdir -p "$src" && cp -r "${tops[@]/#/$REPO/}" "$REPO"/{pyproject.toml,README.md} "$src"/ || return 1
  find "$src" -name __pycache__ -prune -exec rm -rf {} +
  if install_wheels /tmp/gpu_build/site "$WHEELS"/build/setuptools-*.whl \
     && PYTHONPATH=/tmp/gpu_build/site "$PY" -m pip wheel -q --no-index --no-deps --no-build-isolation \
          --disable-pip-version-check -w /tmp/gpu_igniter "$src"; then
    echo "igniter: built from this checkout"
  else
    echo "gpu_check: WARNING: igniter could not be built here: installing the prebuilt wheel of $(head -1 "$WHEELS/igniter/BUILT_FROM" 2>/dev/null)"
    echo "gpu_check: WARNING: that wheel is igniter as it was when bench/gpu_wheels.sh ran, not necessarily this checkout"
    cp "$WHEELS"/igniter/igniter-*.whl /tmp/gpu_igniter/ || return 1
  fi
  install_wheels "$SITE" /tmp/gpu_igniter/igniter-*.whl || return 1
  PYTHONPATH="$SITE:$REPO" "$PY" - <<'EOF'
import importlib, importlib.metadata as md
for mod, dist in [("igniter", "igniter"), ("igniter.configs", None), ("ignite", "pytorch-ignite"), ("hydra", "hydra-core"),
                  ("omegaconf", "omegaconf"), ("antlr4", "antlr4-python3-runtime"), ("submitit", "submitit"),
                  ("tensorboard", "tensorboard"), ("pynvml", "nvidia-ml-py"), ("safetensors", "safetensors"),
                  ("tqdm", "tqdm"), ("yaml", "PyYAML"), ("numpy", "numpy"), ("pytest", "pytest")]:
    m = importlib.import_module(mod)
    print(f"  {mod:16s} {md.version(dist) if dist else '':14s} {getattr(m, '__file__', None) or list(m.__path__)[0]}")
EOF
}
export -f install_wheels missing_wheels package_dirs install_all
step install 120 install_all || die "the installation from bench/gpu_wheels failed (see above)"
export PYTHONPATH="$SITE:$REPO"
export PATH="$SITE/bin:$PATH"

# --- versions
"$PY" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()} | torch {torch.__version__} | CUDA {torch.version.cuda} | cuDNN {torch.backends.cudnn.version()}"
      f" | NCCL {'.'.join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else 'no'}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}, bf16 {torch.cuda.is_bf16_supported()}")
EOF
nvidia-smi || echo "(no nvidia-smi)"

# --- the GPU tests
export IGNITER_TEST_MNIST_ROOT="$WHEELS/data"
[ -d "$IGNITER_TEST_MNIST_ROOT/MNIST/raw" ] || echo "gpu_check: WARNING: no MNIST in $IGNITER_TEST_MNIST_ROOT/MNIST/raw"
run_pytest() {
  "$PY" -m pytest -m gpu tests/gpu -q -rA -p no:cacheprovider --junitxml="$RESULTS/pytest.xml" 2>&1 | tee "$RESULTS/pytest.txt"
  return "${PIPESTATUS[0]}"
}
export -f run_pytest
step "pytest -m gpu" 240 run_pytest

# --- the benchmarks (MNIST LeNet, batch 128, one GPU)
MNIST_DATA="$WHEELS/data"
step "overhead mnist (loop, igniter)" 90 \
  "$PY" bench/overhead.py --workloads mnist --mnist "$MNIST_DATA" --device cuda --rounds 3 \
    --variants loop igniter --out "$RESULTS/overhead_mnist.json"
step "overhead mnist precision (bf16, accumulate 4)" 120 \
  "$PY" bench/overhead.py --workloads mnist --mnist "$MNIST_DATA" --device cuda --rounds 3 \
    --variants loop_bf16 igniter_bf16 loop_accum4 igniter_accum4 --out "$RESULTS/overhead_mnist_precision.json"

# --- summary
echo
echo "gpu_check: done in $(elapsed) s; results in $RESULTS:"
ls -la "$RESULTS"
if (( ${#FAILED[@]} )); then
  echo "gpu_check: FAILED: ${FAILED[*]}"
  finish 1
fi
echo "gpu_check: every step passed"
finish 0
