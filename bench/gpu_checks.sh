#!/usr/bin/env bash
# Everything that only a GPU can check, in one run on a machine with an NVIDIA GPU: builds our
# CUDA kernels for this machine's GPU, runs every CUDA test (kernel parity against the PyTorch
# reference, the gsplat backend and cross-check, one host sync per avatar frame), then the kernel
# benchmarks. See `bash bench/gpu_checks.sh --help`.
set -uo pipefail

usage() {
  cat <<'EOF'
Usage: bash bench/gpu_checks.sh [options]

Builds gsavatar's CUDA kernels for the local GPU, runs the CUDA tests and the kernel benchmarks,
and writes one log per step into the output folder. Needs: an NVIDIA GPU with its driver, the
CUDA toolkit (nvcc), torch with CUDA, ninja, numpy, opencv and pytest. gsplat 1.5.3 is optional:
without it the gsplat tests skip and the gsplat columns read n/a.

Options (each also settable through the environment variable in brackets):
  --repo DIR               repository root (REPO; default: the one holding this script)
  --out DIR                folder for the logs (OUT_DIR; default: gpu-results-YYYYmmdd-HHMMSS in
                           the current folder)
  --avatar FILE            a trained avatar.pt (AVATAR; optional): enables the avatar-level tests
                           and the whole-frame benchmark
  --wheels DIR             install every *.whl in DIR (WHEELS; optional, offline, no dependencies
                           resolved) into OUT/site-packages first, e.g. gsplat 1.5.3 and its
                           dependencies on a machine without internet access
  --kernel-timeout S       bound on our kernels' build (KERNEL_TIMEOUT; default 1200)
  --gsplat-timeout S       bound on gsplat's own JIT build (GSPLAT_TIMEOUT; default 900)
  --test-timeout S         bound on the CUDA tests (TEST_TIMEOUT; default 1800)
  --bench-timeout S        bound on each benchmark (BENCH_TIMEOUT; default 900)
  --no-write               do not append the benchmark rows to BENCHMARKS.md (by default they are
                           appended to the repository's BENCHMARKS.md, as `--write` does)
  -h, --help               this text
A bound of 0 means no limit. TORCH_CUDA_ARCH_LIST (default: the local GPU's compute capability),
MAX_JOBS (default: all cores), GSAVATAR_KERNEL_CACHE and PYTHON (default python3) are honoured.

Wheels for an offline machine can be fetched elsewhere with, e.g.:
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 -d WHEELS_DIR gsplat==1.5.3 packaging jaxtyping wadler-lindig
A trained avatar for --avatar: RUN_DIR/avatar.pt of any finished run (e.g. cpu-30min on a CPU).

Exit status: 0 when every step passed, 1 when a step failed or hit its bound (see summary.txt).
EOF
}

die() { echo "gpu_checks.sh: $*" >&2; exit 2; }

REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
OUT_DIR=${OUT_DIR:-gpu-results-$(date +%Y%m%d-%H%M%S)}
AVATAR=${AVATAR:-}
WHEELS=${WHEELS:-}
KERNEL_TIMEOUT=${KERNEL_TIMEOUT:-1200}
GSPLAT_TIMEOUT=${GSPLAT_TIMEOUT:-900}
TEST_TIMEOUT=${TEST_TIMEOUT:-1800}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-900}
WRITE=--write
PYTHON=${PYTHON:-python3}

while [ $# -gt 0 ]; do
  case "$1" in
    --repo) REPO=${2:?--repo needs a folder}; shift 2 ;;
    --out) OUT_DIR=${2:?--out needs a folder}; shift 2 ;;
    --avatar) AVATAR=${2:?--avatar needs a file}; shift 2 ;;
    --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
    --kernel-timeout) KERNEL_TIMEOUT=${2:?}; shift 2 ;;
    --gsplat-timeout) GSPLAT_TIMEOUT=${2:?}; shift 2 ;;
    --test-timeout) TEST_TIMEOUT=${2:?}; shift 2 ;;
    --bench-timeout) BENCH_TIMEOUT=${2:?}; shift 2 ;;
    --no-write) WRITE=; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
for t in "$KERNEL_TIMEOUT" "$GSPLAT_TIMEOUT" "$TEST_TIMEOUT" "$BENCH_TIMEOUT"; do
  [[ "$t" =~ ^[0-9]+$ ]] || die "timeouts are whole seconds (got '$t')"
done

