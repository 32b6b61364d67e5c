"""The ``streamvsr`` command line: the engines without ComfyUI. Only argument parsing lives here; the work is done
by the packages (``models`` for the engines, ``video`` for files and folders).

    streamvsr upscale IN_VIDEO OUT_VIDEO --download       # the main job: a video file in, an upscaled video out
    streamvsr frames IN_DIR OUT_DIR --model PATH [--flow PATH]
    streamvsr flow IN_DIR OUT_DIR --flow PATH
    streamvsr convert MODEL OUT.safetensors --dtype fp16
    streamvsr download [--dest DIR]

``--model`` takes any family's weights (an official folder or a single converted file); the family is recognised
from the files. Mistakes are reported as one ``error: ...`` line with exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys

from .. import __version__
from . import commands
from .options import add_flow_options, add_model_options, float_range, memory_options, user_path, video_path

log = logging.getLogger("streamvsr")

# What `streamvsr --help` shows (the module docstring above is for developers).
DESCRIPTION = """\
Streaming video super-resolution (Stream-DiffVSR, FlashVSR) without ComfyUI.

  streamvsr upscale in.mp4 out.mp4 --download          Stream-DiffVSR x4, weights fetched on first use
  streamvsr upscale in.mp4 out.mp4 --model FlashVSR-v1.1
  streamvsr frames IN_DIR OUT_DIR --model PATH [--flow PATH]
  streamvsr flow IN_DIR OUT_DIR --flow PATH
  streamvsr convert MODEL OUT.safetensors --dtype fp16
  streamvsr download [--dest DIR]

--model takes an official model folder or a file written by `streamvsr convert`, of either family (recognised
from the files). `streamvsr COMMAND --help` lists a command's options; --debug shows tracebacks for errors."""

# errno values that mean the machine or file system refused, reported as one line rather than a traceback.
_ENVIRONMENT_ERRORS = {getattr(errno, name) for name in ("ENOSPC", "EROFS", "EACCES", "EPERM", "EDQUOT", "EIO",
                                                         "ENOENT", "ENOTDIR", "EISDIR", "ENAMETOOLONG", "EMFILE",
                                                         "EFBIG", "ESTALE")
                       if hasattr(errno, name)}
# What to do about the ones whose reason is not plain from the system's words.
_ENVIRONMENT_ADVICE = {getattr(errno, name): advice for name, advice in (
    ("EFBIG", "the file system's limit on one file, e.g. 4 GB on FAT32 (USB drives): write to another drive, or "
              "format it as exFAT or NTFS"),
    ("ESTALE", "a network folder went away while it was being written: write to a local drive"),
) if hasattr(errno, name)}


