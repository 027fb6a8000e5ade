"""A third-party 3D Gaussian Splatting tool reads ``gsavatar export``'s PLY and gets our Gaussians out.

The tool is PlayCanvas's ``@playcanvas/splat-transform`` (the converter behind SuperSplat), pinned in
tests/interop/package.json and installed with ``npm ci --prefix tests/interop``; these tests skip when
node or that install is missing. It parses the PLY itself (by property name, so it must step over
our header comments and the extra int ``branch`` property) and we read back what it writes:

* ``.glb`` with the KHR_gaussian_splatting extension: the Gaussians as the tool understood them,
  decoded into activated values (linear scale = exp, opacity = sigmoid, an 8-bit colour from
  0.5 + C0 f_dc, quaternions reordered to x y z w, SH coefficients regrouped per band). This is what
  checks our semantics (gsavatar/outputs/ply.py). The tool reads a PLY as "PLY space", a 180 degree
  turn about z from its engine (and glTF) space, and converts on the way out: x and y change sign,
  quaternions are premultiplied by (w, x, y, z) = (0, 0, 0, 1), and odd-in-(x, y) SH coefficients
  change sign. We apply the same turn to our values, so that a swapped quaternion order shows too.
* ``.ply`` back: the tool's own PLY writer must keep every value and the branch bit-exact.
* ``--filter-value`` thresholds, which the tool applies to activated values (opacity, linear
  scale, colour): the Gaussians it keeps must be those our semantics keep.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from gsavatar.outputs.ply import read_ply, write_ply

INTEROP = Path(__file__).resolve().parent / "interop"
PACKAGE = INTEROP / "node_modules" / "@playcanvas" / "splat-transform"
CLI = PACKAGE / "bin" / "cli.mjs"
C0 = 0.28209479177387814
# PLY space -> the tool's engine space: a 180 degree turn about z.
TURN = np.diag([-1.0, -1.0, 1.0])
TURN_QUAT = np.array([0.0, 0.0, 0.0, 1.0])  # (w, x, y, z)
# How 3DGS's real SH basis functions change sign under (x, y, z) -> (-x, -y, z), in f_rest order:
# degree 1 ~ (y, z, x), degree 2 ~ (xy, yz, 3z^2 - 1, xz, x^2 - y^2).
SH_SIGNS = np.array([1, -1, 1, -1, 1, -1, 1, -1, 1], np.float64)


def _pinned_version() -> str:
    return json.loads((INTEROP / "package.json").read_text())["dependencies"]["@playcanvas/splat-transform"]


def tool_command() -> list[str]:
    """``[node, cli.mjs]`` of the pinned splat-transform, or skip saying what is missing."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the PLY interop tests run PlayCanvas's splat-transform under node)")
    if not CLI.exists():
        pytest.skip("@playcanvas/splat-transform is not installed: run `npm ci --prefix tests/interop`")
    installed = json.loads((PACKAGE / "package.json").read_text())["version"]
    if installed != _pinned_version():
        pytest.skip(f"tests/interop has splat-transform {installed}, not the pinned {_pinned_version()}: "
                    "run `npm ci --prefix tests/interop`")
    major = int(subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip().lstrip("v").split(".")[0])
    if major < 18:
        pytest.skip(f"splat-transform needs node >= 18, this is node {major}")
    return [node, str(CLI)]


