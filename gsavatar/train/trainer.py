"""The training loop: one loop, stages as data (see :data:`STAGES`), resumable at any iteration.

``train(subject_dir, run_dir, cfg)`` writes into RUN_DIR:

    config.json      the resolved TrainConfig
    train.log        one line per log step, densification events, stage ends, the summary
    checkpoint.pt    the resumable state (model, optimizers, densification state, RNGs), rewritten atomically
    avatar.pt        the trained avatar (same typed format, no optimizer state): what render/eval/view load
    summary.json     wall time, Gaussians per branch, test-split PSNR (full frame and face)

A killed run (even SIGKILL mid-iteration) restarts from the last checkpoint.pt when the same
command is run again: completed stages stay completed, and on CPU the result is the same as
an uninterrupted run (all randomness comes from generators saved in the checkpoint). SIGINT
(Ctrl-C) or SIGTERM stops a run after the current iteration with a checkpoint of that very
iteration, so nothing is lost (a second signal stops at once, as a kill would).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gsavatar.config import StageConfig, TrainConfig
from gsavatar.data.frames import SubjectFrame, SubjectFrames
from gsavatar.data.io import atomic_write_json
from gsavatar.data.timebase import FPS, SAMPLE_RATE
from gsavatar.errors import GsavatarError, InputError, StoppedBySignal
from gsavatar.imaging import psnr
from gsavatar.model.avatar import BRANCHES, LAYERS, Avatar, AvatarRender, FrameInputs
from gsavatar.model.gaussians import PARAM_NAMES
from gsavatar.model.io import Checkpoint, Progress, SubjectInfo, avatar_from_state, load_checkpoint, save_checkpoint
from gsavatar.render import check_backend, get_backend
from gsavatar.runtime import resolve_device, restores_torch_threads
from gsavatar.train import losses
from gsavatar.train.init import audio_spec, build_avatar
from gsavatar.train.sampler import FrameSampler
from gsavatar.train.strategy import DensifyStrategy

log = logging.getLogger("gsavatar.train")


@dataclasses.dataclass
class Step:
    """What a stage's loss sees of one training step."""

    trainer: "Trainer"
    stage: StageConfig
    index: int  # the frame
    iteration: int  # within the stage
    static: bool  # deformation off (the face stage's warm-up)
    inputs: FrameInputs
    frame: SubjectFrame | None  # None when the stage renders nothing
    out: AvatarRender | None

    @property
    def loss_cfg(self):
        return self.trainer.cfg.loss

    def mouth_weighted(self) -> torch.Tensor:
        """Per-pixel weights: the mouth region counts more; the ring around the head does not count
        (in the stages that composite over ``back`` it shows the plate, which is not the truth)."""
        L, f = self.loss_cfg, self.frame
        return (1 + (L.mouth_region - 1) * f.mouth_region) * (1 - f.ring)


