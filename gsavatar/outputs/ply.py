"""``gsavatar export``: the avatar's Gaussians as a standard 3D Gaussian Splatting PLY.

Layout (the original 3DGS code's, read by SuperSplat, antimatter15/splat, gsplat, nerfstudio...):
one ``vertex`` element, binary little-endian, float32 properties in this order

    x y z  nx ny nz (zeros)  f_dc_0..2  f_rest_0..f_rest_{3(K-1)-1}  opacity  scale_0..2  rot_0..3

``f_dc`` is the degree-0 SH coefficient (colour = 0.28209 f_dc + 0.5), ``f_rest`` the higher
ones channel-major (all of R's coefficients, then G's, then B's: ``shN.transpose(1, 2)``),
``opacity`` the logit (opacity = sigmoid), ``scale`` the log of the standard deviations,
``rot`` the quaternion ``(w, x, y, z)`` (not necessarily normalised; readers normalise). After
those comes one extra ``int`` (int32) property, ``branch``: 0 face, 1 mouth, 2 torso. Viewers
look properties up by name and skip unknown ones; being 4 bytes wide like every other
property, it also keeps loaders that assume a fixed 4-byte stride working.

Coordinate frame: everything is written in gsavatar's canonical *head frame* (metres; OpenCV
axes as in gsavatar.tracking.camera: x right, y down, z away from the viewer into the head,
the face looking towards -z), which is also how COLMAP/3DGS scenes are oriented. PlayCanvas's
SuperSplat and splat-transform turn every PLY 180 degrees about z on loading (x and y change
sign; tests/test_ply_interop.py checks this), which shows such scenes y-up; viewers that take
the file's axes as they are, with y up, show it upside down. Face and mouth Gaussians
live in that frame already. Torso Gaussians live in the camera frame (the avatar renders them
with an identity view); they are mapped into the head frame with the inverse of a reference
view matrix ``V`` (head -> camera): means ``R^T (x - t)``, quaternions ``q(R^T) * q``. Torso
colour is SH degree 0, so no SH rotation is needed; lower SH degrees are zero-padded up to the
highest. The reference view is the median training pose for the canonical export, and frame
K's own view for ``--frame K``, so rendering the file with ``V`` and the subject's ``K``
reproduces every branch exactly as the avatar draws it (without the background plate and
with one depth-sorted blend instead of the avatar's layered composite).

Header comments record the frame, the branch index ranges, the reference view and the
intrinsics. ``--frame K`` writes the Gaussians deformed for output frame K (face and mouth by
the audio, blink and expression nets, torso by the head pose); without it, the canonical
(undeformed) Gaussians.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from gsavatar.data.io import atomic_write_bytes
from gsavatar.errors import InputError
from gsavatar.model.io import SubjectInfo

BRANCH_IDS = {"face": 0, "mouth": 1, "torso": 2}
FRAME_NAME = "head"


# -- quaternions (w, x, y, z) ----------------------------------------------------------------
def quat_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product ``a * b`` of ``[..., 4]`` quaternions (w, x, y, z)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz,
                        aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx,
                        aw * bz + ax * by - ay * bx + az * bw], -1)


def quat_from_matrix(m: torch.Tensor) -> torch.Tensor:
    """Unit quaternion (w, x, y, z) of a 3x3 rotation matrix (Shepperd's method)."""
    m = m.double()
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0:
        s = torch.sqrt(trace + 1.0) * 2
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = torch.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2]) * 2
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = torch.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2]) * 2
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = torch.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1]) * 2
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    q = torch.stack(q)
    return q / q.norm()


# -- gathering the Gaussians ------------------------------------------------------------------
def property_names(num_rest: int) -> list[str]:
    """The 3DGS vertex property order for ``num_rest`` = 3 (K - 1) higher-order SH values."""
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
            + [f"f_rest_{i}" for i in range(num_rest)]
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


