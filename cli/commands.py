"""What each subcommand does, in terms of the packages: load an engine, hand it to a video or folder job."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import threading
from pathlib import Path

from .options import check_flow_file, default_models_dir, float_range, plan_engine

log = logging.getLogger("streamvsr")


def add_video_options(p: argparse.ArgumentParser) -> None:
    from ..video.writer import CODECS

    p.add_argument("--codec", choices=sorted(CODECS), default="h264",
                   help="h264 (the default) or lossless. " + "; ".join(f"{k}: {v.description}"
                                                                         for k, v in CODECS.items()))
    p.add_argument("--crf", type=crf_value, help="h264 quality 0-51, lower is better (default 16; refused with "
                   "--codec lossless)")
    p.add_argument("--scene-cut", type=float_range(0, 1), metavar="T",
                   help="reset the temporal guidance where the mean absolute difference of consecutive input "
                        "frames (in [0,1], at 64 px) exceeds T; 0.3 is a good start. Off by default (0 = off)")
    add_resume_options(p, "write resumably (segments + OUT.streamvsr-resume.safetensors next to OUT)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it exists (only once the new file is complete), or discard an unfinished "
                        "--resume job of OUT (with --resume: one that cannot continue, made with other settings)")
    p.add_argument("--allow-truncated", action="store_true",
                   help="accept a cut-off or damaged input: write the frames that can be decoded to OUT and exit 0 "
                        "with a warning (without it: an error, and those frames go to OUT's .streamvsr-partial "
                        "file)")


def add_resume_options(p: argparse.ArgumentParser, how: str) -> None:
    p.add_argument("--resume", action="store_true",
                   help=f"{how} and continue an interrupted job; the same command again picks up where it stopped")
    p.add_argument("--checkpoint-every", type=float_range(0, low_open=True), metavar="SECONDS",
                   help="with --resume: seconds between checkpoints (default: every 60 s, less often where a "
                        "checkpoint is slow to write or, for a video, fewer than 12 frames were done since the last)")


def check_resume_options(args) -> None:
    from ..models.shared.errors import UserInputError

    if args.checkpoint_every is not None and not args.resume:
        raise UserInputError("--checkpoint-every only applies with --resume")


def crf_value(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= 51:
        raise argparse.ArgumentTypeError(f"{value} is outside x264's range 0 … 51")
    return value


# Polite stops besides Ctrl-C: `kill`, systemd, `docker stop` and job schedulers send SIGTERM, a closed terminal or
# ssh session SIGHUP. Each is taken as a first Ctrl-C is, so that what a run finished is kept (their default, to die
# where the process stands, lost the frames done and left the lock and work files behind). One coming again does not
# abort the stop under way, as a second Ctrl-C does: a closing terminal can send SIGHUP twice (the shell, then the
# kernel), and a scheduler that will not wait sends SIGKILL. (Where Ctrl-C is ignored, SIGTERM again aborts.)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_received: list[int] = []  # the stop signals of this command, in order


def _heeded(*signums: int) -> list[int]:
    """Those of ``signums`` the process heeds: one it was started ignoring stays ignored (`nohup` runs a command with
    SIGHUP ignored so that it outlives the terminal, a script's `cmd &` with SIGINT ignored)."""
    return [signum for signum in signums if signal.getsignal(signum) is not signal.SIG_IGN]


def _raise_interrupt(signum, frame):
    _received.append(signum)
    if len(_received) == 1:
        raise KeyboardInterrupt


@contextlib.contextmanager
def stop_signals():
    """For the block, SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does (on the main thread only, where
    Python runs signal handlers)."""
    _received.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise_interrupt) for signum in _heeded(*STOP_SIGNALS)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_status() -> int:
    """The exit status of a stopped command: 128 + the signal that stopped it (130: Ctrl-C), as a shell gives."""
    return 128 + int(_received[0] if _received else signal.SIGINT)


