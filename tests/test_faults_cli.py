"""Fault injection for the command line (issue #13): every user mistake is one ``error: ...`` line with exit
status 2 and no traceback, found before the model loads wherever it can be; faults found mid-run keep what was
done and say where; ``frames`` and ``flow`` say what they wrote.

The model is a fake family (FakeEngine of test_video.py behind ``registry.detect_family``) that records whether it
was looked at or loaded, so no weights are needed and "not loaded" is observable.
"""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import streamvsr.models.registry as registry
from streamvsr.cli import main
from streamvsr.models.contract import Family
from streamvsr.video.outputs import lock_path, partial_path
from streamvsr.video.resume import ResumeFiles
from test_faults_video import HOLDER, ROOT, StopsAt, cut, noise_clip, png_folder
from test_video import FakeEngine, decode, make_clip

av = pytest.importorskip("av")


@pytest.fixture
def model(tmp_path, monkeypatch):
    """A fake model family: ``detects`` and ``loads`` record every look at and every load of the model."""
    record = SimpleNamespace(detects=[], loads=[], path=tmp_path / "model", make=FakeEngine)
    record.path.mkdir()

    def load_engine(path, device=None, dtype=None, **options):
        record.loads.append(path)
        return record.make()

    family = Family(name="fake", title="Fake", scale=4, frame_rule="one per frame", size_multiple=1,
                    dtypes=(torch.float32,), detect=lambda p: True, load_engine=load_engine)

    def detect_family(path):
        record.detects.append(path)
        return family

    monkeypatch.setattr(registry, "detect_family", detect_family)
    return record


@pytest.fixture
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    make_clip(root / "in.mp4", n=4, audio=None)
    make_clip(root / "wide.mkv", n=1, w=4100, h=8, audio=None, vcodec="ffv1")
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("not a video\n" * 40)
    a = av.open(str(root / "audio.m4a"), "w")
    s = a.add_stream("aac", rate=16000)
    s.layout = "mono"
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
    frame.sample_rate, frame.pts = 16000, 0
    for p in list(s.encode(frame)) + list(s.encode()):
        a.mux(p)
    a.close()
    noise_clip(root / "full.mp4", n=6, fmt_options={"movflags": "faststart"})
    cut(root / "full.mp4", 0.75, root / "cut.mp4")
    cut(root / "full.mp4", 0.3, root / "head.mp4")
    (root / "file").write_text("a file where a folder is needed")
    png_folder(root / "frames", n=3)
    png_folder(root / "one", n=1)
    png_folder(root / "sizes", n=2)
    Image.new("RGB", (10, 10)).save(root / "sizes" / "f005.png")
    png_folder(root / "notimage", n=3)
    (root / "notimage" / "f001.png").write_text("<html>not a png</html>")
    (root / "nopng").mkdir()
    (root / "raft.pth").write_bytes(b"weights")
    os.mkfifo(root / "pipe")  # (as `<(cat in.mp4)` or a named pipe gives one)
    return root


def one_line_error(caplog, code, fragment):
    """Exit 2, exactly one log record, an ``error: ...`` line without a traceback, containing ``fragment``."""
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    text = "\n".join(r.getMessage() for r in errors)
    assert code == 2, text
    assert len(errors) == 1 and "\n" not in text and text.startswith("error: "), text
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)
    assert fragment in text, text


# (arguments, fragment of the message); {m} is the media folder, {t} the test's folder, {model} the fake model
EARLY_MISTAKES = [
    ("upscale {m}/missing.mp4 {t}/o.mp4", "does not exist"),
    ("upscale {m} {t}/o.mp4", "is a folder, not a video file"),
    ("upscale {m}/empty.mp4 {t}/o.mp4", "is empty (0 bytes)"),
    ("upscale {m}/pipe {t}/o.mp4", "is a pipe or device, not a file: a video is read more than once"),
    ("upscale - {t}/o.mp4", "- (standard input) cannot be an input: a video is read more than once"),
    ("upscale {m}/text.mp4 {t}/o.mp4", "cannot be read as a video"),
    ("upscale {m}/audio.m4a {t}/o.mp4", "has no video stream (it holds 1 audio stream)"),
    ("upscale {m}/head.mp4 {t}/o.mp4", "first frame cannot be decoded"),
    ("upscale {m}/in.mp4 {m}/file/sub/o.mp4", "is a file, not a folder"),
    ("upscale {m}/in.mp4 {t}/o.avi", "needs a .mp4 or .mkv or .mov output file"),
    ("upscale {m}/in.mp4 {m}", "is a folder; give a file name"),
    ("upscale {m}/in.mp4 {t}/o.mkv --codec lossless --crf 10", "has no such setting"),
    ("upscale {m}/in.mp4 {t}/" + "a" * 236 + ".mp4", "is too long: 240 bytes, and the work files next to it add 21"),
    ("upscale {m}/in.mp4 {t}/" + "a" * 226 + ".mp4 --resume", "230 bytes, and the work files next to it add 33 to "
                                                              "it, where the file system takes 255; shorten it to at "
                                                              "most 222 bytes"),
    ("upscale {m}/in.mp4 {m}/in.mp4 --overwrite", "is the input"),
    ("upscale {m}/in.mp4 {t}/o.mp4 --checkpoint-every 5", "only applies with --resume"),
    ("upscale {m}/in.mp4 {t}/o.mp4 --device gpu0", "unknown device 'gpu0'"),
    ("upscale {m}/in.mp4 {t}/o.mp4 --flow {m}/missing.pth", "do not exist"),
    ("upscale {m}/in.mp4 {t}/o.mp4", "give --model PATH, or --download to fetch"),
    ("frames {m}/missing {t}/out", "does not exist"),
    ("frames {m}/file {t}/out", "is not a folder"),
    ("frames {m}/nopng {t}/out", "no .png files"),
    ("frames {m}/notimage {t}/out", "f001.png is not a readable image"),
    ("frames {m}/sizes {t}/out", "must have one size"),
    ("frames {m}/frames {m}/frames", "is the input folder"),
    ("frames {m}/frames {m}/file/out", "is a file"),
    ("flow {m}/one {t}/out --flow {m}/raft.pth", "at least two frames"),
    ("flow {m}/frames {m}/frames --flow {m}/raft.pth", "is the input folder"),
    ("flow {m}/frames {t}/out --flow {m}/missing.pth", "do not exist"),
    ("flow {m}/frames {t}/out --flow {m}/frames", "are a folder; give torchvision's RAFT file"),
    ("flow {m}/frames {t}/out --flow {m}/raft.pth --device gpu0", "unknown device"),
]


