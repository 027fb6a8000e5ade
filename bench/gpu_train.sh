#!/usr/bin/env bash
# Train an avatar on a real subject on the lent GPU machine (the `device` tool, issue 4), in one
# or more calls. The machine cannot preprocess (no PyAV, mediapipe, tyro), so the subject travels
# as a pack (bench/subject_pack.py) and training goes through the Python API, not the tyro CLI.
#
# Prepare here, in the repository root (needs PyAV; /.gpu_data/ is in .git/info/exclude so it
# travels only when carried):
#   grep -qx '/.gpu_data/' .git/info/exclude || echo /.gpu_data/ >> .git/info/exclude
#   gsavatar preprocess ../shared/data/cnn2_25fps.mp4 -o /tmp/benchwork/cnn2_25fps_512   # default features:
#                                       # logmel + whisper (train picks whisper: better lip-sync on cnn2)
#   python bench/subject_pack.py pack /tmp/benchwork/cnn2_25fps_512 .gpu_data/pack     # ~34 MiB
# Then call, as many times as needed:
#   run(command="bash bench/gpu_train.sh", carry=[".gpu_data"], timeout_s=600)
# Settings through the environment, e.g. command="PRESET=default TRAIN_SECONDS=500 bash bench/gpu_train.sh":
#   PRESET            training preset (default: default, 512 px)
#   TRAIN_SECONDS     training is stopped this many seconds after the call started (default 500; the
#                     rest of the 600 s saves the results). Lower it when status() shows less than
#                     600 s of device time left (e.g. budget_left_s - 120).
#   BACKEND           rasterizer (default auto: our CUDA kernels). BACKEND=gsplat trains the same preset
#                     on gsplat's ops, to cross-check ours (carry .whl as bench/gpu_session.sh says; use
#                     another RUN_DIR, e.g. RUN_DIR=/tmp/gsavatar_run_gsplat)
#   CHECKPOINT_EVERY  optional override of the preset's checkpoint period; must be the same in every
#                     call of a run. A stop by TRAIN_SECONDS loses nothing: `timeout` sends SIGTERM and
#                     the trainer checkpoints the iteration it is on (SIGKILL 15 s later if it hangs)
# The subject is unpacked to /tmp/subject and the run lives in /tmp/gsavatar_run on the device
# machine. Both survive while it stays warm (about 30 s after a call), so the next call resumes
# the run from its last checkpoint (train.log says "resuming from"); a fresh machine starts over.
# To start over on a warm machine (or after re-packing): prefix the command with
# "rm -rf /tmp/subject /tmp/gsavatar_run; ".
#
# Results in $OUT: session.txt (GPU, torch, unpack, GPU use sampled every 30 s), train.log,
# status.json (finished or not, iterations, seconds, the avatar's sha256), summary.json (finished
# runs only) and the avatar: avatar.pt when finished, else partial_avatar.pt (the last checkpoint
# without optimizer state; it renders and evaluates like a finished avatar). A file over 15 MiB
# comes back in parts NAME.part0, NAME.part1, ... (the default preset's avatar is ~40-47 MiB: 3-4
# parts, so with the 4 other files a call returns up to the 8-file limit; add no more outputs).
# Rejoin here (FILES_AT: the run reply's files_at):
#   mkdir -p RUN_DIR && cat FILES_AT/avatar.pt.part* > RUN_DIR/avatar.pt && sha256sum RUN_DIR/avatar.pt
# (partial_avatar.pt.part* likewise, also into RUN_DIR/avatar.pt; compare with status.json's sha256)
# and copy summary.json / train.log next to it. Evaluate here on CPU (avatar.pt holds its config;
# the subject path it records is the device's /tmp/subject, hence --subject):
#   gsavatar eval RUN_DIR --subject /tmp/benchwork/cnn2_25fps_512
# Simulate on a CPU: OUT=/tmp/gpu_train_out PRESET=cpu-tiny TRAIN_SECONDS=60 bash bench/gpu_train.sh
set -uo pipefail
start=$(date +%s)
OUT=${OUT:-/tmp/gpu_out}
PACK=${PACK:-.gpu_data/pack}
SUBJECT=${SUBJECT:-/tmp/subject}
RUN_DIR=${RUN_DIR:-/tmp/gsavatar_run}
PRESET=${PRESET:-default}
TRAIN_SECONDS=${TRAIN_SECONDS:-500}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-}
BACKEND=${BACKEND:-auto}
PART_BYTES=$((15 * 1024 * 1024))
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GSAVATAR_KERNEL_CACHE=/tmp/gsavatar_kernels
# Hopper only, all cores, builds on /tmp (gsplat's source-only wheel JIT-compiles on first use:
# with BACKEND=gsplat on a fresh machine that build comes out of TRAIN_SECONDS).
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
if [ "$BACKEND" = gsplat ] && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
session="$OUT/session.txt"

if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$session"
else
  echo "no nvidia-smi: no GPU here" | tee "$session"
fi
python3 -c "import torch, cv2; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cv2', cv2.__version__)" \
  | tee -a "$session"