class Parser(argparse.ArgumentParser):
    """argparse, except that a mistake is one line, ``error: ...`` with exit status 2, like every other mistake
    (argparse prints the whole usage block first)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")

    def parse_args(self, args=None, namespace=None):
        # argparse reports a command's unknown options from the top, pointing to the help that lists none of them
        argv = sys.argv[1:] if args is None else list(args)
        parsed, extras = self.parse_known_args(argv, namespace)
        if not extras:
            return parsed
        command = getattr(parsed, "command", None)
        ours = next((a for a in extras if a.partition("=")[0] in self._option_string_actions), None)
        if ours is not None:  # (-v, --debug after the command)
            self.exit(2, f"error: {ours} goes before the command: {self.prog} {ours} {command} ...\n")
        after = command in argv and extras[0] in argv and argv.index(extras[0]) > argv.index(command)
        where = f"{self.prog} {command}" if after else self.prog
        self.exit(2, f"error: unrecognized arguments: {' '.join(extras)} (see `{where} --help`)\n")


class _OncePerRecord(logging.Filter):
    """Passes only records that no logger on their way up has printed already. huggingface_hub gives its logger a
    handler to the console of its own and still lets records propagate, so the root handler would print each
    warning twice. (A library's NullHandler or a log file prints nothing here.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        logger = logging.getLogger(record.name)
        while logger is not None and logger is not logging.root:
            if any(_prints(handler) and record.levelno >= handler.level for handler in logger.handlers):
                return False
            logger = logger.parent if logger.propagate else None
        return True


class _EndsProgressLine(logging.Filter):
    """A message starts on a line of its own, not at the end of an unfinished progress line."""

    def filter(self, record: logging.LogRecord) -> bool:
        from ..models.shared.runtime import Progress

        Progress.end_line()
        return True


def _prints(handler: logging.Handler) -> bool:
    return (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            and getattr(handler, "stream", None) in (sys.stderr, sys.stdout))


def setup_logging(verbose: bool = False) -> None:
    """Messages as plain lines on stderr, each once. Only the handler made here is filtered: one a host program
    (or pytest) put on the root logger is left as it is."""
    root = logging.getLogger()
    before = list(root.handlers)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    for handler in root.handlers:
        if handler not in before:
            handler.addFilter(_OncePerRecord())
            handler.addFilter(_EndsProgressLine())  # (after it: only for what is printed)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="streamvsr", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action="version", version=f"streamvsr {__version__}",
                        help="print the version (for a bug report) and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("frames", help="upscale a folder of PNG frames (one sequence)")
    p.add_argument("in_dir", type=user_path,
                   help="folder of PNG frames, in name order, numbers by value (f2 before f10)")
    p.add_argument("out_dir", type=user_path, help="folder for the upscaled frames (same names)")
    add_model_options(p, dtype_default="fp32", model_required=True)
    p.add_argument("--save", choices=("png", "png16", "npy"), default="png",
                   help="png: 8-bit (the default); png16: 16-bit; npy: float32 HxWx3 in [0,1]")
    p.add_argument("--overwrite", action="store_true",
                   help="replace outputs already in OUT_DIR, or discard an unfinished --resume job of OUT_DIR")
    commands.add_resume_options(p, "keep a checkpoint (OUT_DIR.streamvsr-resume.safetensors next to OUT_DIR)")
    p.set_defaults(func=commands.cmd_frames)

    p = sub.add_parser("flow", help="optical flow of consecutive PNG frames (backward-warps frame i-1 onto i)")
    p.add_argument("in_dir", type=user_path,
                   help="folder of PNG frames, in name order, numbers by value (f2 before f10)")
    p.add_argument("out_dir", type=user_path, help="folder for the flow of each frame after the first")
    p.add_argument("--flow", required=True, help="RAFT weights in torchvision's format")
    p.add_argument("--save", choices=("npy", "png"), default="npy",
                   help="npy: float32 HxWx2 (x, y) in pixels (the default); png: colour-wheel visualisation")
    p.add_argument("--max-magnitude", type=float_range(0, low_open=True), default=None, metavar="PIXELS",
                   help="with --save png: the speed drawn fully saturated in every picture, so that colours compare "
                        "across frames (faster is darkened); default: each picture's own largest speed")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (the default: CUDA, then MPS, "
                   "then the CPU)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs already in OUT_DIR")
    add_flow_options(p)
    p.set_defaults(func=commands.cmd_flow)

    p = sub.add_parser("upscale", help="upscale a video file, streaming it through the model")
    p.add_argument("in_video", type=video_path("in"),
                   help="input video file on this machine, in any format FFmpeg reads (not a URL)")
    p.add_argument("out_video", type=video_path("out"),
                   help="output file: .mp4/.mkv/.mov (h264) or .mkv (lossless)")
    add_model_options(p, dtype_default="auto", model_required=False)
    commands.add_video_options(p)
    p.set_defaults(func=commands.cmd_upscale)

    p = sub.add_parser("convert", help="pack an official model folder into one .safetensors file")
    p.add_argument("source", type=user_path, help="official model folder (or a converted file, to change its dtype)")
    p.add_argument("out", type=user_path, help="the .safetensors file to write")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"),
                   help="precision of the weights written (default: fp16 for Stream-DiffVSR; for FlashVSR each "
                        "file's own, fp32 DiT and bf16 LQ projection, so that nothing is lost)")
    p.add_argument("--flashvsr-version", dest="version", choices=("v1.1", "v1"),
                   help="FlashVSR only: which release the folder holds, stored in the file (default: what the "
                        "files say: a repackaged DiT's name, the published v1.1 LQ file's hash, a folder named for "
                        "v1.1 or v1 (FlashVSR counts as v1); where they say nothing, this option is needed)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it exists (only once the new file is complete; never the source)")
    p.set_defaults(func=commands.cmd_convert)

    p = sub.add_parser("download", help="download the official Stream-DiffVSR and RAFT-large weights")
    p.add_argument("--dest", type=user_path,
                   help="folder (default: $STREAMVSR_MODELS, or ~/.cache/streamvsr where that is unset or empty; "
                        "`upscale --download` looks only there: for another folder set STREAMVSR_MODELS to it, or "
                        "give --model and --flow)")
    p.set_defaults(func=commands.cmd_download)
    return parser


