"""The package's import directions (see the README's Layout): scoring, shipping and viewing a run
need no trainer; the model names no rendering backend; render knows nothing of training."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gsavatar"


def _is_module(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] != "gsavatar":
        return False
    path = PACKAGE.joinpath(*parts[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(folder: str) -> dict[str, set[str]]:
    """``{file: modules it imports}`` for every Python file under ``gsavatar/folder`` (lazy imports included)."""
    out = {}
    root = PACKAGE / folder
    for path in sorted(root.rglob("*.py") if root.is_dir() else [root]):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
                # ``from gsavatar.render import _compiled`` imports a module too
                names.update(f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}"))
        out[str(path.relative_to(PACKAGE))] = names
    return out


@pytest.mark.parametrize("folder, forbidden", [
    ("eval", ("gsavatar.train",)),
    ("outputs", ("gsavatar.train",)),
    ("viewer", ("gsavatar.train",)),
    ("drive.py", ("gsavatar.train",)),
    ("model", ("gsavatar.kernels", "gsavatar.render._compiled", "gsavatar.train", "gsavatar.eval", "gsavatar.data")),
    ("render", ("gsavatar.train", "gsavatar.eval", "gsavatar.data")),
    ("data", ("gsavatar.train", "gsavatar.eval", "gsavatar.render")),
])
def test_import_directions(folder, forbidden):
    bad = {f: sorted(m for m in mods if m.startswith(forbidden)) for f, mods in imported_modules(folder).items()}
    bad = {f: m for f, m in bad.items() if m}
    assert not bad, f"{folder} must not import {forbidden}: {bad}"


def test_train_uses_only_evals_public_api():
    """Training scores its result with eval's public function, not eval's insides."""
    for f, mods in imported_modules("train").items():
        inner = sorted(m for m in mods if m.startswith("gsavatar.eval."))
        assert not inner, f"{f} imports eval internals {inner}"


def test_loading_a_run_is_typed(trained):
    import dataclasses

    from gsavatar.model.avatar import Avatar
    from gsavatar.model.io import AvatarBundle, SubjectInfo, load_run

    _, run, _ = trained
    bundle = load_run(run)
    assert isinstance(bundle, AvatarBundle) and isinstance(bundle.subject, SubjectInfo)
    assert isinstance(bundle.avatar, Avatar) and not bundle.avatar.training
    assert bundle.avatar.audio_spec == bundle.subject.audio
    with pytest.raises(dataclasses.FrozenInstanceError):
        bundle.subject.render_size = 1
    # The checkpoint's plain form round-trips.
    again = SubjectInfo.from_dict(bundle.subject.to_dict())
    assert again.audio == bundle.subject.audio and again.train == bundle.subject.train