@pytest.mark.parametrize("args,fragment", EARLY_MISTAKES, ids=[a for a, _ in EARLY_MISTAKES])
def test_early_mistakes_are_one_line_and_the_model_is_never_touched(args, fragment, media, model, tmp_path, caplog):
    argv = args.format(m=media, t=tmp_path).split()
    if argv[0] in ("upscale", "frames") and "give --model" not in fragment:
        argv += ["--model", str(model.path)]
    code = main(argv)
    one_line_error(caplog, code, fragment)
    assert model.loads == [] and model.detects == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing written


def test_a_missing_model_names_only_the_options_of_the_command(media, tmp_path, caplog):
    """frames has no --download (only upscale fetches the weights itself); its --model, which it requires, given
    empty."""
    code = main(["frames", str(media / "frames"), str(tmp_path / "out"), "--model", ""])
    one_line_error(caplog, code, "give --model PATH")
    assert "--download" not in caplog.text


def test_frames_too_wide_for_h264_are_found_before_the_model_loads(media, model, tmp_path, caplog):
    """x264 takes at most 16384 pixels a side (known once the model's scale is): a raw FFmpeg error came after the
    model loaded and upscaled the first frame."""
    code = main(["upscale", str(media / "wide.mkv"), str(tmp_path / "o.mp4"), "--model", str(model.path)])
    one_line_error(caplog, code, "h264 cannot encode the 16400x32 output frames (libx264 takes at most 16384 pixels "
                                 "a side): choose the lossless codec")
    assert model.loads == [] and not (tmp_path / "o.mp4").exists()


def test_cuda_without_a_gpu_is_found_before_the_model(media, model, tmp_path, caplog):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code = main(["upscale", str(media / "in.mp4"), str(tmp_path / "o.mp4"), "--model", str(model.path),
                 "--device", "cuda"])
    one_line_error(caplog, code, "no usable CUDA GPU")
    assert model.loads == [] and model.detects == []


@pytest.mark.parametrize("args,fragment", [
    ("upscale IN OUT --crf -5", "argument --crf: -5 is outside x264's range"),
    ("upscale IN OUT --seed 18446744073709551616", "2^64-1"),
    ("upscale IN OUT --seed -1", "2^64-1"),
    ("upscale IN OUT --scene-cut 2", "out of range"),
    ("upscale IN OUT --checkpoint-every 0", "out of range"),
    ("frames IN OUT --model M --steps 0", "out of range"),
    ("frames IN OUT --model M --kv-ratio nan", "out of range"),
    ("frames IN OUT --model M --scale 9", "out of range"),
    ("upscale IN OUT --codec h265", "invalid choice"),
    ("upscale http://example.invalid/a.mp4 OUT", "http://example.invalid/a.mp4 is a URL; give a local video file"),
    ("upscale IN rtmp://example.invalid/live", "rtmp://example.invalid/live is a URL; give a local file to write"),
])
def test_bad_option_values_are_one_line(args, fragment, capsys, model):
    with pytest.raises(SystemExit) as e:
        main(args.split())
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err
    assert model.loads == []


@pytest.mark.parametrize("command", ["upscale", "frames"])
def test_a_model_that_fails_to_load_leaves_no_new_folders(command, media, model, tmp_path, caplog):
    from streamvsr.models.shared.errors import WeightsError

    def broken():
        raise WeightsError("the weights are damaged")

    model.make = broken
    source, name = (media / "in.mp4", "o.mp4") if command == "upscale" else (media / "frames", "out")
    code = main([command, str(source), str(tmp_path / "new" / "sub" / name), "--model", str(model.path)])
    one_line_error(caplog, code, "the weights are damaged")
    assert model.loads, "the load was not reached"
    assert not (tmp_path / "new").exists()
    # a folder that was there before the run stays, even when empty
    (tmp_path / "kept").mkdir()
    caplog.clear()
    assert main([command, str(source), str(tmp_path / "kept" / name), "--model", str(model.path)]) == 2
    assert (tmp_path / "kept").is_dir() and list((tmp_path / "kept").iterdir()) == []


def test_the_command_line_prints_a_library_warning_once():
    """huggingface_hub's logger has a handler of its own and propagates to the root handler as well: offline
    ``--download`` printed every retry warning twice. A library's NullHandler prints nothing: its warnings must
    still show."""
    code = ("import sys, logging; sys.path.insert(0, sys.argv[1]); import conftest; from streamvsr.cli import "
            "commands, main; from huggingface_hub.utils import logging as hub_logging\n"
            "def download(args):\n"
            "    hub_logging.get_logger('huggingface_hub.utils._http').warning('retrying in 1s')\n"
            "    logging.getLogger('urllib3').addHandler(logging.NullHandler())  # as libraries are told to\n"
            "    logging.getLogger('urllib3.connectionpool').warning('connection pool is full')\n"
            "    logging.getLogger('streamvsr').info('finished')\n"
            "commands.cmd_download = download\n"
            "sys.exit(main(['download']))")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT / "tests")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("retrying in 1s") == 1 and result.stderr.count("finished") == 1, result.stderr
    assert result.stderr.count("connection pool is full") == 1, result.stderr  # a NullHandler prints nothing