command -v nvidia-smi > /dev/null || die "nvidia-smi not found: this script needs a machine with an NVIDIA GPU"
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || die "torch sees no CUDA device (a CPU-only torch, or no GPU)"

# Absolute paths before leaving the caller's folder.
mkdir -p "$OUT_DIR" || die "cannot create $OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
[ -f "$REPO/gsavatar/__init__.py" ] || die "$REPO is not the gsavatar repository (no gsavatar/__init__.py)"
REPO=$(cd "$REPO" && pwd)
if [ -n "$AVATAR" ]; then
  [ -f "$AVATAR" ] || die "no avatar file $AVATAR"
  AVATAR=$(cd "$(dirname "$AVATAR")" && pwd)/$(basename "$AVATAR")
fi
if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || die "no wheel folder $WHEELS"
  WHEELS=$(cd "$WHEELS" && pwd)
fi
cd "$REPO"

export PYTHONUNBUFFERED=1
# Build for this GPU only (our kernels and gsplat's source-only wheel both JIT-compile for every
# architecture torch knows unless told), with all cores.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
fi
export TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -n "$WHEELS" ]; then
  compgen -G "$WHEELS/*.whl" > /dev/null || die "no .whl files in $WHEELS"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target "$OUT_DIR/site-packages" \
    "$WHEELS"/*.whl || die "installing the wheels from $WHEELS failed"
  export PYTHONPATH="$OUT_DIR/site-packages"
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$REPO"
[ -n "$AVATAR" ] && export GSAVATAR_TEST_AVATAR="$AVATAR"

summary="$OUT_DIR/summary.txt"
: > "$summary"
failed=0

# step NAME LOG TIMEOUT COMMAND...: runs COMMAND (bounded unless TIMEOUT is 0), output to the
# terminal and LOG, and records its outcome and duration in summary.txt.
step() {
  local name=$1 log=$2 limit=$3 start rc
  shift 3
  start=$(date +%s)
  echo "== $name" | tee -a "$OUT_DIR/$log"
  if [ "$limit" -gt 0 ]; then
    timeout --signal=TERM --kill-after=30 "$limit" "$@" 2>&1 | tee -a "$OUT_DIR/$log"
  else
    "$@" 2>&1 | tee -a "$OUT_DIR/$log"
  fi
  rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - start ))
  if [ "$rc" -eq 0 ]; then
    echo "$name: ok ($took s)" | tee -a "$summary"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "$name: stopped at its bound of $limit s" | tee -a "$summary"
    failed=1
  else
    echo "$name: FAILED, exit $rc ($took s; see $log)" | tee -a "$summary"
    failed=1
  fi
  return "$rc"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
} 2>&1 | tee "$OUT_DIR/gpu.txt"

step "kernel build" build.log "$KERNEL_TIMEOUT" \
  "$PYTHON" -c "from gsavatar import kernels; kernels.load('cuda')"

# gsplat's own JIT build, timed on its own and bounded, so that a slow build cannot eat the tests'
# and benchmarks' time unseen (its tests and columns then skip or read n/a, and say why).
if "$PYTHON" -c "import gsplat" 2> /dev/null; then
  step "gsplat build" build.log "$GSPLAT_TIMEOUT" \
    "$PYTHON" -c "from gsplat.cuda._backend import _C; assert _C is not None, 'gsplat built no CUDA module'"
else
  echo "gsplat build: skipped (gsplat not installed)" | tee -a "$summary"
fi

step "CUDA tests" tests.log "$TEST_TIMEOUT" \
  "$PYTHON" -m pytest -q -ra tests/test_kernels_raster.py tests/test_kernels_hashgrid.py tests/test_rasterize.py \
  tests/test_gsplat_backend.py

step "rasterizer benchmark" bench_raster.log "$BENCH_TIMEOUT" "$PYTHON" bench/bench_kernels.py raster $WRITE
step "hash-grid benchmark" bench_hashgrid.log "$BENCH_TIMEOUT" "$PYTHON" bench/bench_hashgrid.py $WRITE
if [ -n "$AVATAR" ]; then
  step "whole-frame benchmark" bench_frame.log "$BENCH_TIMEOUT" \
    "$PYTHON" bench/bench_kernels.py frame "$AVATAR" --size 512 $WRITE
else
  echo "whole-frame benchmark: skipped (no --avatar)" | tee -a "$summary"
fi

echo
echo "logs in $OUT_DIR${WRITE:+; benchmark rows appended to $REPO/BENCHMARKS.md}"
cat "$summary"
exit "$failed"