python3 bench/subject_pack.py unpack "$PACK" "$SUBJECT" 2>&1 | tee -a "$session"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "unpack failed: nothing trained" | tee -a "$session"; exit 1; }

# Sample GPU use while training (stopped by its PID below).
sampler=""
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 30 >> "$session" &
  sampler=$!
fi

resumed=no
[ -f "$RUN_DIR/checkpoint.pt" ] && resumed=yes
left=$((TRAIN_SECONDS - ($(date +%s) - start)))
rc=0
if [ -f "$RUN_DIR/summary.json" ] && [ -f "$RUN_DIR/avatar.pt" ]; then
  echo "$RUN_DIR already holds a finished run: not training"
elif [ "$left" -lt 30 ]; then
  echo "only $left s left of TRAIN_SECONDS=$TRAIN_SECONDS after unpacking: not training"
else
  echo "training preset $PRESET on backend $BACKEND for at most $left s (resuming: $resumed)"
  timeout --signal=TERM --kill-after=15 "$left" python3 - "$SUBJECT" "$RUN_DIR" "$PRESET" "$CHECKPOINT_EVERY" "$BACKEND" <<'EOF'
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
  [ "$rc" -eq 124 ] && echo "training stopped after $left s (TRAIN_SECONDS=$TRAIN_SECONDS)"
fi
[ -n "$sampler" ] && kill "$sampler" 2> /dev/null

# status.json, and the avatar to bring back: the final one, else the checkpoint stripped of
# optimizer state. Prints the one-line verdict.
export_dir=/tmp/gsavatar_export
rm -rf "$export_dir" && mkdir -p "$export_dir"
python3 - "$RUN_DIR" "$export_dir" "$OUT/status.json" "$rc" <<'EOF'
import hashlib
import json
import sys
from pathlib import Path

from gsavatar.errors import GsavatarError
from gsavatar.train.checkpoint import load_checkpoint, save_checkpoint


def db(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


run_dir, export_dir, status_path, rc = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
finished = (run_dir / "summary.json").is_file() and (run_dir / "avatar.pt").is_file()
source = run_dir / ("avatar.pt" if finished else "checkpoint.pt")
status = {"finished": finished, "train_exit_code": rc, "run_dir": str(run_dir)}
try:
    ckpt = load_checkpoint(source)
except GsavatarError as e:
    print(f"training: nothing to bring back ({e})")
    status_path.write_text(json.dumps(status, indent=2) + "\n")
    sys.exit(0)
p, stages = ckpt.progress, ckpt.config["stages"]
total = sum(s["iterations"] for s in stages)
status.update(iterations=p.global_iteration, total_iterations=total, training_seconds=round(p.elapsed_s, 1),
              stage=p.stage_index, stage_iteration=p.stage_iteration, completed_stages=p.completed_stages)
if finished:
    avatar = export_dir / "avatar.pt"
    avatar.symlink_to(source)
    summary = json.loads((run_dir / "summary.json").read_text())
    status["summary"] = summary
    print(f"training: FINISHED, {p.global_iteration}/{total} iterations in {summary['wall_s']:.0f} s of training; "
          f"test PSNR {db(summary['test_psnr'])} dB (face {db(summary['test_psnr_face'])} dB)")
else:
    avatar = export_dir / "partial_avatar.pt"
    ckpt.optimizers, ckpt.strategy, ckpt.rng = {}, {}, {}
    save_checkpoint(ckpt, avatar)
    stage = stages[p.stage_index]["name"] if p.stage_index < len(stages) else "evaluation"
    print(f"training: NOT finished, {p.global_iteration}/{total} iterations at the last checkpoint (stage {stage}, "
          f"{p.stage_iteration} done), {p.elapsed_s:.0f} s of training so far; the next call resumes it "
          f"if this machine is still warm")
status["avatar_file"] = avatar.name
status["avatar_sha256"] = hashlib.sha256(avatar.read_bytes()).hexdigest()
status_path.write_text(json.dumps(status, indent=2) + "\n")
EOF

for name in train.log summary.json; do
  [ -f "$RUN_DIR/$name" ] && cp "$RUN_DIR/$name" "$OUT/"
done
for avatar in "$export_dir"/*.pt; do
  [ -e "$avatar" ] || continue
  name=$(basename "$avatar")
  size=$(stat -L -c %s "$avatar")
  if [ "$size" -gt $((4 * PART_BYTES)) ]; then
    echo "warning: $name is $size bytes: too big to bring back (64 MiB per call); not copied"
  elif [ "$size" -gt "$PART_BYTES" ]; then
    split -b "$PART_BYTES" -d -a 1 "$avatar" "$OUT/$name.part"
    echo "$name: $size bytes in $(ls "$OUT/$name".part* | wc -l) parts; rejoin: cat $name.part* > RUN_DIR/avatar.pt"
  else
    cp -L "$avatar" "$OUT/$name"
    echo "$name: $size bytes"
  fi
done
echo "call took $(($(date +%s) - start)) s; in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
# 124: stopped by TRAIN_SECONDS, as planned; anything else non-zero is a training error (see above).
[ "$rc" -eq 0 ] || [ "$rc" -eq 124 ] || exit "$rc"