def test_mistakes_found_with_the_model_are_one_line(media, model, tmp_path, caplog):
    # an option the model does not take: the model was recognised (cheaply), but not loaded, nothing written
    code = main(["upscale", str(media / "in.mp4"), str(tmp_path / "o.mp4"), "--model", str(model.path),
                 "--sparse-ratio", "1.5"])
    one_line_error(caplog, code, "--sparse-ratio is a FlashVSR option")
    assert model.loads == [] and not (tmp_path / "o.mp4").exists()


def test_existing_output_needs_overwrite_and_survives_a_failed_run(media, model, tmp_path, caplog):
    out = tmp_path / "o.mp4"
    out.write_bytes(b"keep me")
    code = main(["upscale", str(media / "in.mp4"), str(out), "--model", str(model.path)])
    one_line_error(caplog, code, "add --overwrite")
    assert model.loads == [] and out.read_bytes() == b"keep me"
    caplog.clear()
    model.make = lambda: FakeEngine(fail_at=2)
    with pytest.raises(RuntimeError, match="engine failure"):  # a bug in an engine keeps its traceback
        main(["upscale", str(media / "in.mp4"), str(out), "--model", str(model.path), "--overwrite"])
    assert out.read_bytes() == b"keep me" and len(decode(partial_path(out))) == 2


def test_cut_input_exits_2_with_frames_and_place(media, model, tmp_path, caplog):
    out = tmp_path / "o.mp4"
    for extra in ([], ["--resume"]):
        caplog.clear()
        code = main(["upscale", str(media / "cut.mp4"), str(out), "--model", str(model.path)] + extra)
        one_line_error(caplog, code, "ends early: it is cut off inside frame 4")
        assert "were upscaled into" in caplog.text and not out.exists()
        assert len(decode(partial_path(out))) > 0
        # with --resume the finished job stays, for accepting the input without upscaling it all again
        assert ResumeFiles(out).state.exists() == bool(extra)
    caplog.clear()
    assert main(["upscale", str(media / "cut.mp4"), str(out), "--model", str(model.path), "--allow-truncated"]) == 2
    assert "has an unfinished resumable job" in caplog.text  # not discarded unasked
    caplog.clear()
    assert main(["upscale", str(media / "cut.mp4"), str(out), "--model", str(model.path), "--allow-truncated",
                 "--resume"]) == 0
    assert "warning:" in caplog.text and 0 < len(decode(out)) < 6 and not ResumeFiles(out).state.exists()


def test_damaged_resume_file_and_other_settings_are_one_line_before_the_model(media, model, tmp_path, caplog):
    out = tmp_path / "o.mkv"
    files = ResumeFiles(out)
    # a checkpoint from the same job with another seed
    from streamvsr.video.stream import upscale_video

    polls = []
    upscale_video(FakeEngine(), media / "in.mp4", out, codec="lossless", seed=5, resume=True, checkpoint_frames=1,
                  should_stop=lambda: polls.append(1) or len(polls) > 2)
    assert files.state.exists()
    code = main(["upscale", str(media / "in.mp4"), str(out), "--model", str(model.path), "--codec", "lossless",
                 "--resume"])
    one_line_error(caplog, code, "seed 5 then, 42 now")
    caplog.clear()
    code = main(["upscale", str(media / "in.mp4"), str(out), "--model", str(model.path), "--codec", "lossless"])
    one_line_error(caplog, code, "add --resume to continue it")
    caplog.clear()
    files.state.write_bytes(b"\x00" * 20)
    code = main(["upscale", str(media / "in.mp4"), str(out), "--model", str(model.path), "--codec", "lossless",
                 "--resume", "--seed", "5"])
    one_line_error(caplog, code, "is damaged")
    assert model.loads == [] and model.detects == []


@pytest.mark.parametrize("command", ["upscale", "frames"])
def test_a_job_of_another_model_family_is_refused_before_the_model_loads(command, media, model, tmp_path, caplog):
    """Its family is in the checkpoint: the other model (FlashVSR's DiT is gigabytes) loaded first, to be told that
    the job is not its. With --overwrite the job is discarded and started over."""
    from streamvsr.video.frames import folder_checkpoint, upscale_folder
    from streamvsr.video.stream import upscale_video

    class Flash(StopsAt):
        def identity(self):
            return "flashvsr|v1.1|torch.float32|scale=4|sparse=2.0"

    source, out = media / "in.mp4", tmp_path / "o.mkv"
    if command == "frames":
        source, out = png_folder(tmp_path / "in", n=4), tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        if command == "frames":
            upscale_folder(Flash(2), source, out, resume=True, checkpoint_frames=1)
        else:
            upscale_video(Flash(2), source, out, codec="lossless", resume=True, checkpoint_frames=1)
    files = folder_checkpoint(out) if command == "frames" else ResumeFiles(out)
    assert files.state.exists()
    caplog.clear()
    argv = [command, str(source if command == "upscale" else tmp_path / "in"), str(out), "--model", str(model.path),
            "--resume"] + (["--codec", "lossless"] if command == "upscale" else [])
    code = main(argv)
    one_line_error(caplog, code, f"{files.state} belongs to a job with other settings (another model: flashvsr then, "
                                 "fake now); run with the same settings to continue it, or add --overwrite")
    assert model.loads == [] and files.state.exists()
    caplog.clear()
    assert main(argv + ["--overwrite"]) == 0 and len(model.loads) == 1
    assert not files.state.exists()


