"""The command line end to end on tiny checkpoints: frames, flow and convert."""

import json
import logging
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_tiny_checkpoint, make_tiny_raft
from streamvsr.cli import main
from streamvsr.video.frames import read_frame

pytest.importorskip("diffusers")
tv = pytest.importorskip("torchvision.models.optical_flow")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ckpt = make_tiny_checkpoint(root / "ckpt")
    raft = make_tiny_raft(root / "raft_small.pth")
    frames = root / "frames"
    frames.mkdir()
    g = torch.Generator().manual_seed(0)
    base = (torch.rand(40, 56, 3, generator=g).numpy() * 255).astype(np.uint8)
    for i in range(3):
        Image.fromarray(base[i: i + 33, 2 * i: 2 * i + 45]).save(frames / f"f{i:03d}.png")  # 45x33: not x4
    return ckpt, raft, frames


def test_frames_npy_matches_engine(assets, tmp_path):
    ckpt, raft, frames = assets
    out = tmp_path / "out"
    assert main(["frames", str(frames), str(out), "--model", str(ckpt), "--flow", str(raft), "--save", "npy",
                 "--device", "cpu"]) == 0
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["f000.npy", "f001.npy", "f002.npy"]
    arrays = [np.load(f) for f in files]
    assert all(a.shape == (132, 180, 3) and a.dtype == np.float32 for a in arrays)
    assert all(0 <= a.min() and a.max() <= 1 for a in arrays)

    from streamvsr.models.stream_diffvsr import load_engine

    engine = load_engine(ckpt, flow=raft)  # the engine the command line builds on the CPU
    state = engine.new_state(42)  # the command line's default seed
    for path, saved in zip(sorted(frames.iterdir()), arrays):
        hr, state = engine.step(read_frame(path), state)
        assert np.array_equal(hr[0].permute(1, 2, 0).numpy(), saved)


def test_frames_resume_continues_a_stopped_run_with_the_real_engine_state(assets, tmp_path, monkeypatch, caplog):
    """`frames --resume` stopped by Ctrl-C (exit 130) writes a checkpoint of the Stream-DiffVSR state (its noise
    generator, the previous output and upscale); the same command continues it to the outputs of one run."""
    from streamvsr.models.stream_diffvsr.engine import StreamEngine

    ckpt, raft, frames = assets
    common = ["--model", str(ckpt), "--flow", str(raft), "--save", "npy", "--device", "cpu"]
    assert main(["frames", str(frames), str(tmp_path / "whole"), *common]) == 0
    assert main(["frames", str(frames), str(tmp_path / "o"), *common, "--checkpoint-every", "5"]) == 2
    assert "--checkpoint-every only applies with --resume" in caplog.text
    push, pushes = StreamEngine.push, []

    def stopped_at_the_third(self, state, frames, consume=False):
        pushes.append(1)
        if len(pushes) == 3:
            raise KeyboardInterrupt
        return push(self, state, frames, consume)

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(StreamEngine, "push", stopped_at_the_third)
        assert main(["frames", str(frames), str(out), *common, "--resume"]) == 130
    assert sorted(p.name for p in out.iterdir()) == ["f000.npy", "f001.npy"]
    assert main(["frames", str(frames), str(out), *common]) == 2
    assert "has an unfinished resumable job (2 frames done" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["frames", str(frames), str(out), *common, "--resume"]) == 0
    assert f"resuming {out} after 2 frames" in caplog.text
    for name in ("f000.npy", "f001.npy", "f002.npy"):
        assert np.array_equal(np.load(out / name), np.load(tmp_path / "whole" / name)), name
    assert not (tmp_path / "out.streamvsr-resume.safetensors").exists()


def test_plain_layers_option_builds_torch_layers_with_the_same_output(assets, tmp_path, monkeypatch):
    ckpt, raft, frames = assets
    from torch import nn

    from streamvsr.models.shared.packed import PackedConv2d
    from streamvsr.models.stream_diffvsr.engine import StreamEngine

    built = []  # the engines the command line builds
    init = StreamEngine.__init__
    monkeypatch.setattr(StreamEngine, "__init__", lambda self, *a, **k: built.append(self) or init(self, *a, **k))
    outputs = {}
    for extra in ([], ["--plain-layers"]):
        out = tmp_path / ("plain" if extra else "fast")
        assert main(["frames", str(frames), str(out), "--model", str(ckpt), "--flow", str(raft), "--save", "npy",
                     "--device", "cpu", *extra]) == 0
        outputs[bool(extra)] = [np.load(f) for f in sorted(out.iterdir())]
    fast, plain = built
    assert isinstance(fast.pipeline.unet.conv_in, PackedConv2d) and type(plain.pipeline.unet.conv_in) is nn.Conv2d
    assert any(isinstance(m, PackedConv2d) for m in fast.flow.modules())
    assert not any(isinstance(m, PackedConv2d) for network in (plain.pipeline, plain.flow)
                   for m in network.modules())
    assert len(outputs[False]) == len(outputs[True]) == len(list(frames.iterdir()))
    for a, b in zip(outputs[False], outputs[True]):
        assert np.abs(a - b).max() <= 1e-4


