"""Pack a preprocessed subject into a small folder to copy to another machine, and unpack it there.

Why: a machine with a GPU may lack the preprocessing dependencies (PyAV, mediapipe, tyro...), so
the subject is preprocessed elsewhere and copied over (bench/gpu_train.sh takes a pack). A 512 px
subject is ~140 MB, most of it JPEG frames and preprocessing intermediates. A pack keeps only what
training, eval and rendering read, and stores the frames as one near-lossless H.264 video:

    frames.mp4        every frame, in order: libx264 yuv444p (no chroma subsampling), CRF 12
    masks/ ...        copied as is (uint8 label bit-fields: must stay lossless)
    manifest.json, tracking.npz, signals.npz, features/, audio.wav, background.png and the
    small reports: copied as is
    check/NNNNNN.jpg  a few source frames, byte for byte, so that unpacking can verify that the
                      machine's decoder reproduces the colours measured when packing
    pack.json         format, frame count, size, CRF, source path, sha256 of every file, and the
                      PSNR of the decoded video against the source JPEGs (decoded with cv2, as
                      when unpacking)

Left out: matte/ and landmarks.npz (inputs of the masks and tracking stages; nothing after
preprocessing reads them), so an unpacked subject trains, evaluates and renders but cannot
re-run those preprocessing stages.

    python bench/subject_pack.py pack SUBJECT_DIR PACK_DIR [--crf 12] [--force]   # needs PyAV
    python bench/subject_pack.py unpack PACK_DIR SUBJECT_DIR [--force]            # numpy + cv2 only

Unpacking decodes frames.mp4 with cv2.VideoCapture into frames/NNNNNN.jpg (JPEG quality 100,
4:4:4) and is idempotent. Both commands write into a temporary directory next to the target and
rename it at the end, so a failed or killed run leaves nothing half-written. This script imports
neither gsavatar nor PyAV at module level, so unpacking needs only numpy and OpenCV.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PACK_FORMAT = "gsavatar-subject-pack"
PACK_VERSION = 1
VIDEO = "frames.mp4"
PACK_JSON = "pack.json"
MARKER = ".subject_pack.json"  # written into an unpacked subject: which pack it came from
NOT_READ_AFTER_PREPROCESSING = ("matte", "landmarks.npz")
OMITTED = ("frames", *NOT_READ_AFTER_PREPROCESSING)  # frames travel as VIDEO
CHECK_FRAMES = 3  # source JPEGs kept byte for byte to verify the decoder on the other machine
CHECK_TOLERANCE_DB = 1.0  # how far below the packing machine's PSNR a check frame may decode
PSNR_CAP = 100.0  # PSNR of identical images (JSON has no infinity)
JPEG_QUALITY = 100


class PackError(Exception):
    """A user-facing problem, printed as one line."""


def frame_name(index: int) -> str:
    """Same naming as gsavatar.data.dataset.frame_name(index, "jpg")."""
    return f"{index:06d}.jpg"


# -- small helpers ------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * np.log10(255.0 ** 2 / mse))


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PackError(f"{path.parent} is not a {what} (no {path.name})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise PackError(f"{path} is not readable JSON ({type(e).__name__})") from None


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def imread_bgr(path: Path) -> np.ndarray:
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise PackError(f"cannot read image {path}")
    return image


def check_indices(num_frames: int) -> list[int]:
    return sorted({round(i * (num_frames - 1) / max(1, CHECK_FRAMES - 1)) for i in range(CHECK_FRAMES)})


def decoded_frames(video: Path):
    """Yield the BGR frames of ``video`` decoded by cv2 (FFmpeg), as when unpacking."""
    import cv2

    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise PackError(f"cv2 cannot open {video} (OpenCV built without FFmpeg?)")
    try:
        while True:
            ok, image = cap.read()
            if not ok:
                return
            yield image
    finally:
        cap.release()


class staging:
    """A temporary directory next to ``target``, renamed onto it only if the block succeeds."""

    def __init__(self, target: Path, replace: bool = False):
        self.target, self.replace = target, replace

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", dir=self.target.parent))
        umask = os.umask(0)
        os.umask(umask)
        self.tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
        return self.tmp

    def __exit__(self, kind, value, tb) -> bool:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.replace and self.target.exists():
            shutil.rmtree(self.target)
        os.rename(self.tmp, self.target)
        return False


# -- pack ---------------------------------------------------------------------------------------
def subject_num_frames(subject: Path) -> tuple[dict, int]:
    manifest = read_json(subject / "manifest.json", "subject dataset")
    if not manifest.get("complete"):
        raise PackError(f"{subject} is an incomplete subject dataset; finish gsavatar preprocess first")
    n = int(manifest["num_frames"])
    missing = [frame_name(i) for i in range(n) if not (subject / "frames" / frame_name(i)).is_file()]
    if missing:
        raise PackError(f"{subject}/frames lacks {len(missing)} of {n} frames (first: {missing[0]})")
    return manifest, n


def encode_frames(subject: Path, n: int, fps: int, crf: int, out: Path) -> None:
    try:
        import av
    except ImportError:
        raise PackError("packing needs PyAV (pip install av); unpacking does not") from None
    with av.open(str(out), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        first = imread_bgr(subject / "frames" / frame_name(0))
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = "yuv444p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        for i in range(n):
            image = first if i == 0 else imread_bgr(subject / "frames" / frame_name(i))
            if image.shape != first.shape:
                raise PackError(f"frame {frame_name(i)} is {image.shape[1]}x{image.shape[0]}, frame 0 is "
                                f"{first.shape[1]}x{first.shape[0]}")
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")):
                container.mux(packet)
            if (i + 1) % 500 == 0:
                print(f"  encoded {i + 1}/{n} frames", file=sys.stderr)
        for packet in stream.encode():
            container.mux(packet)


def measure_video(video: Path, subject: Path, n: int) -> dict:
    """PSNR of every decoded frame against its source JPEG."""
    import cv2

    values, count = [], 0
    for count, image in enumerate(decoded_frames(video), 1):
        if count <= n:
            values.append(psnr(image, imread_bgr(subject / "frames" / frame_name(count - 1))))
    if count != n:
        raise PackError(f"the encoded video decodes to {count} frames, expected {n}")
    v = np.array(values)
    return {"mean": round(float(v.mean()), 3), "min": round(float(v.min()), 3), "min_frame": int(v.argmin()),
            "decoder": f"cv2 {cv2.__version__}",
            "per_check_frame": {frame_name(i): round(values[i], 3) for i in check_indices(n)}}


def copy_entries(subject: Path, pack: Path) -> dict[str, dict]:
    """Copy everything but OMITTED; return {relative path: {bytes, sha256}}."""
    files = {}
    for entry in sorted(subject.iterdir()):
        if entry.name in OMITTED or entry.name.startswith("."):
            continue
        if entry.is_dir():
            shutil.copytree(entry, pack / entry.name)
        else:
            shutil.copy2(entry, pack / entry.name)
    for path in sorted(p for p in pack.rglob("*") if p.is_file()):
        files[path.relative_to(pack).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    return files


def pack(subject: Path, pack_dir: Path, crf: int, force: bool) -> dict:
    if not 0 <= crf <= 51:
        raise PackError(f"--crf must be in 0..51 (got {crf})")
    if not subject.is_dir():
        raise PackError(f"{subject} is not a directory")
    if pack_dir.exists() and not force:
        raise PackError(f"{pack_dir} already exists; remove it or pass --force")
    manifest, n = subject_num_frames(subject)
    t0 = time.time()
    with staging(pack_dir, replace=force) as tmp:
        files = copy_entries(subject, tmp)
        (tmp / "check").mkdir()
        for i in check_indices(n):
            shutil.copy2(subject / "frames" / frame_name(i), tmp / "check" / frame_name(i))
        encode_frames(subject, n, int(manifest.get("fps", 25)), crf, tmp / VIDEO)
        quality = measure_video(tmp / VIDEO, subject, n)
        info = {
            "format": PACK_FORMAT, "version": PACK_VERSION, "num_frames": n, "size": int(manifest["size"]),
            "fps": int(manifest.get("fps", 25)), "crf": crf,
            "video": {"file": VIDEO, "codec": "libx264", "pix_fmt": "yuv444p", "preset": "medium",
                      "bytes": (tmp / VIDEO).stat().st_size, "sha256": sha256(tmp / VIDEO)},
            "psnr_db": quality, "source": str(subject.resolve()),
            "source_video_sha256": manifest.get("source", {}).get("sha256"),
            "omitted": list(NOT_READ_AFTER_PREPROCESSING), "files": files, "pack_seconds": round(time.time() - t0, 1),
        }
        write_json(tmp / PACK_JSON, info)
        info["pack_bytes"] = dir_bytes(tmp)
    return info


# -- unpack -------------------------------------------------------------------------------------
def read_pack_info(pack_dir: Path) -> dict:
    if not pack_dir.is_dir():
        raise PackError(f"{pack_dir} is not a directory")
    info = read_json(pack_dir / PACK_JSON, "subject pack")
    if info.get("format") != PACK_FORMAT or info.get("version") != PACK_VERSION:
        raise PackError(f"{pack_dir / PACK_JSON} is not a version-{PACK_VERSION} {PACK_FORMAT}")
    video = pack_dir / VIDEO
    if not video.is_file():
        raise PackError(f"{pack_dir} has no {VIDEO}")
    if video.stat().st_size != info["video"]["bytes"] or sha256(video) != info["video"]["sha256"]:
        raise PackError(f"{video} does not match pack.json (truncated or changed)")
    return info


def is_unpack_of(subject: Path, info: dict) -> bool:
    marker = subject / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == info
    except (OSError, json.JSONDecodeError):
        return False


def copy_verified(pack_dir: Path, subject: Path, files: dict) -> None:
    for rel, meta in files.items():
        src, dst = pack_dir / rel, subject / rel
        if not src.is_file():
            raise PackError(f"{pack_dir} lacks {rel}")
        if src.stat().st_size != meta["bytes"] or sha256(src) != meta["sha256"]:
            raise PackError(f"{src} does not match pack.json (truncated or changed)")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def decode_to_jpegs(pack_dir: Path, subject: Path, info: dict) -> int:
    """Write frames/NNNNNN.jpg; verify the check frames against the PSNR measured when packing."""
    import cv2

    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    if hasattr(cv2, "IMWRITE_JPEG_SAMPLING_FACTOR"):  # OpenCV >= 4.5.5: keep full-resolution chroma
        params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    expected = info["psnr_db"]["per_check_frame"]
    (subject / "frames").mkdir()
    count = 0
    for i, image in enumerate(decoded_frames(pack_dir / VIDEO)):
        name = frame_name(i)
        if name in expected:
            got = psnr(image, imread_bgr(pack_dir / "check" / name))
            if got < expected[name] - CHECK_TOLERANCE_DB:
                raise PackError(f"frame {name} decodes at {got:.2f} dB here, {expected[name]:.2f} dB when packed: this "
                                f"cv2/FFmpeg converts colours differently (cv2 {cv2.__version__})")
        if i < info["num_frames"] and not cv2.imwrite(str(subject / "frames" / name), image, params):
            raise PackError(f"cannot write {subject / 'frames' / name}")
        count = i + 1
    return count


def unpack(pack_dir: Path, subject: Path, force: bool) -> tuple[dict, bool]:
    """Returns (pack info, True if work was done / False if SUBJECT_DIR already was this unpack)."""
    info = read_pack_info(pack_dir)
    if is_unpack_of(subject, info):
        return info, False
    if subject.exists() and not force:
        raise PackError(f"{subject} exists and is not an unpack of {pack_dir}; remove it or pass --force")
    n = info["num_frames"]
    with staging(subject, replace=force) as tmp:
        copy_verified(pack_dir, tmp, info["files"])
        count = decode_to_jpegs(pack_dir, tmp, info)
        if count != n:
            raise PackError(f"{pack_dir / VIDEO} decodes to {count} frames, {PACK_JSON} says {n}")
        write_json(tmp / MARKER, info)
    return info, True


# -- command line -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="subject_pack.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="subject dataset -> pack (needs PyAV)",
                       description="Pack SUBJECT_DIR into PACK_DIR: frames as a yuv444p H.264 video, the rest copied.")
    p.add_argument("subject", type=Path, metavar="SUBJECT_DIR", help="complete subject dataset (gsavatar preprocess)")
    p.add_argument("pack", type=Path, metavar="PACK_DIR", help="directory to create")
    p.add_argument("--crf", type=int, default=12, help="x264 constant rate factor, 0..51 (default 12: ~45 dB)")
    p.add_argument("--force", action="store_true", help="replace PACK_DIR if it exists")
    u = sub.add_parser("unpack", help="pack -> subject dataset (numpy + cv2 only)",
                       description="Unpack PACK_DIR into SUBJECT_DIR (skipped if it already is that unpack).")
    u.add_argument("pack", type=Path, metavar="PACK_DIR", help="directory made by the pack command")
    u.add_argument("subject", type=Path, metavar="SUBJECT_DIR", help="subject dataset directory to create")
    u.add_argument("--force", action="store_true", help="replace SUBJECT_DIR if it exists and is something else")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "pack":
            info = pack(args.subject, args.pack, args.crf, args.force)
            q = info["psnr_db"]
            print(f"pack: {args.pack}  {mib(info['pack_bytes'])} ({VIDEO} {mib(info['video']['bytes'])}), "
                  f"{info['num_frames']} frames at {info['size']} px, CRF {info['crf']}; video PSNR vs the JPEGs "
                  f"mean {q['mean']:.2f} dB, min {q['min']:.2f} dB (frame {q['min_frame']}); {info['pack_seconds']:.0f} s")
        else:
            t0 = time.time()
            info, done = unpack(args.pack, args.subject, args.force)
            state = f"unpacked in {time.time() - t0:.1f} s" if done else "already unpacked, skipped"
            print(f"subject: {args.subject}  {info['num_frames']} frames at {info['size']} px ({state})")
    except PackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