def test_second_run_is_refused_at_once_before_loading(media, model, tmp_path, caplog):
    out = tmp_path / "o.mp4"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(ROOT), str(out)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        code = main(["upscale", str(media / "in.mp4"), str(out), "--model", str(model.path), "--resume"])
        one_line_error(caplog, code, "is being written by another streamvsr run")
        assert model.loads == [] and not out.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model", lock_path(out).name]
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    caplog.clear()
    assert main(["upscale", str(media / "in.mp4"), str(out), "--model", str(model.path)]) == 0  # lock released
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "o.mp4"]


def test_frame_size_change_in_a_folder_mid_run(media, model, tmp_path, caplog, monkeypatch):
    """A frame that changes between the check and its turn (or any mid-run read failure): one line, and the frames
    before it written."""
    folder = tmp_path / "in"
    files = png_folder(folder, n=3)
    import streamvsr.video.frames as frames

    real = frames.read_frame

    def read(path):
        if Path(path).name == "f002.png":
            Image.new("RGB", (6, 6)).save(path)
        return real(path)

    monkeypatch.setattr(frames, "read_frame", read)
    code = main(["frames", str(folder), str(tmp_path / "out"), "--model", str(model.path)])
    one_line_error(caplog, code, "2 of 3 frames were written")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f000.png", "f001.png"]
    assert files


def test_frames_and_flow_print_a_summary(media, model, tmp_path, caplog, monkeypatch):
    import streamvsr.models.raft.weights as weights

    caplog.set_level(logging.INFO)
    assert main(["frames", str(media / "frames"), str(tmp_path / "up"), "--model", str(model.path)]) == 0
    assert "wrote 3 frames (png, 48x32) to" in caplog.text
    monkeypatch.setattr(weights, "load_raft", lambda *a, **k: lambda a, b: torch.zeros(1, 2, *a.shape[-2:]))
    caplog.clear()
    assert main(["flow", str(media / "frames"), str(tmp_path / "flow"), "--flow", str(media / "raft.pth")]) == 0
    assert "wrote 2 flow fields (npy, 12x8; one per frame from f001.png on) to" in caplog.text
    assert sorted(p.name for p in (tmp_path / "flow").iterdir()) == ["f001.npy", "f002.npy"]
    caplog.clear()
    code = main(["flow", str(media / "frames"), str(tmp_path / "flow"), "--flow", str(media / "raft.pth")])
    one_line_error(caplog, code, "add --overwrite")


def test_debug_shows_the_traceback(media, tmp_path):
    from streamvsr.models.shared.errors import UserInputError

    with pytest.raises(UserInputError, match="does not exist"):
        main(["--debug", "upscale", str(media / "missing.mp4"), str(tmp_path / "o.mp4"), "--model", "x"])


@pytest.mark.parametrize("args,fragment", [
    ("upscale {m}/text.mp4 {t}/o.mp4 --model {t}", "cannot be read as a video"),
    ("upscale {m}/in.mp4 {t}/o.mp4 --crf -5", "outside x264's range"),
    ("frames {m}/frames {m}/frames --model {t}", "is the input folder"),
    ("flow {m}/one {t}/out --flow {m}/raft.pth", "at least two frames"),
])
def test_real_process_prints_one_line_on_stderr(args, fragment, media, tmp_path):
    """The whole program as a user runs it: stderr is exactly one line, exit status 2."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import conftest; from streamvsr.cli import main; "
            "sys.exit(main(sys.argv[2:]))")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT / "tests")]
                            + args.format(m=media, t=tmp_path).split(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert fragment in result.stderr and "Traceback" not in result.stderr


def test_a_file_too_large_for_the_file_system_is_one_line_with_what_to_do(media, model, tmp_path, caplog,
                                                                          monkeypatch):
    import errno

    from streamvsr.video.writer import VideoWriter

    real_write, writes = VideoWriter.write, []

    def write(self, *args):  # what FFmpeg reports when a FAT32 drive's 4 GB per file runs out
        writes.append(1)
        if len(writes) == 2:
            raise OSError(errno.EFBIG, "File too large")
        return real_write(self, *args)

    monkeypatch.setattr(VideoWriter, "write", write)
    code = main(["upscale", str(media / "in.mp4"), str(tmp_path / "o.mp4"), "--model", str(model.path)])
    assert code == 2 and "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    *before, error = said
    assert any("the frame written before this error is in" in m for m in before), said  # kept, and said where
    assert error.startswith("error: File too large: the file system's limit on one file, e.g. 4 GB on FAT32")


@pytest.mark.parametrize("resume", [False, True])
def test_a_failed_writer_is_waited_for_before_its_file_is_judged(media, model, tmp_path, caplog, monkeypatch,
                                                                 resume):
    """A writer that fails closes its own file as it ends; the run looked at that file while it was still being
    closed (a race CI lost): it found no frame in it, removed it and said nothing was kept."""
    import errno
    import time

    from streamvsr.video.writer import VideoWriter

    real_write, real_close, writes = VideoWriter.write, VideoWriter.close, []

    def write(self, *args):
        writes.append(1)
        if len(writes) == 3:
            raise OSError(errno.EFBIG, "File too large")
        return real_write(self, *args)

    def close(self, *args, **kwargs):  # a slow disk: the close of the failed file takes a while
        time.sleep(0.5)
        return real_close(self, *args, **kwargs)

    monkeypatch.setattr(VideoWriter, "write", write)
    monkeypatch.setattr(VideoWriter, "close", close)
    out = tmp_path / "o.mp4"
    code = main(["upscale", str(media / "in.mp4"), str(out), "--model", str(model.path)]
                + ["--resume"] * resume)
    assert code == 2
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("could not" in m for m in said), said
    if resume:  # the segment closed and the checkpoint it belongs to stay usable: resuming finishes the job
        monkeypatch.setattr(VideoWriter, "write", real_write)
        assert main(["upscale", str(media / "in.mp4"), str(out), "--model", str(model.path), "--resume"]) == 0
        assert len(decode(out)) == 4
    else:
        assert any("the 2 frames written before this error are in" in m for m in said), said
        assert len(decode(partial_path(out))) == 2


@pytest.mark.parametrize("resume", [False, True])
def test_frames_stopped_by_a_full_disk_say_where_and_what_was_kept(media, model, tmp_path, caplog, monkeypatch,
                                                                   resume):
    """The error was "No space left on device" alone: no file, no word of the frames written or of continuing."""
    import errno

    from PIL import Image

    real_save, saves = Image.Image.save, []

    def save(self, fp, *args, **kwargs):  # PIL's own failure names no file
        saves.append(fp)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "out"
    code = main(["frames", str(media / "frames"), str(out), "--model", str(model.path)]
                + (["--resume"] if resume else []))
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    again = "; run the same command again to continue" if resume else ""
    assert code == 2 and said == [f"1 of 3 frames were written to {out} before this error, each complete{again}",
                                  f"error: No space left on device ({out / 'f001.png'})"], said
    assert sorted(p.name for p in out.iterdir()) == ["f000.png"]


def test_flow_stopped_by_a_full_disk_says_what_was_kept(media, tmp_path, caplog, monkeypatch):
    """As frames does: the error alone said nothing of the flow fields written before it."""
    import errno

    import streamvsr.models.raft.weights as weights

    monkeypatch.setattr(weights, "load_raft", lambda *a, **k: lambda a, b: torch.zeros(1, 2, *a.shape[-2:]))
    real_save, saves = np.save, []

    def save(file, *args, **kwargs):
        saves.append(file)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_save(file, *args, **kwargs)

    monkeypatch.setattr(np, "save", save)
    out = tmp_path / "flow"
    code = main(["flow", str(media / "frames"), str(out), "--flow", str(media / "raft.pth")])
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert code == 2 and said[0] == f"1 of 2 flow fields were written to {out} before this error, each complete", said
    assert said[1].startswith("error: No space left on device") and len(said) == 2, said
    assert sorted(p.name for p in out.iterdir()) == ["f001.npy"]


class CtrlC(FakeEngine):
    """A first Ctrl-C (SIGINT) while the engine steps frame ``at`` (``StopsAt``: a second one, mid-frame)."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def step(self, frame, state):
        if state.frame_index == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().step(frame, state)