@torch.no_grad()
def avatar_gaussians(avatar, reference: torch.Tensor, inputs=None) -> dict:
    """All branches' Gaussians in the head frame: ``means [G,3], quats [G,4], log_scales [G,3],
    opacity_logits [G], sh [G,K,3], branch [G] (int), ranges {name: (start, stop)}, sh_degree``.

    ``inputs`` (FrameInputs) deforms them for that frame; ``reference`` is the head -> camera
    view matrix used to bring the camera-frame torso into the head frame.
    """
    from gsavatar.model.avatar import BRANCHES

    degree = max(avatar.gaussians[b].sh_degree for b in BRANCHES)
    coeffs = (degree + 1) ** 2
    ref = reference.detach().double().cpu()
    rot_t, trans = ref[:3, :3].T, ref[:3, 3]
    q_rot_t = quat_from_matrix(rot_t)
    parts: dict[str, list] = {k: [] for k in ("means", "quats", "log_scales", "opacity_logits", "sh", "branch")}
    ranges, start = {}, 0
    for b in BRANCHES:
        g = avatar.gaussians[b]
        if inputs is None:
            means, quats, log_scales = g.means, g.quats, g.log_scales
        else:
            means, quats, scales, _, _, _ = avatar.deformed(b, inputs, True)
            # Deformed scales are exp(log_scales + delta); write the log (exact for undeformed branches).
            log_scales = g.log_scales if b != "face" else torch.log(scales)
        means, quats, log_scales = means.detach().cpu(), quats.detach().cpu(), log_scales.detach().cpu()
        if b == "torso":  # camera frame -> head frame
            means = ((means.double() - trans) @ rot_t.T).float()
            quats = quat_multiply(q_rot_t.expand(len(quats), 4), quats.double()).float()
        sh = g.sh.detach().cpu()
        if sh.shape[1] < coeffs:
            sh = torch.cat([sh, sh.new_zeros(len(sh), coeffs - sh.shape[1], 3)], 1)
        parts["means"].append(means)
        parts["quats"].append(quats)
        parts["log_scales"].append(log_scales)
        parts["opacity_logits"].append(g.params["opacity_logits"].detach().cpu())
        parts["sh"].append(sh[:, :coeffs])
        parts["branch"].append(torch.full((len(means),), BRANCH_IDS[b], dtype=torch.int32))
        ranges[b] = (start, start + len(means))
        start += len(means)
    out = {k: torch.cat(v).contiguous() for k, v in parts.items()}
    out["ranges"], out["sh_degree"] = ranges, degree
    return out


# -- writing and reading ----------------------------------------------------------------------
def _matrix_text(m: torch.Tensor) -> str:
    return " ".join(f"{float(v):.9g}" for v in m.reshape(-1))