class _GracefulStop:
    """The first stop (Ctrl-C or a stop signal): finish the current frame and close the file properly. A second
    Ctrl-C aborts at once (a second stop signal only where Ctrl-C is ignored: see ``STOP_SIGNALS``)."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self._handle)
                             for signum in _heeded(signal.SIGINT, *STOP_SIGNALS)}
        return self

    def _handle(self, signum, frame):
        _received.append(signum)
        # Where the command was started ignoring Ctrl-C (a script's `cmd &`), SIGTERM aborts instead; never SIGHUP,
        # which a closing terminal sends twice
        ctrl_c = signal.SIGINT in self.previous
        if self.requested:
            if signum == signal.SIGINT or (not ctrl_c and signum == signal.SIGTERM):
                raise KeyboardInterrupt
            return
        self.requested = True
        name = signal.Signals(signum).name
        how = "Ctrl-C again" if signum == signal.SIGINT else f"{name} came; Ctrl-C" if ctrl_c else \
            f"{name} came; {'another' if signum == signal.SIGTERM else 'a'} SIGTERM"
        log.warning("\nstopping after this frame (%s to abort at once)", how)

    def __call__(self) -> bool:
        return self.requested

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class _NewFolders:
    """The folders of ``folder``'s path (itself included) that do not exist yet, to be removed again where still
    empty (``remove_empty``)."""

    def __init__(self, folder):
        self.missing = []
        path = Path(os.path.abspath(folder))
        while not os.path.lexists(path) and path.parent != path:
            self.missing.append(path)
            path = path.parent

    def remove_empty(self) -> None:
        for path in self.missing:  # the deepest first
            try:
                path.rmdir()
            except FileNotFoundError:  # never made (a folder the job itself creates) or removed meanwhile
                continue
            except OSError:  # not empty: outputs kept for the user, or files of another run
                break


@contextlib.contextmanager
def _removed_if_failed(folder):
    """``_NewFolders(folder)``, removed again where still empty when the block fails: a run that fails to load its
    model, or stops before its first output, leaves no trace (a run stopped at its own request calls
    ``remove_empty`` itself). Enter it outside the output's lock, whose file is in the folder until the lock is
    released."""
    new = _NewFolders(folder)
    try:
        yield new
    except BaseException:
        new.remove_empty()
        raise


def _stopped_before_the_end(stop: _GracefulStop, written: int, total: int, out_dir) -> bool:
    """Whether a folder job stopped by a first stop left outputs unwritten (it said which); a stop that came with
    the last frame finished the job, which is said."""
    if not stop.requested:
        return False
    if written < total:
        return True
    log.warning("the stop came after the last frame: %s was finished", out_dir)
    return False


def cmd_frames(args) -> int:
    from ..models.shared.runtime import Progress
    from ..video.frames import (check_folder_job, check_frames, folder_checkpoint, list_pngs, png_bit_depth,
                                upscale_folder)
    from ..video.outputs import OutputLock, make_folder
    from ..video.resume import check_model_family

    # Every input and output mistake is found before the model loads; the lock makes a second run into the same
    # folder fail at once rather than after loading.
    check_resume_options(args)
    files = list_pngs(args.in_dir)
    width, height = check_frames(files)
    deep = [p for p in files if png_bit_depth(p) == 16] if args.save == "png" else []  # (a header read each)
    if deep:
        which = "the frames are" if len(deep) == len(files) else \
            f"{len(deep)} of the {len(files)} frames ({deep[0].name} the first) are"
        log.warning("%s 16-bit PNGs; --save png writes 8 bits (--save png16 keeps 16)", which)
    check_folder_job(files, args.out_dir, seed=args.seed, save=args.save, resume=args.resume, overwrite=args.overwrite)
    plan = plan_engine(args)
    if args.resume:
        check_model_family(folder_checkpoint(args.out_dir), plan.family.name, args.overwrite)
    plan.check_size(height, width)
    with _removed_if_failed(args.out_dir) as new_folders:
        make_folder(args.out_dir.parent)
        with OutputLock(args.out_dir):
            engine = plan.load()
            progress = Progress(len(files), "frames")
            with _GracefulStop() as stop:
                try:
                    written = upscale_folder(engine, files, args.out_dir, seed=args.seed, save=args.save,
                                             progress=progress.update, overwrite=args.overwrite, resume=args.resume,
                                             checkpoint_seconds=args.checkpoint_every, should_stop=stop)
                finally:
                    progress.close()
    if _stopped_before_the_end(stop, written, len(files), args.out_dir):
        if not written and not os.path.lexists(folder_checkpoint(args.out_dir).state):
            new_folders.remove_empty()  # (a stop before the first output leaves no trace, as a failure does)
        return stop_status()
    scale = int(engine.scale)
    log.info("wrote %d frame%s (%s, %dx%d) to %s", written, "" if written == 1 else "s", args.save, width * scale,
             height * scale, args.out_dir)
    return 0


def cmd_flow(args) -> int:
    from ..models.raft.weights import load_raft
    from ..models.shared.errors import UserInputError
    from ..models.shared.runtime import Progress, pick_device
    from ..video.frames import check_folder_outputs, check_frames, list_pngs, output_name, flow_folder
    from ..video.outputs import OutputLock, make_folder

    if args.max_magnitude is not None and args.save != "png":
        raise UserInputError("--max-magnitude only applies with --save png (the npy files hold the flow itself)")
    files = list_pngs(args.in_dir)
    if len(files) < 2:
        raise UserInputError(f"optical flow needs at least two frames, and {args.in_dir} has one ({files[0].name}): "
                             "there is no flow to write")
    width, height = check_frames(files, "the flow is estimated from its colours alone")
    check_folder_outputs({args.in_dir}, args.out_dir, files[1:], [output_name(p.stem, args.save) for p in files[1:]],
                         args.overwrite)
    device = pick_device(args.device)
    check_flow_file(args.flow, takes_model=False)
    with _removed_if_failed(args.out_dir) as new_folders:
        make_folder(args.out_dir.parent)
        with OutputLock(args.out_dir):
            estimator = load_raft(args.flow, device=device, corr=args.corr, downscale=args.flow_downscale,
                                  num_flow_updates=args.flow_iterations)
            progress = Progress(len(files) - 1, "flow")
            with _GracefulStop() as stop:
                try:
                    count = flow_folder(estimator, files, args.out_dir, save=args.save, overwrite=args.overwrite,
                                        progress=progress.update, max_magnitude=args.max_magnitude, should_stop=stop)
                finally:
                    progress.close()
    if _stopped_before_the_end(stop, count, len(files) - 1, args.out_dir):
        if not count:
            new_folders.remove_empty()
        return stop_status()
    log.info("wrote %d flow field%s (%s, %dx%d; one per frame from %s on) to %s", count, "" if count == 1 else "s",
             args.save, width, height, files[1].name, args.out_dir)
    return 0


def cmd_upscale(args) -> int:
    """Returns 0 when the whole video was written, 128 + the signal after a stop (130: Ctrl-C)."""
    from ..models.shared.runtime import Progress
    from ..video.outputs import OutputLock, make_folder
    from ..video.resume import check_model_family
    from ..video.stream import check_video_job, upscale_video
    from ..video.writer import check_frame_size

    check_resume_options(args)
    # Inputs, outputs and options first, then the model: a mistake is reported before any weights load.
    job = check_video_job(args.in_video, args.out_video, seed=args.seed, codec=args.codec, crf=args.crf,
                          scene_cut_threshold=args.scene_cut, resume=args.resume, overwrite=args.overwrite)
    info = job.info
    plan = plan_engine(args)
    if job.files is not None:
        check_model_family(job.files, plan.family.name, args.overwrite)
    plan.check_size(info.height, info.width)
    check_frame_size(args.codec, info.width * plan.scale, info.height * plan.scale)
    with _removed_if_failed(job.out.parent) as new_folders:
        make_folder(job.out.parent)
        with OutputLock(job.out):
            if not info.orientation.identity:
                log.info("%s is shown %s: upscaling it as shown (%dx%d)", args.in_video, info.orientation.describe(),
                         info.width, info.height)
            engine = plan.load()
            bar = Progress(None, "upscale")

            def progress(done, total):
                bar.total = total or None
                bar.update(done)

            with _GracefulStop() as stop:
                try:
                    summary = upscale_video(engine, args.in_video, args.out_video, seed=args.seed, codec=args.codec,
                                            crf=args.crf, scene_cut_threshold=args.scene_cut, resume=args.resume,
                                            checkpoint_seconds=args.checkpoint_every, progress=progress,
                                            should_stop=stop, overwrite=args.overwrite,
                                            allow_truncated=args.allow_truncated)
                except KeyboardInterrupt:
                    if job.files is not None:
                        _say_what_the_checkpoint_keeps(job.files)
                    raise
                finally:
                    bar.close()
    w, h = summary["size"]
    if stop.requested and not summary["interrupted"]:
        log.warning("the stop came after the last frame: %s was finished", args.out_video)
    if summary["interrupted"]:
        if args.resume:
            log.warning("stopped after %d frames; run the same command again to continue", summary["frames"])
        elif summary["path"]:
            log.warning("stopped: the first %d frames are in %s; %s was not written (use --resume to be able to "
                        "continue a job)", summary["frames"], summary["path"], args.out_video)
        else:
            log.warning("stopped before the first frame; %s was not written", args.out_video)
        new_folders.remove_empty()  # (those it made, where the stop left nothing in them)
        return stop_status()
    if summary["input_problem"]:
        log.warning("warning: %s; %s has the %d frames that could be decoded (--allow-truncated)",
                    summary["input_problem"], args.out_video, summary["frames"])
    log.info("wrote %s: %d frames, %dx%d, %.5g fps, %d scene cuts", args.out_video, summary["frames"], w, h,
             summary["fps"], summary["scene_cuts"])
    return 0


def _say_what_the_checkpoint_keeps(files) -> None:
    """After a stop at once (a second Ctrl-C), where the last checkpoint is the work kept."""
    try:
        info = files.read_info()
    except Exception:  # noqa: BLE001 - a note after a stop: never a second error instead of it
        return
    if info is not None:
        log.warning("stopped: the resume file keeps %d frames; run the same command again to continue",
                    info["frames"])


def _converted(path: Path) -> bool:
    """Whether ``path`` is a file that ``convert`` made (it holds a whole model)."""
    from ..models.shared.weights import made_by_convert

    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return made_by_convert(f.metadata())
    except Exception:  # noqa: BLE001 - not a safetensors file: the conversion says what it is
        return False


def cmd_convert(args) -> int:
    from ..models.registry import detect_family
    from ..models.shared.errors import UserInputError
    from ..models.shared.runtime import PRECISIONS
    from ..video.outputs import OutputLock, check_output_file, make_folder, publish, sync_file, temp_path

    family = detect_family(args.source, flow_advice="they are used as they are, with --flow; nothing to convert")
    if family.convert is None:
        raise UserInputError(f"{family.title} models cannot be converted")
    options = {"version": args.version} if args.version else {}
    if options and family.name != "flashvsr":
        raise UserInputError(f"--flashvsr-version is a FlashVSR option, but {args.source} is a {family.title} model")
    # Every check of the output before the weights are read: a converted file is read back by its suffix, and
    # neither an existing file nor a file of the source is replaced by accident.
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UserInputError(f"the converted file must end in .safetensors, got {out}")
    source = Path(args.source)
    # A model named by one of its files is read with the files next to it (FlashVSR's LQ projection, decoder,
    # prompt): none of them may be the output either. A converted file reads nothing else (another converted file
    # beside it may be replaced by its conversion to another precision).
    beside = [] if source.is_file() and _converted(source) else \
        (source.rglob("*") if source.is_dir() else source.parent.iterdir())
    sources = [source, *(p for p in beside if p.is_file())]
    check_output_file(out, sources, overwrite=args.overwrite)
    # (a model folder holding its converted file would read as two models, and be refused when named)
    home = Path(os.path.realpath(source)) if source.is_dir() else None
    there = Path(os.path.realpath(out.parent))  # (through links and "..", as the file system resolves them)
    if home is not None and home in (there, *there.parents):
        raise UserInputError(f"{out} would go inside the model folder {home}: write the converted file next to it, "
                             "not into it")
    with _removed_if_failed(out.parent):
        make_folder(out.parent)
        with OutputLock(out):
            tmp = temp_path(out)
            try:
                if args.dtype:  # else the family's own default
                    options["dtype"] = PRECISIONS[args.dtype]
                family.convert(args.source, tmp, **options)
                sync_file(tmp)  # (gigabytes, seconds on a slow drive: a Ctrl-C then leaves no converted file)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            # (where it cannot move the result into place, publish keeps it and says where: maybe this very name)
            publish(tmp, out, overwrite=args.overwrite)
    log.info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)
    return 0


def cmd_download(args) -> int:
    from ..models.raft.weights import download_raft
    from ..models.stream_diffvsr.hub import download_stream_diffvsr

    dest = args.dest or default_models_dir()
    model = download_stream_diffvsr(dest / "Stream-DiffVSR")
    raft = download_raft("raft_large", dest / "raft")
    log.info("model: %s\nflow: %s", model, raft)
    return 0