def test_a_stop_says_what_it_kept_also_at_once_and_after_the_last_frame(media, model, tmp_path, caplog,
                                                                        heeded_signals):
    """A second Ctrl-C with --resume said only "interrupted", not that the job continues; one without it called the
    stop an error; a Ctrl-C once the last frame was done announced a stop, then finished with exit 0 unexplained."""
    out = tmp_path / "o.mkv"
    model.make = lambda: StopsAt(2)  # (a second Ctrl-C mid-frame)
    args = ["upscale", str(media / "in.mp4"), str(out), "--model", str(model.path), "--codec", "lossless"]
    assert main(args + ["--resume", "--checkpoint-every", "1e-9"]) == 130
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert said == ["stopped: the resume file keeps 2 frames; run the same command again to continue",
                    "interrupted"], said
    caplog.clear()
    assert main(args + ["--overwrite"]) == 130
    assert f"the 2 frames written before this stop are in {partial_path(out)}" in caplog.text
    caplog.clear()
    model.make = lambda: CtrlC(3)  # (the last of the 4 frames)
    assert main(args + ["--overwrite"]) == 0 and len(decode(out)) == 4
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert said == ["\nstopping after this frame (Ctrl-C again to abort at once)",
                    f"the stop came after the last frame: {out} was finished"], said


def test_a_first_ctrl_c_of_frames_and_flow_finishes_the_frame_in_progress(media, model, tmp_path, caplog,
                                                                         monkeypatch, heeded_signals):
    """As `upscale` does: the frames and flow commands stopped at once on the first Ctrl-C, losing the frame in
    progress."""
    import streamvsr.models.raft.weights as weights

    def warnings():
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        caplog.clear()
        return said

    stopping = "\nstopping after this frame (Ctrl-C again to abort at once)"
    out = tmp_path / "up"
    model.make = lambda: CtrlC(1)
    assert main(["frames", str(media / "frames"), str(out), "--model", str(model.path)]) == 130
    assert warnings() == [stopping, f"stopped: 2 of 3 frames were written to {out}, each complete"]
    assert sorted(p.name for p in out.iterdir()) == ["f000.png", "f001.png"]
    model.make = lambda: CtrlC(2)  # (the last frame: the job finishes)
    assert main(["frames", str(media / "frames"), str(tmp_path / "all"), "--model", str(model.path)]) == 0
    assert warnings() == [stopping, f"the stop came after the last frame: {tmp_path / 'all'} was finished"]
    assert len(list((tmp_path / "all").iterdir())) == 3

    def estimator(a, b):
        os.kill(os.getpid(), signal.SIGINT)
        return torch.zeros(1, 2, *a.shape[-2:])

    monkeypatch.setattr(weights, "load_raft", lambda *a, **k: estimator)
    flow = tmp_path / "flow"
    assert main(["flow", str(media / "frames"), str(flow), "--flow", str(media / "raft.pth")]) == 130
    assert warnings() == [stopping, f"stopped: 1 of 2 flow fields were written to {flow}, each complete"]
    assert sorted(p.name for p in flow.iterdir()) == ["f001.npy"]


