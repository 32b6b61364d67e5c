"""What each subcommand does, in terms of the packages: load an engine, hand it to a video or folder job."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from .options import default_models_dir, engine_from_args

log = logging.getLogger("streamvsr")


def add_video_options(p: argparse.ArgumentParser) -> None:
    from ..video.writer import CODECS

    p.add_argument("--codec", choices=sorted(CODECS), default="h264",
                   help="; ".join(f"{k}: {v.description}" for k, v in CODECS.items()))
    p.add_argument("--crf", type=crf_value, help="h264 quality 0-51, lower is better (default 16)")
    p.add_argument("--scene-cut", type=float, metavar="T",
                   help="reset the temporal guidance where the mean absolute difference of consecutive input "
                        "frames (in [0,1], at 64 px) exceeds T; 0.3 is a good start. Off by default")
    p.add_argument("--resume", action="store_true",
                   help="write resumably (segments + OUT.streamvsr-resume.safetensors next to OUT) and continue "
                        "an interrupted job; the same command again picks up where it stopped")
    p.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                   help="with --resume: seconds between checkpoints (default 60)")


def crf_value(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= 51:
        raise argparse.ArgumentTypeError(f"{value} is outside x264's range 0 … 51")
    return value


class _GracefulStop:
    """First Ctrl-C: finish the current frame and close the file properly. Second: abort at once."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("\nstopping after this frame (Ctrl-C again to abort at once)")

    def __call__(self) -> bool:
        return self.requested

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def cmd_frames(args) -> int:
    from ..models.shared.runtime import Progress
    from ..video.frames import list_pngs, upscale_folder

    files = list_pngs(args.in_dir)
    engine = engine_from_args(args)
    progress = Progress(len(files), "frames")
    try:
        written = upscale_folder(engine, files, args.out_dir, seed=args.seed, save=args.save,
                                 progress=progress.update)
    finally:
        progress.close()
    log.info("wrote %d frames to %s", written, args.out_dir)
    return 0


def cmd_flow(args) -> int:
    from ..models.raft.weights import load_raft
    from ..models.shared.runtime import pick_device
    from ..video.frames import flow_folder, list_pngs

    files = list_pngs(args.in_dir)
    estimator = load_raft(args.flow, device=pick_device(args.device), corr=args.corr, downscale=args.flow_downscale)
    count = flow_folder(estimator, files, args.out_dir, save=args.save)
    log.info("wrote %d flow fields to %s", count, args.out_dir)
    return 0


def cmd_upscale(args) -> int:
    """Returns 0 when the whole video was written, 130 after a Ctrl-C stop."""
    from ..models.shared.errors import UserInputError
    from ..models.shared.runtime import Progress
    from ..video.stream import upscale_video
    from ..video.writer import codec_spec

    if not Path(args.in_video).is_file():
        raise UserInputError(f"{args.in_video} does not exist")
    codec_spec(args.codec, args.out_video)
    engine = engine_from_args(args)
    bar = Progress(None, "upscale")

    def progress(done, total):
        bar.total = total or None
        bar.update(done)

    with _GracefulStop() as stop:
        try:
            summary = upscale_video(engine, args.in_video, args.out_video, seed=args.seed, codec=args.codec,
                                    crf=args.crf, scene_cut_threshold=args.scene_cut, resume=args.resume,
                                    checkpoint_seconds=args.checkpoint_every, progress=progress,
                                    should_stop=stop)
        finally:
            bar.close()
    w, h = summary["size"]
    if summary["interrupted"]:
        if args.resume:
            log.warning("stopped after %d frames; run the same command again to continue", summary["frames"])
        else:
            log.warning("stopped: %s has the first %d frames (use --resume to be able to continue a job)",
                        args.out_video, summary["frames"])
        return 130
    log.info("wrote %s: %d frames, %dx%d, %.3g fps, %d scene cuts", args.out_video, summary["frames"], w, h,
             summary["fps"], summary["scene_cuts"])
    return 0


def cmd_convert(args) -> int:
    from ..models.registry import detect_family
    from ..models.shared.errors import UserInputError
    from ..models.shared.runtime import PRECISIONS

    family = detect_family(args.source)
    if family.convert is None:
        raise UserInputError(f"{family.title} models cannot be converted")
    options = {"version": args.version} if args.version else {}
    if options and family.name != "flashvsr":
        raise UserInputError(f"--flashvsr-version is a FlashVSR option, but {args.source} is a {family.title} model")
    out = family.convert(args.source, args.out, dtype=PRECISIONS[args.dtype], **options)
    log.info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)
    return 0


def cmd_download(args) -> int:
    from ..models.raft.weights import download_raft
    from ..models.stream_diffvsr.hub import download_stream_diffvsr

    dest = Path(args.dest) if args.dest else default_models_dir()
    model = download_stream_diffvsr(dest / "Stream-DiffVSR")
    raft = download_raft("raft_large", dest / "raft")
    log.info("model: %s\nflow: %s", model, raft)
    return 0