def test_plain_layers_where_they_change_nothing_is_said(assets, tmp_path, caplog):
    """The CPU layers run on the CPU in fp32 only: --plain-layers elsewhere was taken without a word."""
    ckpt, raft, frames = assets
    for dtype, said in (("bf16", True), ("fp32", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert main(["frames", str(frames), str(tmp_path / dtype), "--model", str(ckpt), "--flow", str(raft),
                         "--device", "cpu", "--dtype", dtype, "--plain-layers"]) == 0
        assert ("--plain-layers changes nothing here" in caplog.text) is said, caplog.text


def test_a_resumed_job_tells_a_model_changed_in_one_part_and_continues_a_job_of_an_earlier_release(assets,
                                                                                                   tmp_path):
    """The resume identity checked the UNet's first weights alone: a ControlNet or decoder replaced by another was
    taken as the same model, and the job spliced two renderings. A checkpoint written before the identity told
    the parts apart (without its ``parts=`` field) still continues."""
    from streamvsr.models.stream_diffvsr import FAMILY
    from streamvsr.video.resume import ResumeFiles, fingerprint_mismatch

    ckpt, raft, frames = assets
    engine = FAMILY.load_engine(str(ckpt), flow=str(raft))
    before = engine.identity()
    for part in ("controlnet", "vae"):
        weight = list(getattr(engine.pipeline, part).parameters())[-1]
        kept = weight.detach().clone()
        with torch.no_grad():
            weight += 0.25
        changed = engine.identity()
        assert changed != before, part
        assert fingerprint_mismatch({"model": before}, {"model": changed}) == "another model"
        with torch.no_grad():
            weight.copy_(kept)
    assert engine.identity() == before
    # an earlier release's checkpoint: the identity without the parts' checksum, compared without it
    earlier = before.rpartition("|parts=")[0]
    assert "|parts=" in before and earlier.startswith("stream-diffvsr|")
    assert fingerprint_mismatch({"model": earlier}, {"model": before}) is None
    assert fingerprint_mismatch({"model": earlier.replace("steps=4", "steps=2")}, {"model": before}) == \
        "steps 2 then, 4 now"
    # end to end: a job stopped after its first frame, its checkpoint rewritten as an earlier release wrote it
    import streamvsr.video.frames as frames_module
    from safetensors import safe_open
    from safetensors.torch import save_file

    out, stop = tmp_path / "out", tmp_path / "stop"
    args = ["frames", str(frames), str(out), "--model", str(ckpt), "--flow", str(raft), "--resume"]
    assert main(args) == 0
    real = frames_module.read_frame

    def stopped_at_the_second(path):
        if path.name != "f000.png":
            raise KeyboardInterrupt
        return real(path)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(frames_module, "read_frame", stopped_at_the_second)
        assert main([*args[:2], str(stop), *args[3:]]) == 130
    state = ResumeFiles(stop).state
    with safe_open(str(state), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta["streamvsr_resume"])
    assert info["consumed"] == 1 and info["fingerprint"]["model"] == before
    info["fingerprint"]["model"] = earlier
    save_file(tensors, str(state), metadata={**meta, "streamvsr_resume": json.dumps(info)})
    assert main([*args[:2], str(stop), *args[3:]]) == 0
    assert {p.name: p.read_bytes() for p in stop.iterdir()} == {p.name: p.read_bytes() for p in out.iterdir()}
    assert not state.exists()


def test_download_help_names_the_default_folder_also_where_the_variable_is_set(monkeypatch, capsys):
    """With $STREAMVSR_MODELS set, the help said "default: $STREAMVSR_MODELS or <its value>", hiding the
    fallback."""
    monkeypatch.setenv("STREAMVSR_MODELS", "/data/models")
    with pytest.raises(SystemExit):
        main(["download", "--help"])
    said = " ".join(capsys.readouterr().out.split())
    assert "(default: $STREAMVSR_MODELS, or ~/.cache/streamvsr where that is unset or empty; `upscale --download` " \
           "looks only there" in said, said


def test_flow_iterations_reach_the_engine_and_its_identity(assets, monkeypatch):
    from streamvsr.models.stream_diffvsr import FAMILY

    ckpt, raft, _ = assets
    engines = {n: FAMILY.load_engine(str(ckpt), flow=str(raft), flow_iterations=n) for n in (3, 12)}
    assert engines[3].flow.num_flow_updates == 3 and engines[12].flow.num_flow_updates == 12
    assert engines[3].identity() != engines[12].identity()  # a resumed job cannot mix them
    with pytest.raises(SystemExit):
        main(["frames", "in", "out", "--model", str(ckpt), "--flow", str(raft), "--flow-iterations", "0"])


def test_frames_png_and_png16(assets, tmp_path):
    ckpt, raft, frames = assets
    for fmt, dtype in (("png", np.uint8), ("png16", np.uint16)):
        out = tmp_path / fmt
        assert main(["frames", str(frames), str(out), "--model", str(ckpt), "--flow", str(raft), "--save", fmt,
                     "--seed", "3", "--steps", "2", "--device", "cpu"]) == 0
        arr = np.asarray(Image.open(out / "f001.png"))
        assert arr.shape[:2] == (132, 180)
        if fmt == "png":
            assert arr.dtype == dtype and arr.shape == (132, 180, 3)
    eight = np.asarray(Image.open(tmp_path / "png" / "f001.png")).astype(np.float64) / 255
    import zlib  # decode our 16-bit PNG by hand: PIL reads 16-bit RGB as 8-bit
    data = (tmp_path / "png16" / "f001.png").read_bytes()
    idat = b"".join(data[i + 8: i + 8 + int.from_bytes(data[i:i + 4], "big")]
                    for i in range(8, len(data)) if data[i + 4: i + 8] == b"IDAT")
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(132, 1 + 180 * 6)
    assert (rows[:, 0] == 0).all()
    sixteen = rows[:, 1:].copy().view(">u2").reshape(132, 180, 3).astype(np.float64) / 65535
    assert np.abs(sixteen - eight).max() <= 0.5 / 255 + 1e-4


def test_flow_command_matches_torchvision(assets, tmp_path):
    _, raft, frames = assets
    out = tmp_path / "flow"
    assert main(["flow", str(frames), str(out), "--flow", str(raft), "--device", "cpu"]) == 0
    assert sorted(f.name for f in out.iterdir()) == ["f001.npy", "f002.npy"]
    model = tv.raft_small(weights=None)
    model.load_state_dict(torch.load(raft))
    model.eval()
    paths = sorted(frames.iterdir())
    prev, cur = (read_frame(p)[None] * 2 - 1 for p in paths[:2])
    pad = torch.nn.functional.pad
    with torch.no_grad():  # torchvision needs multiples of 8 and >= 128: pad like ours, then crop
        expected = model(pad(cur, (0, 83, 0, 95), mode="replicate"), pad(prev, (0, 83, 0, 95), mode="replicate"))
    expected = expected[-1][0, :, :33, :45].permute(1, 2, 0).numpy()
    got = np.load(out / "f001.npy")
    assert got.shape == (33, 45, 2) and got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-3
    # --flow-iterations is torchvision's num_flow_updates (the nodes' iterations)
    assert main(["flow", str(frames), str(tmp_path / "three"), "--flow", str(raft), "--flow-iterations", "3"]) == 0
    with torch.no_grad():
        three = model(pad(cur, (0, 83, 0, 95), mode="replicate"), pad(prev, (0, 83, 0, 95), mode="replicate"),
                      num_flow_updates=3)
    three = three[-1][0, :, :33, :45].permute(1, 2, 0).numpy()
    assert np.abs(np.load(tmp_path / "three" / "f001.npy") - three).max() <= 1e-3
    assert np.abs(three - expected).max() > 1e-2  # (so the check above tells them apart)
    assert main(["flow", str(frames), str(tmp_path / "vis"), "--flow", str(raft), "--save", "png"]) == 0
    assert np.asarray(Image.open(tmp_path / "vis" / "f002.png")).shape == (33, 45, 3)
    # one scale for every picture, so that colours compare across frames: the flow drawn at that speed
    from streamvsr.models.raft.visualise import flow_to_image

    assert main(["flow", str(frames), str(tmp_path / "vis5"), "--flow", str(raft), "--save", "png",
                 "--max-magnitude", "5"]) == 0
    for name in ("f001", "f002"):
        drawn = np.asarray(Image.open(tmp_path / "vis5" / f"{name}.png"))
        assert np.array_equal(drawn, flow_to_image(np.load(out / f"{name}.npy"), 5.0))
    assert not np.array_equal(drawn, np.asarray(Image.open(tmp_path / "vis" / "f002.png")))
    assert main(["flow", str(frames), str(tmp_path / "n"), "--flow", str(raft), "--max-magnitude", "5"]) == 2


def test_convert_then_frames(assets, tmp_path):
    ckpt, raft, frames = assets
    single = tmp_path / "m.safetensors"
    assert main(["convert", str(ckpt), str(single), "--dtype", "fp32"]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    for model, out in ((ckpt, a), (single, b)):
        assert main(["frames", str(frames), str(out), "--model", str(model), "--flow", str(raft),
                     "--save", "npy", "--device", "cpu"]) == 0
    for name in ("f000.npy", "f002.npy"):
        assert np.array_equal(np.load(a / name), np.load(b / name))
    # without --dtype a Stream-DiffVSR file is written in fp16 (half the size; the empty prompt stays fp32)
    from safetensors import safe_open

    assert main(["convert", str(ckpt), str(tmp_path / "half.safetensors")]) == 0
    with safe_open(str(tmp_path / "half.safetensors"), "pt") as f:
        full = {k for k in f.keys() if f.get_tensor(k).dtype != torch.float16 and f.get_tensor(k).is_floating_point()}
    assert full == {"prompt_embeds"}


def test_flow_and_frames_report_progress(assets, tmp_path, monkeypatch, capsys):
    ckpt, raft, frames = assets
    monkeypatch.setenv("STREAMVSR_PROGRESS", "1")  # as on a terminal
    assert main(["flow", str(frames), str(tmp_path / "f"), "--flow", str(raft)]) == 0
    assert "flow: 2/2 frames" in capsys.readouterr().err
    assert main(["frames", str(frames), str(tmp_path / "u"), "--model", str(ckpt), "--flow", str(raft),
                 "--device", "cpu"]) == 0
    assert "frames: 3/3 frames" in capsys.readouterr().err


def test_flow_of_frames_with_transparency_does_not_speak_of_upscaling(assets, tmp_path, caplog):
    from PIL import Image

    _, raft, frames = assets
    rgba = tmp_path / "rgba"
    rgba.mkdir()
    for p in sorted(frames.glob("*.png")):
        Image.open(p).convert("RGBA").save(rgba / p.name)
    assert main(["flow", str(rgba), str(tmp_path / "f"), "--flow", str(raft)]) == 0
    assert "has transparency: the flow is estimated from its colours alone" in caplog.text
    assert "upscaled" not in caplog.text


def test_convert_never_replaces_a_file_by_accident(assets, tmp_path, caplog, monkeypatch):
    from streamvsr.models.stream_diffvsr import loader

    ckpt = assets[0]
    calls = []
    real = loader.convert_to_single_file
    monkeypatch.setattr(loader, "convert_to_single_file", lambda *a, **k: calls.append(a) or real(*a, **k))
    precious = tmp_path / "precious.safetensors"
    precious.write_bytes(b"another model")
    assert main(["convert", str(ckpt), str(precious), "--dtype", "fp32"]) == 2
    assert "already exists" in caplog.text and precious.read_bytes() == b"another model"
    caplog.clear()
    # a file of the source, even with --overwrite; a name that cannot be read back as a converted file
    inside = next(p for p in (ckpt / "unet").iterdir() if p.suffix == ".safetensors")
    before = inside.read_bytes()
    assert main(["convert", str(ckpt), str(inside), "--dtype", "fp16", "--overwrite"]) == 2
    assert "is the input" in caplog.text and inside.read_bytes() == before
    assert main(["convert", str(ckpt), str(tmp_path / "m.pt")]) == 2
    assert "must end in .safetensors" in caplog.text and "Traceback" not in caplog.text
    # nor into the model's own folder (which would then hold two models, and be refused as such)
    (tmp_path / "link").symlink_to(ckpt)
    for inside in (ckpt / "m.safetensors", ckpt / "unet" / "sub" / "m.safetensors", tmp_path / "link" / "m.safetensors",
                   ckpt.parent / "x" / ".." / ckpt.name / "m.safetensors"):
        caplog.clear()
        assert main(["convert", str(ckpt), str(inside), "--dtype", "fp16"]) == 2
        assert f"would go inside the model folder {ckpt}: write" in caplog.text and not inside.exists()
    assert not (ckpt / "unet" / "sub").exists()
    assert calls == []  # all refused before the weights were read
    # --overwrite replaces it, once the new file is complete; no work file is left
    assert main(["convert", str(ckpt), str(precious), "--dtype", "fp32", "--overwrite"]) == 0
    assert precious.read_bytes() != b"another model"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "link") == ["precious.safetensors"]
    # a converted file reads nothing beside it: its conversion to another precision may replace a neighbour (it
    # was refused as "the input")
    caplog.clear()
    half = tmp_path / "half.safetensors"
    half.write_bytes(b"an older conversion")
    assert main(["convert", str(precious), str(half), "--dtype", "fp16"]) == 2
    assert "already exists; add --overwrite" in caplog.text
    assert main(["convert", str(precious), str(half), "--dtype", "fp16", "--overwrite"]) == 0
    assert half.stat().st_size < precious.stat().st_size
    (tmp_path / "link").unlink()
    beside = ckpt / ".." / "beside.safetensors"  # (out of the model's folder through "..": not refused)
    assert main(["convert", str(ckpt), str(beside), "--dtype", "fp16"]) == 0
    os.unlink(beside)


def test_a_missing_flow_is_found_before_any_folder_is_made(assets, tmp_path, caplog):
    ckpt, _, frames = assets
    assert main(["frames", str(frames), str(tmp_path / "new" / "out"), "--model", str(ckpt), "--device", "cpu"]) == 2
    assert "needs optical flow: give --flow PATH" in caplog.text and not (tmp_path / "new").exists()


def test_a_wrong_flow_file_is_found_before_the_model_loads(assets, tmp_path, caplog, monkeypatch):
    """A Git LFS pointer or the model's own file given as --flow was found after the 4 GB model had loaded."""
    ckpt, _, frames = assets
    loaded = []
    monkeypatch.setattr("streamvsr.models.stream_diffvsr.loader.load_pipeline", lambda *a, **k: loaded.append(a))
    pointer = tmp_path / "raft.pth"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 21108000\n")
    unet = ckpt / "unet" / "diffusion_pytorch_model.safetensors"
    for flow, says in ((pointer, "is a Git LFS pointer"), (unet, "holds none of torchvision's RAFT tensors")):
        caplog.clear()
        assert main(["frames", str(frames), str(tmp_path / "o"), "--model", str(ckpt), "--flow", str(flow),
                     "--device", "cpu"]) == 2
        assert says in caplog.text and loaded == []
    # a video (or anything else) in a model's folder is not called a part of it
    import shutil

    shutil.copytree(ckpt, tmp_path / "model")
    (tmp_path / "model" / "clip.mp4").write_bytes(b"\x00" * 64)
    caplog.clear()
    assert main(["frames", str(frames), str(tmp_path / "o"), "--model", str(tmp_path / "model" / "clip.mp4"),
                 "--flow", str(pointer)]) == 2
    assert "one file of" not in caplog.text and "holds no model this pack knows" in caplog.text


def test_seeds_read_as_written():
    import argparse

    from streamvsr.cli.options import seed_value

    assert [seed_value(t) for t in ("42", "042", "0x2a", str(2**64 - 1))] == [42, 42, 42, 2**64 - 1]
    for bad in ("-1", str(2**64), "4.2", "forty"):
        with pytest.raises(argparse.ArgumentTypeError):
            seed_value(bad)


def test_convert_keeps_a_result_it_cannot_put_in_place_where_it_says(assets, tmp_path, caplog, monkeypatch):
    from streamvsr.video import outputs

    def cannot(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(outputs, "_move_into_place", cannot)
    monkeypatch.setattr(outputs, "keep_partial", cannot)  # not even under the partial name
    assert main(["convert", str(assets[0]), str(tmp_path / "m.safetensors"), "--dtype", "fp32"]) == 2
    kept = outputs.temp_path(tmp_path / "m.safetensors")
    assert f"it is still in {kept}" in caplog.text and kept.stat().st_size > 0


def test_convert_stopped_while_flushing_leaves_no_converted_file(assets, tmp_path, monkeypatch):
    """Ctrl-C during the final flush (gigabytes: seconds on a USB drive) left the whole result under its temporary
    name, which ComfyUI then listed and loaded as a model."""
    from streamvsr.video import outputs

    def stopped(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "sync_file", stopped)
    assert main(["convert", str(assets[0]), str(tmp_path / "m.safetensors"), "--dtype", "fp32"]) == 130
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_before_the_command_starts_is_a_quiet_stop(monkeypatch, caplog):
    """Ctrl-C in the first seconds (while torch loads, before the command's own handling) printed a traceback."""
    from streamvsr.models.shared import runtime

    def stopped():
        raise KeyboardInterrupt

    monkeypatch.setattr(runtime, "keep_freed_memory", stopped)
    assert main(["download", "--dest", "nowhere"]) == 130
    assert [r.getMessage() for r in caplog.records] == ["interrupted"] and "Traceback" not in caplog.text


def test_a_finished_result_stopped_while_put_in_place_is_kept(tmp_path, monkeypatch, caplog):
    """A video's hours of work, finished, then Ctrl-C during its flush: kept under the partial name (the next run
    removes what is left under the temporary name)."""
    from streamvsr.video import outputs

    out = tmp_path / "film.mp4"
    tmp = outputs.temp_path(out)
    tmp.write_bytes(b"the finished video")

    def stopped(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "sync_file", stopped)
    with pytest.raises(KeyboardInterrupt):
        outputs.publish(tmp, out)
    kept = outputs.partial_path(out)
    assert kept.read_bytes() == b"the finished video" and not tmp.exists() and not out.exists()
    assert f"it was kept as {kept}" in caplog.text
    # one frame of a folder is not kept so: a partial name would add a frame to the folder (it is redone)
    frame = tmp_path / "f001.png"
    tmp = outputs.temp_path(frame)
    tmp.write_bytes(b"a frame")
    with pytest.raises(KeyboardInterrupt):
        outputs.publish(tmp, frame, keep_stopped=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [kept.name]


def test_out_of_memory_is_one_line_with_what_to_change(assets, tmp_path, caplog, monkeypatch):
    from streamvsr.models.stream_diffvsr.engine import StreamEngine

    ckpt, raft, frames = assets

    def out_of_memory(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    monkeypatch.setattr(StreamEngine, "step", out_of_memory)
    assert main(["frames", str(frames), str(tmp_path / "o"), "--model", str(ckpt), "--flow", str(raft),
                 "--device", "cpu"]) == 2
    assert "out of memory" in caplog.text and "--corr on_demand" in caplog.text and "Traceback" not in caplog.text
    assert "--kv-ratio" not in caplog.text  # a FlashVSR option: not for this model


def test_the_cpu_running_out_of_memory_is_one_line_too(assets, tmp_path, caplog, monkeypatch):
    """PyTorch's CPU allocator raises a plain RuntimeError, not its OutOfMemoryError; other errors stay bugs."""
    from streamvsr.models.stream_diffvsr.engine import StreamEngine

    ckpt, raft, frames = assets
    for message, code in (("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 8589934592 bytes. Error code 12", 2),
                          ("mat1 and mat2 shapes cannot be multiplied", None)):
        def fail(*a, message=message, **k):
            raise RuntimeError(message)

        monkeypatch.setattr(StreamEngine, "step", fail)
        caplog.clear()
        args = ["frames", str(frames), str(tmp_path / f"o{code}"), "--model", str(ckpt), "--flow", str(raft),
                "--device", "cpu"]
        if code is None:
            with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
                main(args)
        else:
            assert main(args) == code
            assert "error: out of memory (" in caplog.text and "Try, in this order" in caplog.text
            # the CPU's own savings first; no GPU advice, nor the CPU as a last resort to a run already there
            assert ("Try, in this order: --plain-layers; --corr on_demand; --flow-downscale 2; --dtype bf16; smaller "
                    "frames.") in caplog.text
            assert "GPU" not in caplog.text and "--device cpu" not in caplog.text


def test_a_tilde_in_the_flow_path_is_the_home_folder(assets, tmp_path, monkeypatch):
    """A shell expands ~ in `--flow ~/raft.pth` but not in `--flow=~/raft.pth`: the program does it then."""
    import shutil

    ckpt, raft, frames = assets
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(raft, tmp_path / "raft.pth")
    assert main(["flow", str(frames), str(tmp_path / "flows"), "--flow=~/raft.pth", "--device", "cpu"]) == 0
    assert len(list((tmp_path / "flows").iterdir())) == 2


def test_bad_model_path_is_a_clear_error(assets, tmp_path, caplog):
    _, raft, frames = assets
    assert main(["frames", str(frames), str(tmp_path / "o"), "--model", str(tmp_path / "missing"),
                 "--flow", str(raft)]) == 2
    assert "does not exist" in caplog.text


def test_a_cut_short_file_with_odd_metadata_is_still_named_as_cut_short(tmp_path):
    import json
    import struct

    from streamvsr.models.shared.errors import WeightsError
    from streamvsr.models.shared.weights import check_weights_file

    header = json.dumps({"__metadata__": ["not", "a", "mapping"],
                         "x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(WeightsError, match="cut short: its tensors need .*; delete it and download it again"):
        check_weights_file(path)


def test_a_damaged_weights_file_is_named_as_such(assets, tmp_path, caplog):
    """Not "holds no model this pack knows": a cut-short converted file or a Git LFS pointer says what it is, for
    the model and for the flow weights alike."""
    ckpt, raft, frames = assets
    single = tmp_path / "m.safetensors"
    assert main(["convert", str(ckpt), str(single), "--dtype", "fp32"]) == 0
    data = single.read_bytes()
    single.write_bytes(data[: len(data) - 100])
    pointer = tmp_path / "raft.pth"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    cut = tmp_path / "raft_cut.pth"
    cut.write_bytes(raft.read_bytes()[:5000])
    # (made by convert, not downloaded: convert it again)
    for model, flow, message in ((single, raft, f"m.safetensors is damaged ({len(data) - 100:,} bytes): cut short: "
                                                f"its tensors need {len(data):,} bytes; delete it and convert the "
                                                "model again (`streamvsr convert`)."),
                                 (ckpt, pointer, "raft.pth is a Git LFS pointer"),
                                 (ckpt, cut, "raft_cut.pth is damaged (5,000 bytes): a PyTorch archive that is cut "
                                             "short")):
        caplog.clear()
        assert main(["frames", str(frames), str(tmp_path / "out"), "--model", str(model), "--flow", str(flow)]) == 2
        assert message in caplog.text and "weights_only" not in caplog.text
    assert not (tmp_path / "out").exists()


def test_a_tilde_in_dest_and_in_the_models_variable_is_the_home_folder(tmp_path, monkeypatch):
    from streamvsr.models.raft import weights as raft_weights
    from streamvsr.models.stream_diffvsr import hub

    fetched = []
    monkeypatch.setattr(hub, "download_stream_diffvsr", lambda dest: fetched.append(dest) or dest)
    monkeypatch.setattr(raft_weights, "download_raft", lambda name, dest: fetched.append(dest) or dest / "r.pth")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["download", "--dest=~/models"]) == 0
    monkeypatch.setenv("STREAMVSR_MODELS", "~/env")
    assert main(["download"]) == 0
    home = tmp_path / "home"
    assert fetched == [home / "models" / "Stream-DiffVSR", home / "models" / "raft", home / "env" / "Stream-DiffVSR",
                       home / "env" / "raft"]
    assert not (tmp_path / "~").exists()


def test_unrecognised_model_and_foreign_options_are_one_line_errors(assets, tmp_path, capsys, caplog, monkeypatch):
    _, raft, frames = assets
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    assert main(["frames", str(frames), str(tmp_path / "o"), "--model", str(other), "--flow", str(raft)]) == 2
    assert "holds no model this pack knows" in caplog.text
    # a file of a model folder, or the flow weights, given as the model: said what it is and what to give
    ckpt = assets[0]
    for part in (ckpt / "model_index.json", ckpt / "unet" / "diffusion_pytorch_model.safetensors"):
        caplog.clear()
        assert main(["frames", str(frames), str(tmp_path / "o"), "--model", str(part), "--flow", str(raft)]) == 2
        assert f"{part} is one file of the Stream-DiffVSR model in {ckpt}: give that folder" in caplog.text
    caplog.clear()
    assert main(["frames", str(frames), str(tmp_path / "o"), "--model", str(raft), "--flow", str(raft)]) == 2
    assert f"{raft} holds RAFT optical flow weights: give it as the flow model (--flow)" in caplog.text
    caplog.clear()
    assert main(["convert", str(raft), str(tmp_path / "raft.safetensors")]) == 2  # (convert has no --flow)
    assert f"{raft} holds RAFT optical flow weights: they are used as they are, with --flow; nothing to convert" \
        in caplog.text
    # a Hugging Face name, as the models table gives them, is not a folder here: said how to fetch it
    caplog.clear()
    monkeypatch.chdir(tmp_path)
    assert main(["frames", str(frames), str(tmp_path / "o"), "--model", "JunhaoZhuang/FlashVSR-v1.1"]) == 2
    assert ("a model is a folder or file on this computer, not a Hugging Face name: `streamvsr download` fetches "
            "Stream-DiffVSR, and `hf download JunhaoZhuang/FlashVSR-v1.1 --local-dir FOLDER` any repository") \
        in caplog.text
    (tmp_path / "models").mkdir()
    for mistyped in ("models/FlashVSR", "weights/x.safetensors"):  # paths, not names
        caplog.clear()
        assert main(["frames", str(frames), str(tmp_path / "o"), "--model", mistyped]) == 2
        assert f"model {mistyped} does not exist\n" in caplog.text
    # and the other way round (the model's folder, or its single file from convert, given as the flow): said so,
    # not a list of a thousand keys that RAFT lacks
    single = tmp_path / "single.safetensors"
    assert main(["convert", str(ckpt), str(single)]) == 0
    for model in (ckpt, single):
        caplog.clear()
        assert main(["frames", str(frames), str(tmp_path / "o"), "--model", str(ckpt), "--flow", str(model)]) == 2
        assert (f"the flow weights {model} are the Stream-DiffVSR model: give it as --model; --flow takes "
                "torchvision's RAFT file") in caplog.text
    caplog.clear()  # (flow has no --model)
    assert main(["flow", str(frames), str(tmp_path / "o"), "--flow", str(single)]) == 2
    assert f"the flow weights {single} are the Stream-DiffVSR model: --flow takes torchvision's RAFT" in caplog.text
    caplog.clear()
    assert main(["frames", str(frames), str(tmp_path / "o"), "--model", str(ckpt), "--flow", str(raft),
                 "--sparse-ratio", "1.5"]) == 2
    assert "--sparse-ratio is a FlashVSR option" in caplog.text and "Traceback" not in caplog.text
    assert not (tmp_path / "o").exists()  # refused before anything was written
    with pytest.raises(SystemExit) as e:
        main(["frames", str(frames), str(tmp_path / "o"), "--model", str(ckpt), "--seed", str(2**64)])
    assert e.value.code == 2 and "2^64-1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # (a ratio that large overflowed the attention budget: a traceback)
        main(["upscale", "in.mp4", "o.mp4", "--model", str(ckpt), "--sparse-ratio", "1e308"])
    assert e.value.code == 2 and "1e308 is out of range: must be above 0 and at most 1000" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_command_lets_cudnn_pick_its_fastest_algorithms_on_a_gpu(device, monkeypatch):
    """A video's frames share one size, so the command turns cuDNN's autotuning on for a CUDA engine (ComfyUI
    leaves it to its own setting); a CPU run leaves the flag alone."""
    from types import SimpleNamespace

    from streamvsr.cli.options import EnginePlan

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    loaded = []
    family = SimpleNamespace(load_engine=lambda model, **kw: loaded.append((model, kw)) or "engine")
    plan = EnginePlan(family, {"steps": 4}, torch.device(device), torch.float16, "model-path")
    assert plan.load() == "engine"
    assert loaded == [("model-path", {"device": torch.device(device), "dtype": torch.float16, "steps": 4})]
    assert torch.backends.cudnn.benchmark == (device == "cuda")


def test_the_command_keeps_freed_memory_for_reuse(monkeypatch, tmp_path):
    """The command tunes its own process's allocator before loading anything (see runtime.keep_freed_memory)."""
    from streamvsr.models.shared import runtime

    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append(True) or True)
    assert main(["frames", "--model", str(tmp_path / "nothing"), "--flow", str(tmp_path / "none.pth"),
                 str(tmp_path / "in"), str(tmp_path / "out")]) == 2
    assert calls == [True]


def test_a_wrong_layout_setting_is_one_line_before_the_models_load(assets, tmp_path, caplog, monkeypatch):
    ckpt, raft, frames = assets
    monkeypatch.setenv("STREAMVSR_CHANNELS_LAST", "nhwc")
    loaded = []
    monkeypatch.setattr("streamvsr.models.stream_diffvsr.loader.load_pipeline", lambda *a, **k: loaded.append(a))
    assert main(["frames", str(frames), str(tmp_path / "o"), "--model", str(ckpt), "--flow", str(raft)]) == 2
    assert "STREAMVSR_CHANNELS_LAST='nhwc': use auto" in caplog.text and "Traceback" not in caplog.text
    assert not loaded and not (tmp_path / "o").exists()
    from streamvsr.models.shared.norms import layout_setting

    monkeypatch.setenv("STREAMVSR_CHANNELS_LAST", "")  # (set empty: a common way to unset it) is the default
    assert layout_setting() == "auto"


def test_out_of_memory_advice_names_the_options_of_the_model_run(assets, tmp_path):
    """Each family lists what lowers its memory; the advice names that family's options only."""
    from argparse import Namespace

    from flashvsr_helpers import write_official_folder
    from streamvsr.cli.options import memory_options

    ckpt, _, _ = assets
    flash = tmp_path / "FlashVSR-v1.1"
    write_official_folder(flash)
    assert memory_options(Namespace(command="frames", model=str(ckpt))) == ["--corr on_demand", "--flow-downscale 2"]
    assert memory_options(Namespace(command="upscale", model=None, download=True)) == ["--corr on_demand",
                                                                                       "--flow-downscale 2"]
    assert memory_options(Namespace(command="upscale", model=str(flash), download=False)) == ["--kv-ratio 2",
                                                                                             "--sparse-ratio 1.5"]
    assert memory_options(Namespace(command="flow")) == ["--corr on_demand", "--flow-downscale 2"]
    assert memory_options(Namespace(command="frames", model=str(tmp_path / "gone"))) == []
    assert memory_options(Namespace(command="convert")) == []
    # on the CPU, Stream-DiffVSR's plain layers take about half the memory of its CPU layers (fp32 only)
    assert memory_options(Namespace(command="frames", model=str(ckpt), dtype="fp32"), cpu=True) == [
        "--plain-layers", "--corr on_demand", "--flow-downscale 2"]
    assert memory_options(Namespace(command="frames", model=str(ckpt), dtype="bf16"), cpu=True)[0] == "--corr on_demand"
    assert memory_options(Namespace(command="upscale", model=str(flash), download=False), cpu=True) == [
        "--kv-ratio 2", "--sparse-ratio 1.5"]
    # what is given already, or given at a setting that takes less memory, is not advised again
    assert memory_options(Namespace(command="flow", corr="on_demand", flow_downscale=4)) == []
    assert memory_options(Namespace(command="frames", model=str(ckpt), corr="auto", flow_downscale=2)) == [
        "--corr on_demand"]
    assert memory_options(Namespace(command="upscale", model=str(flash), download=False, kv_ratio=1.0,
                                    sparse_ratio=1.75)) == ["--sparse-ratio 1.5"]
    assert memory_options(Namespace(command="frames", model=str(ckpt), dtype="fp32", plain_layers=True,
                                    corr="on_demand", flow_downscale=1), cpu=True) == ["--flow-downscale 2"]


@pytest.mark.parametrize("args, advice", [
    ("flow IN OUT --flow F --device cuda", "Try, in this order: --corr on_demand; --flow-downscale 2; smaller "
                                           "frames; --device cpu as a last resort. What was finished is kept (the "
                                           "flow fields as files)"),
    ("frames IN OUT --model M --device cuda", "Try, in this order: --dtype fp16 or bf16; "),
    ("upscale IN OUT.mp4 --model M --device cuda --dtype bf16", "Try, in this order: smaller frames; --device cpu"),
    ("convert M OUT.safetensors", "Close other programs and run it again"),
])
def test_out_of_memory_advice_names_only_options_the_command_has(args, advice, monkeypatch):
    """flow has no --dtype, convert neither --dtype nor --device nor frames, and a GPU run in bf16 needs no advice
    to use half precision."""
    import streamvsr.cli as cli

    monkeypatch.setattr(cli, "_ran_on_cpu", lambda args: False)  # (a GPU machine; M names no model: no options)
    parsed = cli.build_parser().parse_args(args.split())
    assert cli._memory_advice(parsed).startswith(advice), cli._memory_advice(parsed)
    if args.startswith(("flow", "convert")):
        assert "--dtype" not in cli._memory_advice(parsed)


def test_out_of_memory_advice_for_a_resume_job_says_which_options_continue_it(assets, tmp_path, monkeypatch):
    """A --resume checkpoint continues only with the settings it was made with: the advice said the work was kept
    and then named options (--flow-downscale, --dtype, FlashVSR's ratios) with which the job is refused after the
    model has loaded, and can only start over."""
    import streamvsr.cli as cli
    from flashvsr_helpers import write_official_folder

    ckpt, _, _ = assets
    flash = tmp_path / "FlashVSR-v1.1"
    write_official_folder(flash)
    monkeypatch.setattr(cli, "_ran_on_cpu", lambda args: True)

    def advice(line):
        return cli._memory_advice(cli.build_parser().parse_args(line.split()))

    assert advice(f"frames IN OUT --model {ckpt} --flow F --resume") == (
        "Try, in this order: --plain-layers; --corr on_demand (--resume continues the job with these); then "
        "--flow-downscale 2; --dtype bf16; smaller frames (with these the --resume job starts over, --overwrite: its "
        "checkpoint holds the settings it was made with). What was finished is kept (frames as files, a video as its "
        "partial file or --resume checkpoint)")
    assert advice(f"upscale IN OUT.mp4 --model {flash} --resume").startswith(
        "Try, in this order: --kv-ratio 2; --sparse-ratio 1.5; --dtype bf16; smaller frames (with these the --resume "
        "job starts over")
    assert "--resume" not in advice(f"frames IN OUT --model {ckpt} --flow F").split("What was finished")[0]
    # on a GPU: the CPU continues the job where the precision was given (auto picks fp32 there, half precision here)
    monkeypatch.setattr(cli, "_ran_on_cpu", lambda args: False)
    assert advice(f"upscale IN OUT.mp4 --model {ckpt} --flow F --resume --dtype bf16").startswith(
        "Try, in this order: --corr on_demand (--resume continues the job with these); then --flow-downscale 2; "
        "smaller frames (with these the --resume job starts over, --overwrite: its checkpoint holds the settings it "
        "was made with); --device cpu as a last resort, which continues the job. What was finished")
    assert advice(f"upscale IN OUT.mp4 --model {ckpt} --flow F --resume").startswith(
        "Try, in this order: --corr on_demand (--resume continues the job with these); then --flow-downscale 2; "
        "smaller frames; --device cpu as a last resort (with these")


def test_each_command_help_describes_its_own_options(capsys):
    """`frames` has no --download and computes in fp32 by default; `upscale` has both and defaults to auto."""

    def help_of(command):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        # each option's entry: its line and the indented lines of help after it
        entries = re.split(r"\n(?=  -)", capsys.readouterr().out)
        return {option: " ".join(next(e for e in entries if e.lstrip().startswith(option)).split()) for option in
                ("--flow FLOW", "--dtype {")}

    frames, upscale = help_of("frames"), help_of("upscale")
    assert "--download" not in frames["--flow FLOW"] and "(needed)" in frames["--flow FLOW"]
    assert "except with --download" in upscale["--flow FLOW"]
    assert "default fp32" in frames["--dtype {"] and "default auto" in upscale["--dtype {"]


def test_a_file_that_is_not_weights_as_flow_says_so_without_torchs_advice(assets, tmp_path, caplog):
    """A video given as --flow: torch's refusal advises `weights_only=False`, which must not reach the user."""
    ckpt, _, frames = assets
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41" + bytes(range(256)) * 16)
    assert main(["frames", str(frames), str(tmp_path / "out"), "--model", str(ckpt), "--flow", str(video),
                 "--device", "cpu"]) == 2
    assert f"cannot read {video} (4,128 bytes): not a PyTorch weights file" in caplog.text
    assert "weights_only" not in caplog.text and "RAFT" in caplog.text


def test_16_bit_frames_saved_as_8_bit_pngs_are_said_before_the_model_loads(tmp_path, caplog):
    """--save png writes 8 bits: with 16-bit frames in, the warning names png16 (said before the model loads, so
    a missing model does not hide it)."""
    from streamvsr.video.frames import write_png16

    frames = tmp_path / "in"
    frames.mkdir()
    write_png16(frames / "f0.png", np.full((8, 12, 3), 40000, np.uint16))
    code = main(["frames", str(frames), str(tmp_path / "out"), "--model", str(tmp_path / "missing")])
    assert code == 2 and "the frames are 16-bit PNGs; --save png writes 8 bits (--save png16 keeps 16)" in caplog.text
    caplog.clear()
    main(["frames", str(frames), str(tmp_path / "out"), "--model", str(tmp_path / "missing"), "--save", "png16"])
    assert "16-bit PNGs" not in caplog.text
    # one 16-bit frame among 8-bit ones, not the first: said too (only the first frame was looked at)
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(frames / "a.png")
    caplog.clear()
    main(["frames", str(frames), str(tmp_path / "out"), "--model", str(tmp_path / "missing")])
    assert "1 of the 2 frames (f0.png the first) are 16-bit PNGs; --save png writes 8 bits" in caplog.text


def test_the_readme_command_reference_names_every_command_and_option():
    """Each command of ``streamvsr`` has its row in the README (a row starting "`streamvsr NAME"), and each of its
    long options appears in the command line section; help-less hidden ones aside."""
    import argparse
    from pathlib import Path

    from streamvsr.cli import build_parser

    text = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"upscale", "frames", "flow", "convert", "download"} <= commands.keys()
    for name, parser in commands.items():
        assert f"| `streamvsr {name} " in section, f"no row for streamvsr {name}"
        options = [o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings
                   if o.startswith("--") and o != "--help"]
        assert options or name == "download", name
        missing = [o for o in options if not re.search(rf"`[^`]*{re.escape(o)}(?![\w-])", section)]
        assert not missing, f"streamvsr {name}: the README does not mention {missing}"