def test_a_first_ctrl_c_before_the_first_output_leaves_no_new_folder(media, model, tmp_path, caplog, monkeypatch,
                                                                    heeded_signals):
    """A run stopped at once before its first output removed the folders it had made; one stopped at its own
    request (a first Ctrl-C) left them, empty. With --resume a checkpoint beside the folder keeps it."""
    import streamvsr.models.raft.weights as weights
    import streamvsr.video.frames as frames_module

    class CtrlCAtTheStart(FakeEngine):
        def new_state(self, seed):
            os.kill(os.getpid(), signal.SIGINT)
            return super().new_state(seed)

    model.make = CtrlCAtTheStart
    out = tmp_path / "new" / "up"
    assert main(["frames", str(media / "frames"), str(out), "--model", str(model.path)]) == 130
    assert "stopped: no frame was written" in caplog.text and not (tmp_path / "new").exists()
    video = tmp_path / "new" / "o.mkv"
    args = ["upscale", str(media / "in.mp4"), str(video), "--model", str(model.path), "--codec", "lossless"]
    assert main(args) == 130
    assert "stopped before the first frame" in caplog.text and not (tmp_path / "new").exists()
    assert main(args + ["--resume"]) == 130
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [ResumeFiles(video).state.name]

    read = frames_module.read_frame

    def ctrl_c_while_the_first_is_read(path):
        monkeypatch.setattr(frames_module, "read_frame", read)
        os.kill(os.getpid(), signal.SIGINT)
        return read(path)

    monkeypatch.setattr(frames_module, "read_frame", ctrl_c_while_the_first_is_read)
    monkeypatch.setattr(weights, "load_raft", lambda *a, **k: lambda a, b: torch.zeros(1, 2, *a.shape[-2:]))
    flow = tmp_path / "new2" / "flow"
    assert main(["flow", str(media / "frames"), str(flow), "--flow", str(media / "raft.pth")]) == 130
    assert "stopped: 0 of 2 flow fields were written" in caplog.text and not (tmp_path / "new2").exists()


# A child process running the command line with a fake model: each frame's step first runs HOOK (None: nothing)
_CHILD = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import conftest, torch
import streamvsr.models.registry as registry
from streamvsr.models.contract import Family
from test_video import FakeEngine

class Engine(FakeEngine):
    def step(self, frame, state):
        HOOK(len(self.calls))
        return super().step(frame, state)

family = Family(name="fake", title="Fake", scale=4, frame_rule="one per frame", size_multiple=1,
                dtypes=(torch.float32,), detect=lambda p: True, load_engine=lambda path, **k: Engine())