def _motion_loss(s: Step) -> torch.Tensor:
    silence = s.trainer.silence
    every = s.loss_cfg.silence_every
    if silence is not None and every > 0 and s.iteration % every == every - 1:
        audio = s.trainer.avatar.audio_input(silence.features, len(silence.features) // 2)
        inputs, target = dataclasses.replace(s.inputs, audio=audio), silence.offsets
    else:
        inputs, target = s.inputs, s.trainer.data.landmark_offsets(s.index)
        paced = s.trainer.paced_copies
        if paced and s.trainer.rng.random() < s.trainer.cfg.audio_augment.probability:
            # A copy at another tempo: its frame nearest this one, and the tracked motion at its time.
            copy = paced[int(s.trainer.rng.integers(len(paced)))]
            j, lo, hi, w = copy.frame_for(s.index, len(s.trainer.data.audio))
            data = s.trainer.data
            inputs = dataclasses.replace(inputs, audio=s.trainer.avatar.audio_input(copy.features, j))
            target = (1 - w) * data.landmark_offsets(lo) + w * data.landmark_offsets(hi)
    return s.loss_cfg.landmark_deformation * s.trainer._landmark_loss(inputs, target)


def _mouth_loss(s: Step) -> torch.Tensor:
    L, f, m = s.loss_cfg, s.frame, s.out.branches["mouth"]
    # Only the inside of the mouth (teeth, tongue, cavity): the lips belong to the face.
    loss = losses.photometric(s.out.image, f.image, L.ssim, f.mouth)
    # Outside the head only: behind the face, mouth Gaussians are hidden anyway, and
    # penalising them there would empty the cavity the open mouth must reveal.
    loss = loss + L.mouth_alpha * (m.alpha * (1 - f.head)).mean()
    return loss + L.mouth_deformation * (m.offsets ** 2).mean()


def _face_loss(s: Step) -> torch.Tensor:
    L, f, face = s.loss_cfg, s.frame, s.out.branches["face"]
    loss = losses.photometric(s.out.image, f.image, L.ssim, s.mouth_weighted())
    loss = loss + L.alpha * ((face.alpha - f.head * (1 - f.mouth)) ** 2).mean()
    if not s.static:
        loss = loss + L.deformation * (face.offsets ** 2).mean()
    # The landmark term needs no rendering, so the face net learns audio -> motion from the
    # tracking during the static warm-up too.
    loss = loss + _motion_loss(s)
    lpips = s.trainer.lpips
    if lpips is not None and s.iteration > 0.8 * s.stage.iterations:
        loss = loss + L.lpips * lpips(s.out.image.permute(2, 0, 1)[None], f.image.permute(2, 0, 1)[None]).mean()
    return loss


def _fuse_loss(s: Step) -> torch.Tensor:
    return losses.photometric(s.out.image, s.frame.image, s.loss_cfg.ssim, s.mouth_weighted())


def _torso_loss(s: Step) -> torch.Tensor:
    L, f, t = s.loss_cfg, s.frame, s.out.branches["torso"]
    loss = losses.photometric(s.out.image, f.image, L.ssim)
    return loss + L.torso_alpha * (((t.alpha - f.torso) ** 2) * (1 - f.head)).mean()


@dataclasses.dataclass(frozen=True)
class StageSetup:
    """What a stage of a given name trains, renders and minimises."""

    trained: tuple[str, ...]  # branches whose Gaussians are optimised
    params: tuple[str, ...]  # which Gaussian parameters of those branches
    deformers: tuple[str, ...]  # deformation networks optimised (and held still during static_iterations)
    layers: tuple[str, ...]  # layers rendered (none: the step renders nothing)
    back: str  # "data": the frame with the head replaced by the plate; "render": torso over the plate
    densify: str | None  # branch that densification acts on
    loss: Callable[[Step], torch.Tensor]  # the step's loss


GEOMETRY_AND_COLOUR = PARAM_NAMES
COLOUR = ("sh0", "shN", "opacity_logits")
STAGES = {
    # motion: the face net learns audio -> motion from the tracked landmarks alone, nothing rendered
    # (~20 ms a step on a CPU), so the face stage starts from a net that already moves the lips.
    "motion": StageSetup((), (), ("face",), (), "data", None, _motion_loss),
    "mouth": StageSetup(("mouth",), GEOMETRY_AND_COLOUR, ("mouth",), ("mouth",), "data", "mouth", _mouth_loss),
    "face": StageSetup(("face",), GEOMETRY_AND_COLOUR, ("face",), ("face", "mouth"), "data", "face", _face_loss),
    "fuse": StageSetup(("face", "mouth"), COLOUR, (), ("face", "mouth"), "data", None, _fuse_loss),
    "torso": StageSetup(("torso",), GEOMETRY_AND_COLOUR, ("torso",), LAYERS, "render", "torso", _torso_loss),
}


def _encoding_params(module: torch.nn.Module) -> tuple[list, list]:
    enc, net = [], []
    for name, p in module.named_parameters():
        (enc if name.startswith("spatial.") else net).append(p)
    return enc, net


def make_optimizers(avatar: Avatar, cfg: TrainConfig) -> dict[str, torch.optim.Optimizer]:
    """One Adam per branch's Gaussians (a group per parameter) and one per deformation net."""
    o = cfg.optim
    lr = {"means": o.means, "quats": o.quats, "log_scales": o.log_scales, "opacity_logits": o.opacity,
          "sh0": o.sh0, "shN": o.shN}
    opts = {}
    for b in BRANCHES:
        g = avatar.gaussians[b]
        opts[f"{b}_gaussians"] = torch.optim.Adam(
            [{"params": [g.params[n]], "lr": lr[n], "name": n} for n in PARAM_NAMES], eps=1e-15)
    for b, net in avatar.deformers().items():
        enc, rest = _encoding_params(net)
        opts[f"{b}_deformer"] = torch.optim.Adam(
            [{"params": enc, "lr": o.encoding, "name": "encoding"}, {"params": rest, "lr": o.network, "name": "network"}],
            eps=1e-15)
    for opt in opts.values():
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return opts


def _set_trainable(avatar: Avatar, setup: StageSetup) -> list[str]:
    """requires_grad only on what the stage trains; returns the optimizer names to step."""
    for p in avatar.parameters():
        p.requires_grad_(False)
    names = []
    for b in setup.trained:
        for n in setup.params:
            avatar.gaussians[b].params[n].requires_grad_(True)
        names.append(f"{b}_gaussians")
    for b in setup.deformers:
        avatar.deformers()[b].requires_grad_(True)
        names.append(f"{b}_deformer")
    return names


@dataclasses.dataclass(frozen=True)
class SilenceExample:
    """What the landmark term's silent steps see and are asked for."""

    features: torch.Tensor  # [F, S, D] raw features of digital silence (the middle frame is the input)
    offsets: torch.Tensor  # [V, 3] the subject's resting mouth (metres from the mean shape)


SILENCE_SECONDS = 2.0  # room for the extractor's own context (Whisper's encoder sees it all)


def silence_example(data: SubjectFrames) -> SilenceExample:
    """Digital silence through the subject's own feature extractor (so that it is what a drive's
    pause turns into) and the resting mouth."""
    from gsavatar.drive import SpeechFeaturizer, frame_count

    samples = np.zeros(int(SILENCE_SECONDS * SAMPLE_RATE), np.float32)
    features = SpeechFeaturizer(audio_spec(data))(samples, frame_count(samples)).to(data.audio.device)
    return SilenceExample(features, data.offsets_of(data.rest_expression()))


@dataclasses.dataclass(frozen=True)
class AudioCopy:
    """One augmented copy of the subject's audio, as features through the subject's own extractor."""

    features: torch.Tensor  # [M, S, D]
    tempo: float = 1.0  # its frame j holds the audio of the subject's frame tempo * j (1: frame for frame)

    def frame_for(self, index: int, frames: int) -> tuple[int, int, int, float]:
        """``(j, lo, hi, w)``: the copy's frame nearest the subject's frame ``index``, and where it lies on
        the subject's timeline: between frames ``lo`` and ``hi``, ``w`` of the way."""
        j = min(round(index / self.tempo), len(self.features) - 1)
        t = min(j * self.tempo, frames - 1)
        lo = int(np.floor(t))
        return j, lo, min(lo + 1, frames - 1), float(t - lo)


def augmented_audio(data: SubjectFrames, cfg, rng: np.random.Generator) -> list[AudioCopy]:
    """``cfg.variants`` copies of the subject's audio with a random gain, white noise, and
    (``cfg.warp``) frequency warp or (``cfg.tempo``) tempo change each (``AudioAugmentConfig``),
    through the subject's own extractor."""
    from gsavatar.data.voice import change_tempo, warp_frequencies
    from gsavatar.drive import SpeechFeaturizer, frame_count

    if cfg.variants <= 0:
        return []
    samples = np.asarray(data.dataset.audio, np.float32)
    power = float(np.mean(samples**2)) or 1e-8
    featurizer = SpeechFeaturizer(audio_spec(data))
    out = []
    for _ in range(cfg.variants):
        gain = 10 ** (rng.uniform(-cfg.gain_db, cfg.gain_db) / 20)
        snr = rng.uniform(cfg.noise_snr_db, cfg.noise_snr_db + 20)
        noise = rng.standard_normal(samples.size).astype(np.float32) * np.sqrt(power / 10 ** (snr / 10))
        voice = warp_frequencies(samples, rng.uniform(1 - cfg.warp, 1 + cfg.warp)) if cfg.warp > 0 else samples
        x = np.clip(gain * (voice + noise), -1, 1)
        if cfg.tempo > 0:
            tempo = float(rng.uniform(1 - cfg.tempo, 1 + cfg.tempo))
            x = change_tempo(x, tempo)
            out.append(AudioCopy(featurizer(x, frame_count(x)).to(data.audio.device), tempo))
        else:
            out.append(AudioCopy(featurizer(x, len(data.audio)).to(data.audio.device)))
    return out


MIN_LIPSYNC_SECONDS = 20.0
"""Training video below which lip-sync on new speech is unreliable. Measured on cnn2 cut to its
first 10, 20, 40 and 71 s (BENCHMARKS.md, Lip-sync without rendering, two seeds each): the
worst of four new voices followed the avatar's mouth with r -0.10, 0.10, 0.16 and 0.27, the best
at about 0.5 throughout; the held-out r of the subject's own speech does not show it."""


def _same_settings(saved: dict, now: dict) -> bool:
    """Whether a checkpoint's settings are the run's: read through TrainConfig first, so that a
    setting added since the checkpoint was written counts as its default, not as a difference."""
    from gsavatar.config import config_from_dict

    if saved == now:
        return True
    try:
        filled = json.loads(json.dumps(dataclasses.asdict(config_from_dict(TrainConfig, saved))))
    except (GsavatarError, TypeError, ValueError):  # a setting removed since: not the same
        return False
    return filled == now


def short_video_note(train_frames: int) -> str | None:
    """One line for a subject too short for reliable lip-sync on new speech, or None."""
    seconds = train_frames / FPS
    if seconds >= MIN_LIPSYNC_SECONDS:
        return None
    return (f"warning: {seconds:.0f} s of training video is short for lip-sync on new speech: a minute or more "
            f"is best (on cnn2 cut to 10 s, one of four new voices got no sync, r -0.10; the whole 71 s video "
            f"gave r 0.27 or more on all four)")


class Trainer:
    def __init__(self, cfg: TrainConfig, subject_dir: str | Path, run_dir: str | Path, show_progress: bool = True):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.subject_dir = Path(subject_dir)
        self.show_progress = show_progress
        self._stop_requested: list[int] = []  # signals received during the current stage
        self.device = resolve_device(cfg.device)
        if cfg.cpu_threads > 0:
            torch.set_num_threads(cfg.cpu_threads)
        cfg.validate()
        check_backend(cfg.backend, self.device)
        self.backend = get_backend(cfg.backend, self.device)
        self.data = SubjectFrames(subject_dir, cfg.render_size, cfg.avatar.audio_feature, self.device)
        train = self.data.train_indices
        trusted = train[self.data.valid[train].numpy()]  # frames whose landmarks (hence pose) were trusted
        self.sampler = FrameSampler(trusted if len(trusted) else train, self.data.mouth_open, self.data.blink.cpu().numpy())
        if len(self.data.train_indices) == 0:
            raise InputError(f"{subject_dir} has no training frames")
        self.lpips = losses.lpips_if_available(self.device) if cfg.loss.lpips > 0 else None
        # Made from their own generator (not the run's), so a resumed run has the same copies.
        self.audio_variants = augmented_audio(self.data, cfg.audio_augment, np.random.default_rng(cfg.seed + 1))
        # Copies that keep the video's timing can stand in for the track anywhere; copies at another
        # tempo only where the target is the tracked motion (read at their times).
        self.timed_copies = [c for c in self.audio_variants if c.tempo == 1.0]
        self.paced_copies = [c for c in self.audio_variants if c.tempo != 1.0]
        self.silence, self.silence_off = None, None
        if cfg.loss.silence_every > 0:
            try:
                self.silence = silence_example(self.data)
            except InputError as e:  # the extractor cannot run here (e.g. whisper's extra missing)
                self.silence_off = str(e)

    # -- state ------------------------------------------------------------------------------
    def _fresh(self):
        torch.manual_seed(self.cfg.seed)
        self.gen = torch.Generator().manual_seed(self.cfg.seed)
        self.rng = np.random.default_rng(self.cfg.seed)
        self.avatar = build_avatar(self.cfg, self.data, self.gen).to(self.device)
        self.optimizers = make_optimizers(self.avatar, self.cfg)
        self.strategy_state = {}
        self.progress = Progress()
        self.history: list[dict] = []

    def _resume(self, ckpt: Checkpoint):
        self.avatar = avatar_from_state(self.cfg, audio_spec(self.data), ckpt.model).to(self.device)
        self.optimizers = make_optimizers(self.avatar, self.cfg)
        for name, state in ckpt.optimizers.items():
            self.optimizers[name].load_state_dict(state)
        self.strategy_state = {b: {k: v.to(self.device) for k, v in s.items()} for b, s in ckpt.strategy.items()}
        self.gen = torch.Generator()
        self.gen.set_state(ckpt.rng["torch"].cpu())  # map_location may have moved it
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = ckpt.rng["numpy"]
        self.progress = ckpt.progress
        self.history = ckpt.history

    def subject_info(self) -> SubjectInfo:
        d = self.data
        return SubjectInfo(
            subject_dir=str(self.subject_dir.resolve()), audio=audio_spec(d), num_frames=d.num_frames,
            render_size=d.size, K=d.K.cpu(), viewmats=d.viewmats.cpu(), poses=d.poses.cpu(), blink=d.blink.cpu(),
            train=(int(d.train_indices[0]), int(d.train_indices[-1]) + 1),
            test=(int(d.test_indices[0]), int(d.test_indices[-1]) + 1) if len(d.test_indices) else (0, 0))

    def checkpoint(self, final: bool = False) -> Checkpoint:
        return Checkpoint(
            config=dataclasses.asdict(self.cfg), subject=self.subject_info().to_dict(),
            model={k: v.detach().cpu() for k, v in self.avatar.state_dict().items()}, progress=self.progress,
            optimizers={} if final else {k: o.state_dict() for k, o in self.optimizers.items()},
            strategy={} if final else {b: {k: v.cpu() for k, v in s.items()} for b, s in self.strategy_state.items()},
            rng={} if final else {"torch": self.gen.get_state(), "numpy": self.rng.bit_generator.state},
            history=self.history)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> dict:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _attach_log_file(self.run_dir / "train.log")
        ckpt_path = self.run_dir / "checkpoint.pt"
        for stale in self.run_dir.glob(".checkpoint.pt.tmp*"):  # a write cut short by a kill
            stale.unlink()
        config_json = json.dumps(dataclasses.asdict(self.cfg), indent=2)
        if ckpt_path.is_file():
            ckpt = load_checkpoint(ckpt_path, self.device)
            if not _same_settings(ckpt.config, json.loads(config_json)):
                raise InputError(f"{self.run_dir} holds a run with different settings; use another RUN_DIR or --force")
            now = self.subject_info().to_dict()
            for key in ("subject_dir", "num_frames", "audio_kind", "feature_dim", "render_size"):
                if ckpt.subject.get(key) != now[key]:
                    raise InputError(f"{self.run_dir} was trained on another subject ({key}: {ckpt.subject.get(key)} "
                                     f"vs {now[key]}); use another RUN_DIR or --force")
            self._resume(ckpt)
            log.info("resuming from %s: stage %d (%s), iteration %d", ckpt_path, self.progress.stage_index,
                     self.cfg.stages[min(self.progress.stage_index, len(self.cfg.stages) - 1)].name,
                     self.progress.stage_iteration)
        else:
            self._fresh()
            atomic_write_json(self.run_dir / "config.json", json.loads(config_json))
            log.info("training %s -> %s on %s (audio: %s, %d train / %d test frames, %d px)", self.subject_dir,
                     self.run_dir, self.device, self.data.audio_kind, len(self.data.train_indices),
                     len(self.data.test_indices), self.data.size)
        if self.silence_off:
            _warn(f"warning: no silent landmark steps ({self.silence_off}): the mouth may stay ajar in pauses")
        note = short_video_note(len(self.data.train_indices))
        if note:
            _warn(note)
        start = time.perf_counter() - self.progress.elapsed_s
        while self.progress.stage_index < len(self.cfg.stages):
            stage = self.cfg.stages[self.progress.stage_index]
            with _stop_requests() as self._stop_requested:
                self._run_stage(stage, start, ckpt_path)
            self.progress.completed_stages.append(stage.name)
            self.progress.stage_index += 1
            self.progress.stage_iteration = 0
            self.progress.elapsed_s = time.perf_counter() - start
            save_checkpoint(self.checkpoint(), ckpt_path)
        return self._finish(time.perf_counter() - start)

    def _run_stage(self, stage: StageConfig, start: float, ckpt_path: Path) -> None:
        setup = STAGES[stage.name]
        cfg = self.cfg
        trained = _set_trainable(self.avatar, setup)
        strategy = None
        if stage.densify and setup.densify:
            branch_cfg = getattr(cfg.avatar, setup.densify)
            strategy = DensifyStrategy(cfg.densify, branch_cfg.max_gaussians)
            if setup.densify not in self.strategy_state:
                self.strategy_state[setup.densify] = strategy.initial_state(len(self.avatar.gaussians[setup.densify]), self.device)
        bar = _progress_bar(stage, self.progress.stage_iteration, self.show_progress)
        running = []
        while self.progress.stage_iteration < stage.iterations:
            it = self.progress.stage_iteration
            frac = it / max(1, stage.iterations)
            for name in trained:
                for group in self.optimizers[name].param_groups:
                    group["lr"] = group["base_lr"] * cfg.optim.final_lr_fraction ** frac
            index = self.sampler.sample(self.rng, stage.curriculum, frac)
            loss, image, frame, renders = self._step(stage, setup, index, it, strategy)
            for name in trained:
                self.optimizers[name].step()
                self.optimizers[name].zero_grad(set_to_none=True)
            if strategy is not None:
                b = setup.densify
                r = renders.branches[b]
                event = strategy.after_backward(self.strategy_state[b], self.avatar.gaussians[b],
                                                self.optimizers[f"{b}_gaussians"], r.means2d, r.radii,
                                                self.data.size, self.data.size, it, stage.iterations, self.gen)
                if event:
                    log.info("%s it %d: densify %s", stage.name, it, event)
            running.append(float(loss))
            self.progress.stage_iteration += 1
            self.progress.global_iteration += 1
            if self.progress.stage_iteration % cfg.log_every == 0 or self.progress.stage_iteration == stage.iterations:
                p = None if image is None else psnr(image, frame.image)
                rec = {"stage": stage.name, "iteration": self.progress.stage_iteration, "loss": float(np.mean(running)),
                       "psnr": p, "gaussians": len(self.avatar.gaussians[setup.trained[0]]) if setup.trained else 0,
                       "elapsed_s": time.perf_counter() - start}
                self.history.append(rec)
                running = []
                log.info("%s it %d: loss %.4f, %s", stage.name, rec["iteration"], rec["loss"], _fit_text(rec))
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", **({} if p is None else {"psnr": f"{p:.2f}", "n": rec["gaussians"]}))
            if bar is not None:
                bar.update(1)
            if self.progress.global_iteration % cfg.checkpoint_every == 0 and self.progress.stage_iteration < stage.iterations:
                self.progress.elapsed_s = time.perf_counter() - start
                save_checkpoint(self.checkpoint(), ckpt_path)
            if self._stop_requested:
                if bar is not None:
                    bar.close()
                self._stop(stage, start, ckpt_path)
        if bar is not None:
            bar.close()
        last = [h for h in self.history if h["stage"] == stage.name]
        if last:
            log.info("stage %s done: loss %.4f, %s", stage.name, last[-1]["loss"], _fit_text(last[-1], final=True))

    def _stop(self, stage: StageConfig, start: float, ckpt_path: Path):
        """Checkpoint the iteration just finished and end the run (a stop was requested by a signal)."""
        self.progress.elapsed_s = time.perf_counter() - start
        save_checkpoint(self.checkpoint(), ckpt_path)
        name = signal.Signals(self._stop_requested[0]).name
        where = f"{stage.name} iteration {self.progress.stage_iteration} ({self.progress.global_iteration} in all)"
        log.info("stopped by %s after %s; checkpoint saved, the same command resumes", name, where)
        raise StoppedBySignal(f"training stopped by {name} after {where}; {ckpt_path} saved: run the same command "
                              f"to resume", self._stop_requested[0])

    def _step(self, stage: StageConfig, setup: StageSetup, index: int, it: int, strategy):
        data, avatar = self.data, self.avatar
        static = it < stage.static_iterations
        frame = data.frame(index) if setup.layers else None
        audio = None
        timed = self.timed_copies
        if timed and self.rng.random() < self.cfg.audio_augment.probability:
            audio = timed[int(self.rng.integers(len(timed)))].features
        inputs = data.inputs(index, avatar, back=frame.back if frame is not None and setup.back == "data" else None,
                             audio=audio)
        out = None
        if setup.layers:
            out = avatar(inputs, layers=setup.layers, deform={b: not static for b in setup.deformers},
                         backend=self.backend)
            if strategy is not None:
                strategy.before_backward(out.branches[setup.densify].means2d)
        loss = setup.loss(Step(self, stage, index, it, static, inputs, frame, out))
        _backward(loss, stage, it, index)
        return loss.detach(), None if out is None else out.image.detach(), frame, out

    def _landmark_loss(self, inputs, target: torch.Tensor) -> torch.Tensor:
        """Squared error (cm^2) between the face net's offsets at the canonical landmarks and ``target``
        (the tracked motion ``[V, 3]``)."""
        offsets, _, _ = self.avatar.face_offsets(self.data.model_mean, inputs, self.backend)
        pred = offsets * self.avatar.face_deformer.position_scale
        return (((pred - target) * 100) ** 2).mean()

    # -- the end ----------------------------------------------------------------------------
    def score(self, indices=None) -> dict:
        """Test-split PSNR, full frame and inside the face mask, by eval's own scoring (the baselines' too)."""
        from gsavatar.eval import score_test_split

        idx = summary_frames(self.data.test_indices, self.cfg.eval_frames) if indices is None else np.asarray(indices)
        with torch.no_grad():
            r = score_test_split(self.avatar, self.data, idx)
        return {"test_psnr": r["psnr"], "test_psnr_face": r["psnr_face"], "test_frames": r["frames"]}

    def _finish(self, wall_s: float) -> dict:
        metrics = self.score()
        summary = {"wall_s": wall_s, "iterations": self.progress.global_iteration,
                   "gaussians": self.avatar.num_gaussians(), "device": str(self.device),
                   "render_size": self.data.size, "audio_feature": self.data.audio_kind, **metrics}
        save_checkpoint(self.checkpoint(final=True), self.run_dir / "avatar.pt")
        atomic_write_json(self.run_dir / "summary.json", summary)
        log.info("done in %.1f s: Gaussians %s; test PSNR %s dB (face %s dB) over %d frames", wall_s,
                 summary["gaussians"], _db(metrics["test_psnr"]), _db(metrics["test_psnr_face"]), metrics["test_frames"])
        return summary


def summary_frames(test_indices, eval_frames: int) -> np.ndarray:
    """The test frames the end-of-run summary scores: all, or ``eval_frames`` of them evenly spaced."""
    idx = np.asarray(test_indices)
    if eval_frames:
        idx = idx[np.linspace(0, len(idx) - 1, min(eval_frames, len(idx))).round().astype(int)]
    return idx


def _backward(loss: torch.Tensor, stage: StageConfig, it: int, index: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss in stage {stage.name} at iteration {it} (frame {index})")
    loss.backward()


def _db(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _fit_text(rec: dict, final: bool = False) -> str:
    """The log line's tail for a history record: PSNR and Gaussian count, or what a stage without
    an image (motion) fits."""
    if rec["psnr"] is None:
        return "tracked landmark motion only (nothing rendered)"
    return f"PSNR {rec['psnr']:.2f} dB{' (last sampled frame)' if final else ''}, {rec['gaussians']} Gaussians"


def _progress_bar(stage: StageConfig, done: int, show: bool):
    if not show:
        return None
    from gsavatar.progress import progress

    return progress(total=stage.iterations, initial=done, desc=f"{stage.name:>5}", unit="it", leave=True)


def _warn(text: str) -> None:
    """A warning for the user: on stderr, where they look, and in train.log."""
    import sys

    print(text, file=sys.stderr, flush=True)
    log.warning("%s", text)


def _attach_log_file(path: Path) -> None:
    for h in list(log.handlers):
        if isinstance(h, logging.FileHandler):
            log.removeHandler(h)
            h.close()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


@contextlib.contextmanager
def _stop_requests():
    """While training: SIGINT / SIGTERM only request a stop (their numbers collect in the yielded
    list, which the loop checks after each iteration); a second signal interrupts at once.
    Python delivers signals to the main thread only, so elsewhere nothing changes."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def request(signum, _frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)

    previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@restores_torch_threads
def train(subject_dir, run_dir, cfg: TrainConfig, show_progress: bool = True) -> dict:
    """Train (or resume) an avatar on a subject dataset; returns the summary (also in RUN_DIR/summary.json)."""
    return Trainer(cfg, subject_dir, run_dir, show_progress).run()