def _open_standard_streams() -> None:
    """A standard stream closed by whoever started the command (``2>&-``) is opened on the null device: else the
    next file opened, an output among them, would take its number, and whatever a library writes to "stderr" would
    go into that file."""
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # (the lowest free number: this one)
            if getattr(sys, name) is None:  # (Python found it closed: writers such as progress bars would fail)
                setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # (Ctrl-C while torch loads, before the command's own handling: nothing was done)
        log.error("interrupted")  # (before logging is set up, Python's last-resort handler prints it on stderr)
        return 130


def _main(argv) -> int:
    from ..models.shared.errors import StreamVSRError, first_line
    from ..models.shared.runtime import is_out_of_memory, keep_freed_memory

    keep_freed_memory()  # for the tensors to come
    _open_standard_streams()

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        with commands.stop_signals():
            return int(args.func(args) or 0)
    except StreamVSRError as e:
        if args.debug:
            raise
        log.error("error: %s", e)
        return 2
    except KeyboardInterrupt:
        status = commands.stop_status()
        log.error("interrupted" if status == 130 else f"stopped by {signal.Signals(status - 128).name}")
        return status
    except (MemoryError, RuntimeError) as e:  # (torch's OutOfMemoryError is a RuntimeError)
        if args.debug or not is_out_of_memory(e):
            raise
        log.error("error: out of memory (%s). %s", first_line(e), _memory_advice(args))
        return 2
    except OSError as e:
        # A full disk, a read-only or vanished folder: the machine's state, not a bug in this program.
        if args.debug or e.errno not in _ENVIRONMENT_ERRORS:
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        advice = f": {_ENVIRONMENT_ADVICE[e.errno]}" if e.errno in _ENVIRONMENT_ADVICE else ""
        log.error("error: %s%s%s", e.strerror or e, where, advice)
        return 2


# Memory options that leave a job's numbers as they are (the engines' identity() leaves them out)
_SAME_NUMBERS = ("--plain-layers", "--corr ")


def _memory_advice(args) -> str:
    """What to change after running out of memory, in the options of the command that ran."""
    if args.command not in ("frames", "upscale", "flow"):  # (convert holds a whole model while it writes it)
        return "Close other programs and run it again"
    # (only frames and upscale have --dtype: bf16 halves what fp32 takes on the CPU; auto is half precision on a
    # GPU already)
    dtype = getattr(args, "dtype", None)
    if _ran_on_cpu(args):  # (no GPU advice; the CPU's own savings)
        steps = memory_options(args, cpu=True) + (["--dtype bf16"] if dtype in ("auto", "fp32") else [])
        steps.append("smaller frames")
    else:
        steps = [*(["--dtype fp16 or bf16"] if dtype == "fp32" else []), *memory_options(args), "smaller frames",
                 "--device cpu as a last resort"]
    kept = "the flow fields as files" if args.command == "flow" else \
        "frames as files, a video as its partial file or --resume checkpoint"
    if getattr(args, "resume", False):
        # (a checkpoint continues only with the settings it was made with: each other change starts the job over)
        same = [s for s in steps if s.startswith(_SAME_NUMBERS)]
        # (the device is not a setting of the job, its precision is: auto picks another one on the CPU)
        last = [s for s in steps if s.startswith("--device cpu") and dtype != "auto"]
        other = [s for s in steps if s not in same + last]
        advice = [f"{'; '.join(same)} (--resume continues the job with these)"] if same else []
        if other:
            advice.append(f"{'then ' if same else ''}{'; '.join(other)} (with these the --resume job starts over, "
                          "--overwrite: its checkpoint holds the settings it was made with)")
        advice += [f"{s}, which continues the job" for s in last]
        return f"Try, in this order: {'; '.join(advice)}. What was finished is kept ({kept})"
    return f"Try, in this order: {'; '.join(steps)}. What was finished is kept ({kept})"


def _ran_on_cpu(args) -> bool:
    from ..models.shared.runtime import pick_device

    try:
        return pick_device(getattr(args, "device", None) or "auto").type == "cpu"
    except Exception:  # noqa: BLE001 - advice after an error: never a second error instead of it
        return False


if __name__ == "__main__":
    sys.exit(main())