registry.detect_family = lambda path: family
from streamvsr.cli import main
sys.exit(main(sys.argv[2:]))
"""


# The stop signals as a terminal's command has them: a test run may inherit them ignored (`nohup`, a script's `&`)
_HEEDED = ("import signal as _signal\n_signal.signal(_signal.SIGINT, _signal.default_int_handler)\n"
           "for _name in ('SIGTERM', 'SIGHUP'):\n    if hasattr(_signal, _name):\n"
           "        _signal.signal(getattr(_signal, _name), _signal.SIG_DFL)\n")


@pytest.fixture
def heeded_signals():
    """This process's stop signals as a terminal's command has them (see ``_HEEDED``), for the test."""
    names = [name for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]
    before = {name: signal.getsignal(getattr(signal, name)) for name in names}
    for name in names:
        signal.signal(getattr(signal, name), signal.default_int_handler if name == "SIGINT" else signal.SIG_DFL)
    yield
    for name, handler in before.items():
        signal.signal(getattr(signal, name), handler)


def _run_child(hook: str, args: list, **popen):
    """``streamvsr ARGS`` in a child process whose fake engine runs ``hook`` (Python defining ``HOOK(i)``)."""
    code = _HEEDED + hook + _CHILD
    return subprocess.Popen([sys.executable, "-c", code, str(ROOT / "tests"), *map(str, args)],
                            env={**os.environ, "STREAMVSR_PROGRESS": "1"}, **popen)


def test_a_reader_of_stderr_that_quits_stops_the_progress_line_not_the_run(media, tmp_path):
    """``streamvsr frames ... 2>&1 | head -1``: the progress line met a closed pipe and the whole run failed, its
    outputs unwritten (an upscaled video never moved into place)."""
    flag = tmp_path / "pipe closed"
    hook = (f"def HOOK(i):\n    for _ in range(1200 if i == 1 else 0):  # (at most a minute)\n"
            f"        if os.path.exists({str(flag)!r}):\n            break\n        time.sleep(0.05)\n")
    child = _run_child(hook, ["frames", media / "frames", tmp_path / "up", "--model", tmp_path],
                       stderr=subprocess.PIPE)
    seen = b""
    while b"frames: 1/3" not in seen:
        chunk = child.stderr.read1(4096)
        assert chunk, seen
        seen += chunk
    child.stderr.close()  # (the reader quits; the frames after the first meet a closed pipe)
    flag.touch()
    assert child.wait(timeout=300) == 0
    assert sorted(p.name for p in (tmp_path / "up").iterdir()) == ["f000.png", "f001.png", "f002.png"]


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGTERM/SIGHUP to send on this system")
@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_stop_signal_keeps_the_work_done_as_ctrl_c_does(media, model, tmp_path, name):
    """`kill`, systemd, `docker stop`, a job scheduler (SIGTERM) or a closed terminal (SIGHUP): the process died where
    it stood, the frames done lost (no partial video, no checkpoint) and its lock and work files left behind."""
    signum = getattr(signal, name)
    # (sent twice, as a closing terminal can: the second does not abort the stop under way)
    hook = (f"import signal\ndef HOOK(i):\n    if i == 2:\n        os.kill(os.getpid(), {int(signum)})\n"
            f"        os.kill(os.getpid(), {int(signum)})\n")
    video = tmp_path / "o.mkv"
    child = _run_child(hook, ["upscale", media / "in.mp4", video, "--model", tmp_path, "--codec", "lossless"],
                       stderr=subprocess.PIPE, text=True)
    said = child.communicate(timeout=300)[1]
    assert child.returncode == 128 + signum, said  # (what a shell gives for a process the signal ended)
    assert f"stopping after this frame ({name} came; Ctrl-C to abort at once)" in said
    kept = partial_path(video)
    assert f"stopped: the first 3 frames are in {kept}" in said and "Traceback" not in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", kept.name] and len(decode(kept)) == 3

    # frames --resume: the frames before the stop are kept with a checkpoint, and the same command continues
    clean, out = tmp_path / "clean", tmp_path / "out"
    assert main(["frames", str(media / "frames"), str(clean), "--model", str(model.path)]) == 0
    args = ["frames", media / "frames", out, "--model", model.path, "--resume"]
    child = _run_child(hook.replace("i == 2", "i == 1"), args, stderr=subprocess.PIPE, text=True)  # (of 3)
    said = child.communicate(timeout=300)[1]
    assert child.returncode == 128 + signum, said
    assert f"stopped: 2 of 3 frames were written to {out}, each complete; run the same command again" in said
    assert f"stopping after this frame ({name} came; Ctrl-C to abort at once)" in said and "Traceback" not in said
    assert not lock_path(out).exists()
    assert main([str(a) for a in args]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in clean.iterdir()}


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this system")
def test_a_stop_signal_again_does_not_cut_short_the_cleanup_of_the_first(heeded_signals):
    """A closing terminal can send SIGHUP twice: the second came while the first stop saved its checkpoint (frames)
    and interrupted that."""
    from streamvsr.cli.commands import stop_signals, stop_status

    cleaned = []
    with stop_signals():
        with pytest.raises(KeyboardInterrupt):
            try:
                os.kill(os.getpid(), signal.SIGHUP)
                time.sleep(5)  # (the handler runs at once; never reached)
            finally:
                os.kill(os.getpid(), signal.SIGHUP)
                os.kill(os.getpid(), signal.SIGTERM)
                cleaned.append(1)
    assert cleaned == [1] and stop_status() == 128 + signal.SIGHUP


@pytest.mark.skipif(os.name != "posix", reason="signals sent to oneself as on POSIX")
def test_where_ctrl_c_is_ignored_a_second_stop_signal_aborts(caplog, heeded_signals):
    """A script's `streamvsr ... &` ignores Ctrl-C: the stop's message offered it, and a second `kill`, which then
    is the only way short of SIGKILL, was ignored too."""
    from streamvsr.cli.commands import _GracefulStop, stop_signals

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop_signals(), _GracefulStop() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop()
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # (the handler runs at once; never reached)
        assert "stopping after this frame (SIGTERM came; another SIGTERM to abort at once)" in caplog.text
        caplog.clear()
        if hasattr(signal, "SIGHUP"):  # (never SIGHUP twice: a closing terminal sends two)
            with stop_signals(), _GracefulStop() as stop:
                os.kill(os.getpid(), signal.SIGHUP)
                os.kill(os.getpid(), signal.SIGHUP)
                assert stop()
                with pytest.raises(KeyboardInterrupt):
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)
            assert "stopping after this frame (SIGHUP came; a SIGTERM to abort at once)" in caplog.text
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this system")
def test_a_signal_the_command_was_started_ignoring_stays_ignored(media, tmp_path):
    """`nohup streamvsr ...` (SIGHUP ignored, so that the run outlives the terminal) must not stop at SIGHUP."""
    hook = ("import signal\nsignal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
            "def HOOK(i):\n    if i == 2:\n        os.kill(os.getpid(), signal.SIGHUP)\n")
    out = tmp_path / "o.mkv"
    child = _run_child(hook, ["upscale", media / "in.mp4", out, "--model", tmp_path, "--codec", "lossless"],
                       stderr=subprocess.PIPE, text=True)
    said = child.communicate(timeout=300)[1]
    assert child.returncode == 0 and "stop" not in said, said
    assert len(decode(out)) == 4


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell what a descriptor is")
def test_a_closed_stderr_is_no_failure_and_no_file_takes_its_place(media, tmp_path):
    """Started with ``2>&-`` (a cron job, a service): the progress line failed on the missing stream after the
    model loaded, as would any writer to ``sys.stderr`` (the hub client's download bars); and the next file opened
    would have taken descriptor 2, where libraries write their messages. It is the null device now."""
    seen = tmp_path / "fd2"
    hook = (f"def HOOK(i):\n    open({str(seen)!r}, 'w').write(os.readlink('/proc/self/fd/2'))\n"
            "    sys.stderr.write('a library writing to sys.stderr, e.g. a download progress bar')\n")
    child = _run_child(hook, ["frames", media / "frames", tmp_path / "up", "--model", tmp_path],
                       preexec_fn=lambda: os.close(2))
    assert child.wait(timeout=300) == 0
    assert sorted(p.name for p in (tmp_path / "up").iterdir()) == ["f000.png", "f001.png", "f002.png"]
    assert seen.read_text() == os.devnull


def test_a_message_during_a_run_starts_on_a_line_of_its_own(tmp_path):
    """A warning or the stop message while the progress line was unfinished was glued to its end ("... 12 s
    leftstopped: ..."), and the line's end came after it as an empty line."""
    code = ("import sys, logging; sys.path.insert(0, sys.argv[1]); import conftest\n"
            "from streamvsr.cli import setup_logging\nfrom streamvsr.models.shared.runtime import Progress\n"
            "setup_logging()\np = Progress(3, 'frames')\np.update(1)\n"
            "logging.getLogger('streamvsr').warning('stopped: 1 of 3 frames')\np.update(2)\np.close()\n"
            "logging.getLogger('streamvsr').info('done')\n")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT / "tests")], capture_output=True,
                            env={**os.environ, "STREAMVSR_PROGRESS": "1"}, timeout=300)
    lines = result.stderr.decode().split("\n")  # (bytes: text mode would read each "\r" as a line's end)
    assert [line.split(":")[0].lstrip("\r") for line in lines] == ["frames", "stopped", "frames", "done", ""], lines
    assert lines[1] == "stopped: 1 of 3 frames"


