"""The ``gsavatar`` command: parses arguments and calls one function per subcommand.

A subcommand appears here only once it works. User errors are printed as one line
(``error: ...``) with a non-zero exit status, never as a traceback.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated

import tyro

from gsavatar.config import PreprocessConfig
from gsavatar.errors import GsavatarError


@dataclasses.dataclass
class Preprocess:
    """Turn a talking-head video into a subject dataset (frames, landmarks, masks, background, audio features).

    Writes SUBJECT_DIR/manifest.json and preprocess_report.json. Re-running skips stages
    whose inputs are unchanged.
    """

    video: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="VIDEO")]
    """Input video (any container/codec FFmpeg reads), with the speaker's audio track, at least 5 s."""
    out: Annotated[Path, tyro.conf.arg(aliases=["-o"], metavar="SUBJECT_DIR")]
    """Subject dataset directory to create or update."""
    size: int = 512
    """Working resolution (square crop resized to SIZE x SIZE)."""
    audio_features: tuple[str, ...] = ("logmel", "whisper")
    """Audio feature kinds to extract: logmel (built in), whisper (Whisper tiny.en encoder, offline), hubert / wav2vec2 (need local weights)."""

    def __call__(self) -> None:
        from gsavatar.data.preprocess import preprocess

        cfg = PreprocessConfig(size=self.size, audio_features=tuple(self.audio_features))
        report = preprocess(self.video, self.out, cfg)
        print(f"subject dataset ready: {self.out}  ({report['num_frames']} frames, face in "
              f"{100 * report['face_fraction']:.1f}%, {report['total_wall_s']:.1f} s)")


@dataclasses.dataclass
class Demo:
    """Make the built-in synthetic demo subject (scikit-image's astronaut speaking synthetic speech) and preprocess it.

    Writes OUT/demo.mp4 (H.264 + AAC) and, unless --no-preprocess, the subject dataset OUT/subject.
    """

    out: Annotated[Path, tyro.conf.arg(aliases=["-o"], metavar="DIR")] = Path("demo")
    """Directory for demo.mp4 and the subject dataset."""
    duration: float = 8.0
    """Length of the demo video in seconds."""
    size: int = 512
    """Resolution of the demo video and of the subject dataset."""
    seed: int = 0
    """Random seed of the synthetic speech."""
    preprocess: bool = True
    """Also run preprocessing on the demo video (OUT/subject)."""

    def __call__(self) -> None:
        from gsavatar.data.synthetic import make_synthetic_subject

        self.out.mkdir(parents=True, exist_ok=True)
        subject = make_synthetic_subject(self.out / "demo.mp4", duration_s=self.duration, size=self.size, seed=self.seed)
        print(f"demo video: {subject.video_path} ({subject.num_frames} frames)")
        if self.preprocess:
            Preprocess(subject.video_path, self.out / "subject", size=self.size)()


COMMANDS = {
    "preprocess": Preprocess,
    "demo": Demo,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gsavatar`` console script."""
    command = tyro.extras.subcommand_cli_from_dict(
        COMMANDS, args=argv, prog="gsavatar",
        description="gsavatar: audio-driven 3D Gaussian-splatting talking-head avatars.",
    )
    try:
        command()
    except GsavatarError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
