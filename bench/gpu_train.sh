#!/usr/bin/env bash
# Train an avatar on a real subject on a machine with a GPU, for a bounded time, resuming from the
# last checkpoint when run again. See `bash bench/gpu_train.sh --help`.
set -uo pipefail

usage() {
  cat <<'EOF'
Usage: bash bench/gpu_train.sh SUBJECT RUN_DIR [options]

Trains an avatar on SUBJECT into RUN_DIR, stopping after --seconds at the latest. Run the same
command again to resume from the last checkpoint (train.log says "resuming from"); a finished run
is not trained again. Training goes through gsavatar's Python API, so the machine needs torch,
numpy and opencv but not the preprocessing dependencies (PyAV, mediapipe) nor the command line's.

  SUBJECT   a subject dataset made by `gsavatar preprocess`, or a pack made by
            `python bench/subject_pack.py pack SUBJECT_DIR PACK_DIR` (a folder with pack.json) on a
            machine that can preprocess; a pack is unpacked first (see --unpack-to)
  RUN_DIR   the run directory (created; reused to resume)

Options (each also settable through the environment variable in brackets):
  --preset NAME|FILE.toml  training preset (PRESET; default: default, 512 px)
  --backend NAME           rasterizer backend (BACKEND; default: auto, our CUDA kernels on a GPU);
                           --backend gsplat trains the same preset on gsplat's ops, to cross-check
                           ours (use another RUN_DIR)
  --seconds S              stop training S seconds after the start of this command (TRAIN_SECONDS;
                           default 3600; 0: no limit). A stop loses nothing: the trainer gets
                           SIGTERM and checkpoints the iteration it is on (SIGKILL 30 s later if
                           it hangs)
  --checkpoint-every N     override the preset's checkpoint period (CHECKPOINT_EVERY; optional;
                           keep it the same in every run of one RUN_DIR)
  --unpack-to DIR          where a pack is unpacked (UNPACK_TO; default: SUBJECT-unpacked next to
                           the pack; unpacking is skipped when DIR already is that unpack)
  --out DIR                folder for the report (OUT_DIR; default: RUN_DIR-report)
  -h, --help               this text
TORCH_CUDA_ARCH_LIST (default: the local GPU's compute capability), MAX_JOBS (default: all
cores), GSAVATAR_KERNEL_CACHE and PYTHON (default python3) are honoured.

The report folder holds: machine.txt (GPU, torch, unpacking, GPU use sampled every 30 s),
train.log, status.json (finished or not, iterations, seconds, the avatar's sha256), summary.json
(finished runs only) and the avatar: avatar.pt when finished, else partial_avatar.pt (the last
checkpoint without optimizer state; it renders and evaluates like a finished avatar).

Evaluate afterwards, on this machine or another (copy the avatar into a run folder there):
  gsavatar eval RUN_DIR [--subject SUBJECT_DIR]
--subject is needed where the subject path recorded in the avatar does not exist.

Without a GPU the script runs too (e.g. --preset cpu-tiny --seconds 60), to try it out.
Exit status: 0 when training finished or stopped at --seconds, else the trainer's error status.
EOF
}

die() { echo "gpu_train.sh: $*" >&2; exit 2; }

start=$(date +%s)
PRESET=${PRESET:-default}
BACKEND=${BACKEND:-auto}
TRAIN_SECONDS=${TRAIN_SECONDS:-3600}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-}
UNPACK_TO=${UNPACK_TO:-}
OUT_DIR=${OUT_DIR:-}
PYTHON=${PYTHON:-python3}
positional=()
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) PRESET=${2:?--preset needs a name}; shift 2 ;;
    --backend) BACKEND=${2:?--backend needs a name}; shift 2 ;;
    --seconds) TRAIN_SECONDS=${2:?--seconds needs a number}; shift 2 ;;
    --checkpoint-every) CHECKPOINT_EVERY=${2:?--checkpoint-every needs a number}; shift 2 ;;
    --unpack-to) UNPACK_TO=${2:?--unpack-to needs a folder}; shift 2 ;;
    --out) OUT_DIR=${2:?--out needs a folder}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option: $1" ;;
    *) positional+=("$1"); shift ;;
  esac