def write_ply(path: str | Path, gaussians: dict, comments: list[str] = ()) -> Path:
    """Write :func:`avatar_gaussians` output as a 3DGS PLY, atomically (temporary file + rename)."""
    from plyfile import PlyData, PlyElement

    path = Path(path)
    g = len(gaussians["means"])
    sh = gaussians["sh"].float()
    rest = sh[:, 1:].transpose(1, 2).reshape(g, -1)  # channel-major, as 3DGS writes features_rest
    columns = [gaussians["means"].float(), torch.zeros(g, 3), sh[:, 0], rest, gaussians["opacity_logits"].float()[:, None],
               gaussians["log_scales"].float(), gaussians["quats"].float()]
    values = torch.cat(columns, 1).numpy().astype("<f4")
    names = property_names(rest.shape[1])
    dtype = [(n, "<f4") for n in names] + [("branch", "<i4")]
    rows = np.empty(g, dtype=dtype)
    for i, n in enumerate(names):
        rows[n] = values[:, i]
    rows["branch"] = gaussians["branch"].numpy().astype("<i4")
    ply = PlyData([PlyElement.describe(rows, "vertex")], byte_order="<", comments=list(comments))
    buffer = io.BytesIO()
    ply.write(buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def read_ply(path: str | Path) -> dict:
    """Read a 3DGS PLY (ours or any other) into tensors: ``means [G,3], quats [G,4], log_scales [G,3],
    opacity_logits [G], sh0 [G,1,3], shN [G,K-1,3], sh [G,K,3], sh_degree``, plus ``branch [G]``
    when present, the header ``comments`` and ``property_names`` in file order."""
    from plyfile import PlyData

    path = Path(path)
    try:
        ply = PlyData.read(str(path))
        v = ply["vertex"].data
    except FileNotFoundError:
        raise InputError(f"no such PLY file: {path}") from None
    except Exception as e:  # plyfile raises a variety of errors for a foreign file
        raise InputError(f"{path.name} is not a readable PLY file ({type(e).__name__}: {e})") from None
    names = list(v.dtype.names)
    missing = [n for n in ("x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
                           "rot_0", "rot_1", "rot_2", "rot_3") if n not in names]
    if missing:
        raise InputError(f"{path.name} is not a Gaussian-splatting PLY (no {', '.join(missing)})")
    col = lambda keys: torch.from_numpy(np.stack([np.asarray(v[k], np.float32) for k in keys], 1))  # noqa: E731
    num_rest = sum(1 for n in names if n.startswith("f_rest_"))
    if num_rest % 3 or int(round((num_rest // 3 + 1) ** 0.5)) ** 2 != num_rest // 3 + 1:
        raise InputError(f"{path.name} has {num_rest} f_rest values: not 3 x ((d+1)^2 - 1) for an SH degree d")
    g = len(v)
    sh0 = col(["f_dc_0", "f_dc_1", "f_dc_2"])[:, None, :]
    rest = col([f"f_rest_{i}" for i in range(num_rest)]) if num_rest else torch.zeros(g, 0)
    shN = rest.reshape(g, 3, num_rest // 3).transpose(1, 2).contiguous()  # channel-major -> [G, K-1, 3]
    out = {
        "means": col(["x", "y", "z"]), "quats": col(["rot_0", "rot_1", "rot_2", "rot_3"]),
        "log_scales": col(["scale_0", "scale_1", "scale_2"]), "opacity_logits": col(["opacity"])[:, 0],
        "sh0": sh0, "shN": shN, "sh": torch.cat([sh0, shN], 1), "sh_degree": int(round((num_rest // 3 + 1) ** 0.5)) - 1,
        "comments": list(ply.comments), "property_names": names,
    }
    if "branch" in names:
        out["branch"] = torch.from_numpy(np.asarray(v["branch"], np.int64))
    return out


def header_info(comments: list[str]) -> dict:
    """The reference ``viewmat`` [4,4], ``K`` [3,3], ``size`` and branch ``ranges`` recorded by :func:`export_ply`."""
    info: dict = {}
    for c in comments:
        key, _, value = c.partition(":")
        if key == "gsavatar reference viewmat (head -> camera, row-major)":
            info["viewmat"] = torch.tensor([float(x) for x in value.split()]).reshape(4, 4)
        elif key == "gsavatar intrinsics K (row-major)":
            info["K"] = torch.tensor([float(x) for x in value.split()]).reshape(3, 3)
        elif key == "gsavatar render size":
            info["size"] = int(value)
        elif key == "gsavatar branches [start, stop)":
            info["ranges"] = {name: (int(a), int(b)) for name, a, b in
                              (part.split() for part in value.split(","))}
    return info


# -- the command ------------------------------------------------------------------------------
def reference_view(subject: SubjectInfo) -> torch.Tensor:
    """The median training pose as a head -> camera view matrix."""
    from gsavatar.drive import DriveConfig, pose_sequence

    viewmats, _, _ = pose_sequence(subject, 1, DriveConfig(pose="still"))
    return viewmats[0]


def _own_audio_sequence(subject: SubjectInfo):
    """The subject's own recording as a DriveSequence (its tracked pose, blink and audio features)."""
    from gsavatar.data.dataset import SubjectDataset
    from gsavatar.drive import DriveSequence

    root = Path(subject.subject_dir or "")
    hint = "pass --audio SPEECH to drive the avatar with a speech file"
    if not subject.subject_dir or not root.is_dir():
        raise InputError(f"--frame without --audio uses the training audio, but the subject dataset {root} is gone; {hint}")
    try:
        feats = np.asarray(SubjectDataset(root).audio_features(subject.audio.kind), np.float32)
    except InputError as e:
        raise InputError(f"{e}; {hint}") from None
    n = min(len(feats), len(subject.viewmats))
    return DriveSequence(torch.from_numpy(feats[:n].copy()), subject.viewmats[:n].float(), subject.poses[:n].float(),
                         subject.blink[:n].float(), torch.eye(4).repeat(n, 1, 1), subject.K.float(),
                         subject.render_size)


def export_ply(run_dir: str | Path, out_path: str | Path, frame: int | None = None, audio: str | Path | None = None,
               drive=None, max_seconds: float = 600.0) -> dict:
    """Write the avatar of ``run_dir`` (canonical, or deformed for output ``frame``) to ``out_path``."""
    from gsavatar.drive import build_drive, load_speech
    from gsavatar.files import check_output_file
    from gsavatar.model.io import find_avatar_file, load_run

    out_path = check_output_file(out_path, ".ply")
    if audio is not None and frame is None:
        raise InputError("--audio only matters with --frame K (the Gaussians deformed for output frame K)")
    avatar_path = find_avatar_file(run_dir)
    samples = load_speech(audio, max_seconds=max_seconds) if audio is not None else None
    bundle = load_run(avatar_path)
    avatar, subject = bundle.avatar, bundle.subject
    inputs, what = None, "canonical (undeformed) Gaussians"
    if frame is None:
        reference = reference_view(subject)
        view_text = "median training pose"
    else:
        seq = build_drive(subject, samples, drive) if samples is not None else _own_audio_sequence(subject)
        if not 0 <= frame < len(seq):
            raise InputError(f"--frame {frame} is out of range: the sequence has frames 0..{len(seq) - 1}")
        inputs = seq.inputs(frame, avatar)
        reference = seq.viewmats[frame]
        source = f"speech {Path(audio).name}" if audio is not None else "the training audio"
        what = f"Gaussians deformed for output frame {frame} driven by {source}"
        view_text = f"frame {frame}'s head pose"
    gaussians = avatar_gaussians(avatar, reference, inputs)
    ranges = gaussians["ranges"]
    K = subject.K.detach().cpu().float()
    comments = [
        f"gsavatar export of {avatar_path}: {what}",
        f"gsavatar frame: {FRAME_NAME} (metres; OpenCV axes: x right, y down, z into the head, face towards -z); "
        f"torso mapped from the camera frame with the inverse of the reference view ({view_text})",
        "gsavatar branches [start, stop): " + ", ".join(f"{b} {a} {z}" for b, (a, z) in ranges.items()),
        "gsavatar vertex property branch (int): 0 face, 1 mouth, 2 torso",
        f"gsavatar reference viewmat (head -> camera, row-major): {_matrix_text(reference)}",
        f"gsavatar intrinsics K (row-major): {_matrix_text(K)}",
        f"gsavatar render size: {subject.render_size}",
    ]
    write_ply(out_path, gaussians, comments)
    return {"out": str(out_path), "avatar": str(avatar_path), "gaussians": {b: z - a for b, (a, z) in ranges.items()},
            "sh_degree": gaussians["sh_degree"], "frame": frame}