@pytest.mark.parametrize("args, says", [
    ("flow IN OUT --flow F --resume", "unrecognized arguments: --resume (see `streamvsr flow --help`)"),
    ("frames IN OUT --model M --codec h264", "unrecognized arguments: --codec h264 (see `streamvsr frames --help`)"),
    ("upscale IN OUT.mp4 --bogus", "unrecognized arguments: --bogus (see `streamvsr upscale --help`)"),
    ("--bogus upscale IN OUT.mp4", "unrecognized arguments: --bogus (see `streamvsr --help`)"),
    ("frames IN OUT --model M --debug", "--debug goes before the command: streamvsr --debug frames ..."),
    ("upscale IN OUT.mp4 -v", "-v goes before the command: streamvsr -v upscale ..."),
])
def test_an_unknown_option_points_to_the_help_that_lists_it(args, says, capsys):
    """The top-level help lists no command's options, and a command's help not the top-level ones."""
    with pytest.raises(SystemExit) as e:
        main(args.split())
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"error: {says}\n", err


def test_bf16_on_a_gpu_without_bf16_arithmetic_is_said(monkeypatch, caplog):
    """A T4 or V100 emulates bf16, several times slower than its fp16: --dtype bf16 there is taken, and said."""
    from streamvsr.cli.options import EnginePlan

    family = Family(name="fake", title="Fake", scale=4, frame_rule="one per frame", size_multiple=1,
                    dtypes=(torch.float32, torch.bfloat16), detect=lambda p: True,
                    load_engine=lambda p, **k: FakeEngine())
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # (load() sets it)
    for capability, said in (((7, 5), True), ((8, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            EnginePlan(family, {}, torch.device("cuda:0"), torch.bfloat16, "model").load()
        assert ("this GPU has no bf16 arithmetic" in caplog.text) is said, capability


def test_a_gpu_that_pytorch_has_no_kernels_for_is_said_before_the_models_load(media, model, tmp_path, caplog,
                                                                              monkeypatch):
    """A GTX 1080 (compute capability 6.1) with a PyTorch built for Turing and later: its first computation failed
    with "no kernel image is available" after the models had loaded. One line instead, for --device cuda and auto;
    a GPU that the build's machine code (same major version) or PTX (an older version) runs on is taken."""
    from streamvsr.models.shared.errors import UserInputError
    from streamvsr.models.shared.runtime import pick_device

    capability = {"now": (6, 1)}
    arch_list = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch_list)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce GTX 1080")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["now"])
    out = tmp_path / "o"
    for device in ("cuda", "auto", "cuda:0"):
        caplog.clear()
        code = main(["frames", str(media / "frames"), str(out), "--model", str(model.path), "--device", device])
        one_line_error(caplog, code, "has no kernels for the GPU NVIDIA GeForce GTX 1080 (compute capability 6.1; "
                                     "it was built for sm_75, sm_80")
        assert "--device cpu" in caplog.text and ("--device auto" in caplog.text) is False
    assert not out.exists()
    for capability["now"] in ((7, 5), (8, 9), (12, 1), (13, 0)):
        assert pick_device("cuda") == torch.device("cuda")
    # no PTX: a newer major version has nothing to run; code for 9.0's own features ("a") runs on 9.0 only
    arch_list[:] = ["sm_80", "sm_90a"]
    for capability["now"] in ((8, 6), (9, 0)):
        assert pick_device("auto") == torch.device("cuda")
    for capability["now"] in ((10, 0), (7, 5), (9, 1)):
        with pytest.raises(UserInputError, match="has no kernels for the GPU"):
            pick_device("auto")


def test_fp16_on_the_cpu_is_said_only_where_there_is_no_mistake(media, model, tmp_path, caplog, monkeypatch):
    """The command line takes fp16 on the CPU (a parity check may want it) with a warning of what it costs, which
    came before an error found later, so that a mistake was two lines."""
    code = main(["frames", str(media / "frames"), str(tmp_path / "o"), "--model", str(model.path), "--dtype", "fp16",
                 "--device", "cpu", "--steps", "3"])
    one_line_error(caplog, code, "--steps")
    caplog.clear()
    family = Family(name="fake16", title="Fake", scale=4, frame_rule="one per frame", size_multiple=1,
                    dtypes=(torch.float32, torch.float16), detect=lambda p: True,
                    load_engine=lambda p, **k: FakeEngine())
    monkeypatch.setattr(registry, "detect_family", lambda path: family)
    code = main(["upscale", str(media / "wide.mkv"), str(tmp_path / "o.mp4"), "--model", str(model.path),
                 "--dtype", "fp16", "--device", "cpu"])  # (found after the model's options: frames too wide)
    one_line_error(caplog, code, "cannot encode the 16400x32 output frames")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["frames", str(media / "frames"), str(tmp_path / "o"), "--model", str(model.path),
                     "--dtype", "fp16", "--device", "cpu"]) == 0
    assert "fp16 on the CPU computes hundreds of times slower" in caplog.text and "--dtype bf16" in caplog.text