def splat_transform(*args: str | Path) -> str:
    """Run the pinned splat-transform CLI (``-w``: overwrite), failing with its output if it fails."""
    proc = subprocess.run([*tool_command(), "-w", *map(str, args)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"splat-transform {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def read_glb(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """A GLB's JSON and its one mesh primitive's attributes as [count, components] arrays."""
    data = path.read_bytes()
    magic, version, total = struct.unpack_from("<III", data, 0)
    assert (magic, version, total) == (0x46546C67, 2, len(data))
    json_len, json_type = struct.unpack_from("<II", data, 12)
    assert json_type == 0x4E4F534A
    gltf = json.loads(data[20:20 + json_len])
    bin_len, bin_type = struct.unpack_from("<II", data, 20 + json_len)
    assert bin_type == 0x004E4942
    binary = data[28 + json_len:28 + json_len + bin_len]
    (primitive,) = [p for m in gltf["meshes"] for p in m["primitives"]]
    width = {"SCALAR": 1, "VEC3": 3, "VEC4": 4}
    dtypes = {5126: "<f4", 5121: "u1"}
    out = {}
    for name, index in primitive["attributes"].items():
        acc = gltf["accessors"][index]
        view = gltf["bufferViews"][acc["bufferView"]]
        assert view.get("byteStride") in (None, 0)
        n = acc["count"] * width[acc["type"]]
        out[name] = np.frombuffer(binary, dtypes[acc["componentType"]], n,
                                  view.get("byteOffset", 0) + acc.get("byteOffset", 0)).reshape(acc["count"], -1)
    return gltf, out


def _quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    aw, ax, ay, az = np.moveaxis(a, -1, 0)
    bw, bx, by, bz = np.moveaxis(b, -1, 0)
    return np.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                     aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], -1)


def _unit(q: np.ndarray) -> np.ndarray:
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def assert_tool_read_our_gaussians(glb: Path, g: dict) -> None:
    """``glb`` (written by splat-transform from our PLY) holds the Gaussians ``g`` under our PLY
    semantics: ``means, quats (w,x,y,z), log_scales, opacity_logits, sh [G,K,3]`` (K = 9 or fewer)."""
    gltf, attr = read_glb(glb)
    f64 = lambda t: t.detach().cpu().double().numpy()  # noqa: E731
    means, quats, log_scales = f64(g["means"]), f64(g["quats"]), f64(g["log_scales"])
    logits, sh = f64(g["opacity_logits"]), f64(g["sh"])
    n, k = len(means), sh.shape[1]
    assert "KHR_gaussian_splatting" in gltf["extensionsUsed"]
    assert gltf["asset"]["generator"] == f"splat-transform {_pinned_version()}"
    assert all(len(a) == n for a in attr.values()), {name: len(a) for name, a in attr.items()}

    np.testing.assert_allclose(attr["POSITION"], means @ TURN.T, rtol=0, atol=1e-6, err_msg="positions")
    np.testing.assert_allclose(attr["KHR_gaussian_splatting:SCALE"], np.exp(log_scales), rtol=1e-5, atol=0,
                               err_msg="scales: scale_* must be log standard deviations")
    opacity = 1 / (1 + np.exp(-logits))
    np.testing.assert_allclose(attr["KHR_gaussian_splatting:OPACITY"][:, 0], opacity, rtol=0, atol=1e-6,
                               err_msg="opacities: opacity must be the logit")
    # The 8-bit colour fallback: 0.5 + C0 f_dc clipped to [0, 1], alpha = sigmoid(opacity); 1 LSB of rounding slack.
    rgba = np.concatenate([0.5 + C0 * sh[:, 0], opacity[:, None]], 1)
    want = np.floor(np.clip(rgba, 0, 1) * 255 + 0.5)
    got = attr["COLOR_0"].astype(np.float64)
    assert np.abs(got - want).max() <= 1, f"colours differ by up to {np.abs(got - want).max()} / 255"
    np.testing.assert_allclose(attr["KHR_gaussian_splatting:SH_DEGREE_0_COEF_0"], sh[:, 0], rtol=0, atol=1e-7,
                               err_msg="SH degree 0 (f_dc)")
    # Higher degrees: coefficient j of degree d is our sh[:, d^2 + j] (f_rest channel-major), turned with the frame.
    for d in range(1, 3):
        for j in range(2 * d + 1):
            name = f"KHR_gaussian_splatting:SH_DEGREE_{d}_COEF_{j}"
            if d * d + j >= k:
                assert name not in attr, name
                continue
            np.testing.assert_allclose(attr[name], SH_SIGNS[d * d + j] * sh[:, d * d + j], rtol=0, atol=1e-5, err_msg=name)
    # Rotations: x y z w in the file; compare unit quaternions up to sign.
    xyzw = attr["KHR_gaussian_splatting:ROTATION"].astype(np.float64)
    got_q = _unit(xyzw[:, [3, 0, 1, 2]])
    want_q = _unit(_quat_mul(np.broadcast_to(TURN_QUAT, quats.shape), _unit(quats)))
    err = np.minimum(np.abs(got_q - want_q).max(1), np.abs(got_q + want_q).max(1))
    assert err.max() < 1e-5, f"rotations differ by up to {err.max():.3g} (rot_0..3 must be w, x, y, z)"


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """A few hundred Gaussians with known values, written by write_ply with export-like header comments."""
    gen = torch.Generator().manual_seed(7)
    n = 300
    norms = torch.rand(n, 1, generator=gen) * 3 + 0.2
    g = {
        "means": torch.randn(n, 3, generator=gen) * 0.2,
        "quats": torch.nn.functional.normalize(torch.randn(n, 4, generator=gen), dim=1) * norms,  # unnormalised
        "log_scales": torch.rand(n, 3, generator=gen) * 5 - 7,
        "opacity_logits": torch.randn(n, generator=gen) * 3,
        "sh": torch.cat([torch.randn(n, 1, 3, generator=gen) * 1.2,  # some colours beyond [0, 1]
                         torch.randn(n, 8, 3, generator=gen) * 0.3], 1),
        "branch": torch.randint(0, 3, (n,), generator=gen, dtype=torch.int32),
    }
    path = tmp_path_factory.mktemp("interop") / "known.ply"
    write_ply(path, g, ["gsavatar export of runs/talk/avatar.pt: canonical (undeformed) Gaussians",
                        "gsavatar branches [start, stop): face 0 100, mouth 100 200, torso 200 300",
                        "gsavatar vertex property branch (int): 0 face, 1 mouth, 2 torso"])
    return g, path


def test_splat_transform_reads_our_gaussians(known, tmp_path):
    g, ply = known
    splat_transform(ply, tmp_path / "out.glb")
    assert_tool_read_our_gaussians(tmp_path / "out.glb", g)


def test_splat_transform_writes_our_ply_back_unchanged(known, tmp_path):
    g, ply = known
    splat_transform(ply, tmp_path / "back.ply")
    back = read_ply(tmp_path / "back.ply")
    assert back["property_names"][-1] == "branch" and back["sh_degree"] == 2
    for key in ("means", "quats", "log_scales", "opacity_logits", "sh"):
        assert torch.equal(back[key], g[key].float()), key
    assert torch.equal(back["branch"], g["branch"].long())


def test_splat_transform_filters_on_our_activations(known, tmp_path):
    """The tool's value filters use linear opacity, scale and colour: it keeps what our semantics keep."""
    g, ply = known
    splat_transform(ply, "-V", "opacity,gt,0.6", "-V", "scale_1,lt,0.01", "-V", "f_dc_2,gt,0.45", tmp_path / "kept.ply")
    kept = read_ply(tmp_path / "kept.ply")
    want = ((torch.sigmoid(g["opacity_logits"]) > 0.6) & (torch.exp(g["log_scales"][:, 1]) < 0.01)
            & (C0 * g["sh"][:, 0, 2] + 0.5 > 0.45))
    assert 0 < int(want.sum()) < len(want) // 2
    assert torch.equal(kept["means"], g["means"][want]) and torch.equal(kept["branch"], g["branch"][want].long())


@pytest.fixture(scope="session")
def tool():
    """Skips (before any costlier session fixture listed after it) when the tool is missing."""
    return tool_command()


def test_splat_transform_reads_an_exported_avatar(tool, trained, tmp_path):
    """`gsavatar export` of the session's trained cpu-tiny avatar (conftest's ``trained``, shared with
    the other export tests): the tool gets every branch's Gaussians, the torso's turned into the head frame."""
    from gsavatar.cli import main
    from gsavatar.model.io import load_run
    from gsavatar.outputs.ply import avatar_gaussians, reference_view

    _, run, _ = trained
    ply = tmp_path / "avatar.ply"
    assert main(["export", str(run), "-o", str(ply)]) == 0
    splat_transform(ply, tmp_path / "avatar.glb")
    bundle = load_run(run)
    want = avatar_gaussians(bundle.avatar, reference_view(bundle.subject))
    assert want["sh_degree"] >= 1 and set(want["branch"].tolist()) == {0, 1, 2}
    assert_tool_read_our_gaussians(tmp_path / "avatar.glb", want)