done
[ ${#positional[@]} -eq 2 ] || { usage >&2; die "expected SUBJECT and RUN_DIR"; }
SUBJECT=${positional[0]%/}
RUN_DIR=${positional[1]%/}
[[ "$TRAIN_SECONDS" =~ ^[0-9]+$ ]] || die "--seconds takes whole seconds (got '$TRAIN_SECONDS')"
[ -z "$CHECKPOINT_EVERY" ] || [[ "$CHECKPOINT_EVERY" =~ ^[1-9][0-9]*$ ]] \
  || die "--checkpoint-every takes a positive number (got '$CHECKPOINT_EVERY')"
[ -d "$SUBJECT" ] || die "no subject folder $SUBJECT"
OUT_DIR=${OUT_DIR:-$RUN_DIR-report}
mkdir -p "$OUT_DIR" || die "cannot create $OUT_DIR"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONUNBUFFERED=1
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$REPO"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
report="$OUT_DIR/machine.txt"
: > "$report"

gpu=no
if command -v nvidia-smi > /dev/null && nvidia-smi > /dev/null 2>&1; then
  gpu=yes
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$report"
  # Build kernels for this GPU only (with --backend gsplat, gsplat's source-only wheel JIT-compiles
  # on first use too; that build comes out of --seconds).
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2> /dev/null) \
      || unset TORCH_CUDA_ARCH_LIST
  fi
  [ -n "${TORCH_CUDA_ARCH_LIST:-}" ] && export TORCH_CUDA_ARCH_LIST
else
  echo "no NVIDIA GPU found: training on what torch offers (the preset decides the device)" | tee -a "$report"
fi
"$PYTHON" -c "import torch, cv2; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cv2', cv2.__version__)" \
  2>&1 | tee -a "$report"
[ "${PIPESTATUS[0]}" -eq 0 ] || die "needs torch and opencv (cv2) importable by $PYTHON"

# A pack is unpacked first (idempotent: a folder that already is this unpack is kept).
if [ -f "$SUBJECT/pack.json" ]; then
  UNPACK_TO=${UNPACK_TO:-$SUBJECT-unpacked}
  "$PYTHON" "$REPO/bench/subject_pack.py" unpack "$SUBJECT" "$UNPACK_TO" 2>&1 | tee -a "$report"
  [ "${PIPESTATUS[0]}" -eq 0 ] || die "unpacking $SUBJECT failed: nothing trained"
  SUBJECT=$UNPACK_TO
fi

# Sample GPU use while training (stopped by its PID below).
sampler=""
if [ "$gpu" = yes ]; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 30 >> "$report" &
  sampler=$!
  trap '[ -n "$sampler" ] && kill "$sampler" 2> /dev/null' EXIT
fi

resumed=no
[ -f "$RUN_DIR/checkpoint.pt" ] && resumed=yes
rc=0
limit=""
if [ "$TRAIN_SECONDS" -gt 0 ]; then
  limit=$((TRAIN_SECONDS - ($(date +%s) - start)))
fi
if [ -f "$RUN_DIR/summary.json" ] && [ -f "$RUN_DIR/avatar.pt" ]; then
  echo "$RUN_DIR already holds a finished run: not training"
elif [ -n "$limit" ] && [ "$limit" -lt 30 ]; then
  echo "only $limit s left of --seconds $TRAIN_SECONDS after unpacking: not training"
else
  echo "training $SUBJECT with preset $PRESET on backend $BACKEND into $RUN_DIR" \
       "(${limit:+at most $limit s; }resuming: $resumed)"
  bound=()
  [ -n "$limit" ] && bound=(timeout --signal=TERM --kill-after=30 "$limit")
  ${bound[@]+"${bound[@]}"} "$PYTHON" - "$SUBJECT" "$RUN_DIR" "$PRESET" "$CHECKPOINT_EVERY" "$BACKEND" <<'EOF'
import dataclasses
import logging
import sys
from pathlib import Path

from gsavatar.config import load_preset
from gsavatar.errors import GsavatarError
from gsavatar.train.run import run_dir_lock
from gsavatar.train.trainer import train

subject, run_dir, preset, every, backend = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
console = logging.StreamHandler(sys.stdout)  # train.log gets the same lines; no tqdm bars in a pipe
console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
logging.getLogger("gsavatar.train").addHandler(console)
try:
    cfg = dataclasses.replace(load_preset(preset), backend=backend).validate()
    if every:
        cfg = dataclasses.replace(cfg, checkpoint_every=int(every)).validate()
    with run_dir_lock(run_dir):
        train(subject, run_dir, cfg, show_progress=False)
except GsavatarError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
EOF
  rc=$?
  [ "$rc" -eq 124 ] && echo "training stopped after $limit s (--seconds $TRAIN_SECONDS); run again to resume"
fi
if [ -n "$sampler" ]; then
  kill "$sampler" 2> /dev/null
  sampler=""
fi

# status.json, and the avatar: the final one, else the checkpoint stripped of optimizer state.
# Prints the one-line verdict.
"$PYTHON" - "$RUN_DIR" "$OUT_DIR" "$rc" <<'EOF'
import hashlib
import json
import shutil
import sys
from pathlib import Path

from gsavatar.errors import GsavatarError
from gsavatar.model.io import load_checkpoint, save_checkpoint


def db(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


run_dir, out_dir, rc = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
status_path = out_dir / "status.json"
finished = (run_dir / "summary.json").is_file() and (run_dir / "avatar.pt").is_file()
source = run_dir / ("avatar.pt" if finished else "checkpoint.pt")
status = {"finished": finished, "train_exit_code": rc, "run_dir": str(run_dir.resolve())}
for stale in ("avatar.pt", "partial_avatar.pt"):
    (out_dir / stale).unlink(missing_ok=True)
try:
    ckpt = load_checkpoint(source)
except GsavatarError as e:
    print(f"training: no avatar yet ({e})")
    status_path.write_text(json.dumps(status, indent=2) + "\n")
    sys.exit(0)
p, stages = ckpt.progress, ckpt.config["stages"]
total = sum(s["iterations"] for s in stages)
status.update(iterations=p.global_iteration, total_iterations=total, training_seconds=round(p.elapsed_s, 1),
              stage=p.stage_index, stage_iteration=p.stage_iteration, completed_stages=p.completed_stages)
if finished:
    avatar = out_dir / "avatar.pt"
    shutil.copyfile(source, avatar)
    summary = json.loads((run_dir / "summary.json").read_text())
    status["summary"] = summary
    print(f"training: FINISHED, {p.global_iteration}/{total} iterations in {summary['wall_s']:.0f} s of training; "
          f"test PSNR {db(summary['test_psnr'])} dB (face {db(summary['test_psnr_face'])} dB)")
else:
    avatar = out_dir / "partial_avatar.pt"
    ckpt.optimizers, ckpt.strategy, ckpt.rng = {}, {}, {}
    save_checkpoint(ckpt, avatar)
    stage = stages[p.stage_index]["name"] if p.stage_index < len(stages) else "evaluation"
    print(f"training: NOT finished, {p.global_iteration}/{total} iterations at the last checkpoint (stage {stage}, "
          f"{p.stage_iteration} done), {p.elapsed_s:.0f} s of training so far; run the same command again to "
          f"resume")
status["avatar_file"] = avatar.name
status["avatar_sha256"] = hashlib.sha256(avatar.read_bytes()).hexdigest()
status_path.write_text(json.dumps(status, indent=2) + "\n")
EOF

for name in train.log summary.json; do
  [ -f "$RUN_DIR/$name" ] && cp "$RUN_DIR/$name" "$OUT_DIR/"
done
echo "took $(($(date +%s) - start)) s; report in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
# 124: stopped at --seconds, as planned; anything else non-zero is a training error (see above).
[ "$rc" -eq 0 ] || [ "$rc" -eq 124 ] || exit "$rc"
