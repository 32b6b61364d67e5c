"""The streaming FlashVSR engine end to end on a tiny random checkpoint in the official file formats.

What is checked against independent facts: frame counts (one output per input), alignment (AdaIN makes output
frame i take LR frame i's colour statistics), sizes (exactly scale x input), splits (any way of feeding the frames
gives the same bits), seeds, resume states, scene cuts, bad inputs and the command line. Agreement with the
official pipeline's numbers is checked outside CI against the official code (README, "How the output relates to
the official pipeline", FlashVSR).
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from flashvsr_helpers import write_official_folder
from streamvsr.models.flashvsr import load_engine
from streamvsr.models.flashvsr.engine import FlashVSRState
from streamvsr.models.shared.errors import UserInputError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("flashvsr") / "FlashVSR-v1.1"
    write_official_folder(path, seed=3)
    return path


@pytest.fixture(scope="module")
def engine(folder):
    return load_engine(folder, device="cpu", dtype=torch.float32)


def _frames(n, h=32, w=32, seed=0):
    """A drifting random pattern, so consecutive frames are related as in a video."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, h + n, w + 2 * n, generator=g)
    return torch.stack([base[:, i: i + h, 2 * i: 2 * i + w] for i in range(n)])


def _run(engine, frames, splits=None, seed=42):
    state = engine.new_state(seed)
    outs = []
    sizes = splits or [len(frames)]
    start = 0
    for size in sizes:
        out, state = engine.push(state, frames[start:start + size])
        outs.append(out)
        start += size
    assert start == len(frames)
    out, state = engine.flush(state)
    outs.append(out)
    return torch.cat(outs), state


@pytest.fixture(scope="module")
def whole30(engine):
    frames = _frames(30)
    return frames, _run(engine, frames)[0]


def test_any_split_gives_the_same_frames(engine, whole30):
    frames, whole = whole30
    assert whole.shape == (30, 3, 128, 128) and whole.dtype == torch.float32
    assert 0 <= whole.min() and whole.max() <= 1 and whole.std() > 0.05
    for splits in ([1] * 3 + [7, 8, 8, 4], [8, 8, 8, 6], [25, 5]):
        got, _ = _run(engine, frames, splits)
        assert torch.equal(got, whole), splits


def test_output_comes_in_chunks_four_frames_behind(engine):
    frames = _frames(34)
    state = engine.new_state(1)
    returned = []
    for i in range(34):
        out, state = engine.push(state, frames[i])
        returned.append(out.shape[0])
        assert engine.pending(state) == i + 1 - sum(returned)
    # chunk 0 needs LR frames 0..24 and finishes 0..20; chunk 1 needs up to 32 and finishes 21..28
    assert [i for i, n in enumerate(returned) if n] == [24, 32]
    assert returned[24] == 21 and returned[32] == 8
    out, state = engine.flush(state)
    assert out.shape[0] == 34 - 29 and engine.pending(state) == 0


@pytest.mark.parametrize("n", [1, 2, 20, 21, 22, 29, 33])
def test_one_output_per_input_frame(engine, n):
    out, _ = _run(engine, _frames(n, h=16, w=24))
    assert out.shape == (n, 3, 64, 96)


def test_output_frame_i_belongs_to_input_frame_i(engine):
    """With AdaIN each output frame takes its LR frame's per-channel mean: give every frame its own colour."""
    n = 26
    g = torch.Generator().manual_seed(5)
    colours = torch.rand(n, 3, 1, 1, generator=g) * 0.6 + 0.2
    frames = (colours + 0.05 * torch.rand(n, 3, 32, 32, generator=g)).clamp(0, 1)
    out, _ = _run(engine, frames)
    means = out.mean(dim=(2, 3))
    lr_means = frames.mean(dim=(2, 3))
    nearest = torch.cdist(means, lr_means).argmin(dim=1)
    assert torch.equal(nearest, torch.arange(n))
    assert (means - lr_means).abs().max() < 0.02


def test_output_frame_i_is_decoded_with_input_frame_i(folder, monkeypatch):
    """The same without colour correction, which would hide frames one position off (AdaIN gives each output its
    reference frame's mean whatever was decoded): each output frame is the decoder's frame whose conditioning is
    LR frame i (the conditioning is that frame upscaled: averaged back down it is nearest to frame i)."""
    eng = load_engine(folder, device="cpu", dtype=torch.float32, color_fix="none")
    decoded = []
    decode = eng.pipeline.tc_decoder.decode

    def recording(latents, cond, state=None, **options):
        video, new = decode(latents, cond, state, **options)
        decoded.append((video, cond))
        return video, new

    monkeypatch.setattr(eng.pipeline.tc_decoder, "decode", recording)
    n = 26
    frames = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(9))  # unrelated frames
    out, _ = _run(eng, frames)
    video = torch.cat([v for v, _ in decoded], dim=2)[0].transpose(0, 1)
    cond = torch.cat([c for _, c in decoded], dim=2)[0].transpose(0, 1)
    rgb = ((video.float() + 1) / 2).clamp(0, 1)
    lr_of = (torch.nn.functional.avg_pool2d(cond.float(), 4) + 1) / 2  # each decoded frame's LR frame
    for i in range(n):
        k = (rgb - out[i]).flatten(1).abs().amax(dim=1).argmin()
        assert torch.equal(rgb[k], out[i])
        assert (lr_of[k] - frames).flatten(1).abs().mean(dim=1).argmin() == i


def test_colour_statistics_are_those_of_the_visible_frame(engine):
    """Where the output is padded to multiples of 128 (80x144 -> 128x256, the last row and column repeated),
    AdaIN takes the mean of the frame returned, as the official code (which crops instead) does: a dark bottom
    and right edge, repeated into the padding, must not darken the picture."""
    from PIL import Image

    n = 26
    g = torch.Generator().manual_seed(7)
    frames = 0.6 + 0.3 * torch.rand(n, 3, 20, 36, generator=g)
    frames[:, :, -1, :] = 0.0
    frames[:, :, :, -1] = 0.0
    out, _ = _run(engine, frames)
    assert out.shape == (n, 3, 80, 144)

    def bicubic(frame):  # the official preprocessing's upscale, on 8-bit pixels
        pixels = (frame.permute(1, 2, 0) * 255).round().byte().numpy()
        return torch.from_numpy(np.array(Image.fromarray(pixels).resize((144, 80), Image.BICUBIC))) / 255.0

    want = torch.stack([bicubic(f).mean(dim=(0, 1)) for f in frames])
    # up to what clamping to [0, 1] moves (a random decoder's spread is wide); statistics of the padded frame
    # were off by up to 0.5 here
    assert (out.mean(dim=(2, 3)) - want).abs().max() < 0.05


def test_sizes_are_exactly_scale_times_the_input(folder):
    eng = load_engine(folder, device="cpu", dtype=torch.float32, scale=2)
    frames = _frames(3, h=20, w=36)
    out, _ = _run(eng, frames)
    assert out.shape == (3, 3, 40, 72)
    # the network ran at 128x128 (padded), and only the padding was cropped off
    eng4 = load_engine(folder, device="cpu", dtype=torch.float32)
    assert _run(eng4, frames)[0].shape == (3, 3, 80, 144)


def test_seeds_reproduce_and_differ(engine, whole30):
    frames, whole = whole30
    again, _ = _run(engine, frames)
    other, _ = _run(engine, frames, seed=43)
    assert torch.equal(again, whole)
    assert (other - whole).abs().max() > 1e-2


def test_the_state_survives_a_round_trip_through_a_resume_file(engine, whole30, tmp_path):
    from safetensors.torch import load_file, save_file

    frames, whole = whole30
    state = engine.new_state(42)
    first, state = engine.push(state, frames[:27])  # mid-stream: chunk 0 done, frames held back
    assert engine.pending(state) == 6
    tensors, meta = state.to("cpu").to_dict()
    save_file(tensors, str(tmp_path / "s.safetensors"), metadata=meta)
    restored = engine.state_from_dict(load_file(str(tmp_path / "s.safetensors")), meta)
    assert isinstance(restored, FlashVSRState)
    rest, restored = engine.push(restored, frames[27:])
    tail, _ = engine.flush(restored)
    assert torch.equal(torch.cat([first, rest, tail]), whole)
    # damaged or edited: refused when read, not mid-chunk or as frames of NaN
    cache = next(k for k in tensors if k.endswith(".k"))
    for broken in ({**tensors, cache: torch.full_like(tensors[cache], float("nan"))},
                   {**tensors, "generator_state": tensors["generator_state"][:7].clone()}):
        with pytest.raises((ValueError, RuntimeError)):
            engine.state_from_dict(broken, meta)


def test_a_restored_state_is_on_the_engine_device(engine, whole30, monkeypatch):
    """Resume files hold CPU tensors; push and flush take a state as it is, so restoring puts it on the engine's
    device (the meta device stands in for a GPU)."""
    frames, _ = whole30
    _, state = engine.push(engine.new_state(42), frames[:27])
    tensors, meta = state.to("cpu").to_dict()
    monkeypatch.setattr(engine, "device", torch.device("meta"))
    restored = engine.state_from_dict(tensors, meta)
    moved = {k: v.device.type for k, v in restored.to_dict()[0].items() if k != "generator_state"}
    assert len(moved) > 3 and set(moved.values()) == {"meta"}, moved


def test_flex_attention_that_fails_to_compile_falls_back_to_gather(folder, whole30, caplog, monkeypatch):
    """A compiled FlexAttention that cannot be built (no Triton, an old PyTorch) costs a warning, not the run:
    the engine continues with the gather attention, which computes the same."""
    from streamvsr.models.flashvsr import attention as A

    frames, whole = whole30
    monkeypatch.setattr(A, "_FLEX_FAILED", {})
    flex = load_engine(folder, device="cpu", dtype=torch.float32)
    flex.attention = "flex"
    calls = []

    def cannot_compile(*args, **kwargs):
        calls.append(1)
        raise A.FlexCompileError("BackendCompilerFailed: Cannot find a working triton installation")

    # as on a GPU: the compiled FlexAttention while the engine is set to flex
    monkeypatch.setattr(flex, "_attention", lambda: ("flex", cannot_compile) if flex.attention == "flex"
                        else ("gather", None))
    with caplog.at_level("WARNING"):
        got, _ = _run(flex, frames)
    assert calls == [1] and flex.attention == "gather"
    assert [r.getMessage() for r in caplog.records if "FlexAttention" in r.getMessage()] == [
        "FlashVSR: FlexAttention failed (BackendCompilerFailed: Cannot find a working triton installation); "
        "using the gather attention, which computes the same"]
    assert torch.equal(got, whole)
    # remembered for the process: the next engine on that device takes gather without trying again
    assert A.flex_failure("cpu") == "BackendCompilerFailed: Cannot find a working triton installation"
    monkeypatch.setattr(A, "_FLEX_FAILED", {"cuda:0": "BackendCompilerFailed: no triton"})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: True)
    assert A.flex_unavailable("cuda:0") == "it failed earlier in this session (BackendCompilerFailed: no triton)"
    later = load_engine(folder, device="cpu", dtype=torch.float32)
    later.attention, later.device = "flex", torch.device("cuda:0")  # a GPU engine, as far as the choice goes
    monkeypatch.setattr("streamvsr.models.flashvsr.engine.compiled_flex_attention",
                        lambda: pytest.fail("compiled again after it failed"))
    assert later._attention() == ("gather", None) and later.attention == "gather"


def test_flex_attention_failing_midway_through_a_pass_goes_on_with_gather(folder, whole30, caplog, monkeypatch):
    """Each new shape compiles anew (the first chunk's keys, the later chunks' longer ones), so a compile can fail
    at a block of a later pass whose earlier blocks have already replaced their caches in the state: the pass must
    go on from that block with gather, not run again on a cache that holds this chunk's keys twice."""
    from torch.nn.attention.flex_attention import flex_attention

    from streamvsr.models.flashvsr import attention as A

    frames, whole = whole30
    monkeypatch.setattr(A, "_FLEX_FAILED", {})
    flex = load_engine(folder, device="cpu", dtype=torch.float32)
    flex.attention = "flex"
    blocks = len(flex.pipeline.dit.blocks)
    calls = []

    def fails_at_chunk_1_block_1(*args, **kwargs):
        calls.append(1)
        if len(calls) == blocks + 2:
            raise A.FlexCompileError("InductorError: a shape that did not compile")
        return flex_attention(*args, **kwargs)  # (eager: what the compiled one computes)

    monkeypatch.setattr(flex, "_attention", lambda: ("flex", fails_at_chunk_1_block_1) if flex.attention == "flex"
                        else ("gather", None))
    first, state = flex.push(flex.new_state(42), frames)  # chunk 0, all in FlexAttention
    assert len(calls) == blocks and flex.attention == "flex"
    with caplog.at_level("WARNING"):
        rest, _ = flex.flush(state, consume=True)  # chunk 1 replaces the state's caches block by block
    assert len(calls) == blocks + 2 and flex.attention == "gather"
    assert [r.getMessage() for r in caplog.records if "FlexAttention" in r.getMessage()] == [
        "FlashVSR: FlexAttention failed (InductorError: a shape that did not compile); using the gather "
        "attention, which computes the same"]
    got = torch.cat([first, rest])
    assert got.shape == whole.shape and (got - whole).abs().max() <= 1e-5


def test_compiled_flex_reports_compiler_failures_and_passes_out_of_memory(monkeypatch):
    from streamvsr.models.flashvsr import attention as A
    from streamvsr.models.shared.runtime import OUT_OF_MEMORY

    pytest.importorskip("torch.nn.attention.flex_attention")
    failure = [RuntimeError("Cannot find a working triton installation.\nmore lines")]

    def fake_compile(fn, dynamic=None, mode=None):
        def run(*args, **kwargs):
            raise failure[0]
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    run = A.compiled_flex_attention()
    with pytest.raises(A.FlexCompileError, match=r"^RuntimeError: Cannot find a working triton installation\.$"):
        run()
    failure[0] = OUT_OF_MEMORY("CUDA out of memory")
    with pytest.raises(OUT_OF_MEMORY):
        run()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_comfyui_check.sh runs it)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_flex_equals_gather_on_a_gpu(folder, dtype):
    """What 'auto' picks on CUDA (FlexAttention compiled by Triton) against the gather attention, which the CPU
    tests check against the official arithmetic: the same frames up to float rounding. In bf16 a tiny random model
    carries any change of rounding to about 0.1 over 30 frames (measured on the CPU: bf16 gather against fp32
    gather), so there flex must be as close to the fp32 gather as the bf16 gather is."""
    from streamvsr.models.flashvsr import attention as A

    reason = A.flex_unavailable("cuda")
    if reason is not None:
        pytest.skip(f"FlexAttention cannot run here: {reason}")
    frames = _frames(30, 64, 64)
    flex = load_engine(folder, device="cuda", dtype=dtype, attention="flex")
    gather = load_engine(folder, device="cuda", dtype=dtype, attention="gather")
    a, _ = _run(flex, frames)
    assert flex.attention == "flex"  # it compiled: no fallback
    b, _ = _run(gather, frames)
    assert a.shape == b.shape == (30, 3, 256, 256)
    if dtype == torch.float32:
        assert (a - b).abs().max() <= 1e-4, (a - b).abs().max()
        return
    reference, _ = _run(load_engine(folder, device="cuda", dtype=torch.float32, attention="gather"), frames)
    flex_error, gather_error = (a.float() - reference).abs(), (b.float() - reference).abs()
    assert flex_error.mean() <= 1.5 * gather_error.mean() + 1e-3, (flex_error.mean(), gather_error.mean())
    assert flex_error.max() <= 1.5 * gather_error.max() + 1e-2, (flex_error.max(), gather_error.max())


def test_attention_auto_takes_flex_only_where_it_can_run(monkeypatch, caplog):
    from streamvsr.models.flashvsr import attention as A

    monkeypatch.setattr(A, "flex_unavailable", lambda device: None)
    assert A.choose_attention("auto", "cuda") == A.choose_attention("flex", "cuda") == "flex"
    assert A.choose_attention("gather", "cuda") == "gather"
    monkeypatch.setattr(A, "flex_unavailable", lambda device: "Triton is not installed")
    with caplog.at_level("INFO"):
        assert A.choose_attention("auto", "cuda") == "gather"
    assert "FlexAttention is unavailable: Triton is not installed" in caplog.text
    with pytest.raises(UserInputError, match="Triton is not installed"):
        A.choose_attention("flex", "cuda")
    with pytest.raises(UserInputError, match="auto, gather or flex"):
        A.choose_attention("fast", "cuda")


def test_flex_needs_cuda_and_triton(monkeypatch):
    from streamvsr.models.flashvsr import attention as A

    assert A.flex_unavailable("cpu") == A.flex_unavailable(torch.device("mps")) == "it is compiled for CUDA GPUs only"
    pytest.importorskip("torch.utils._triton")
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: False)
    assert "Triton is not installed" in A.flex_unavailable("cuda")
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: True)
    capability = {"cuda:0": (8, 6), "cuda:1": (6, 1)}  # has_triton() is content with any one of them
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[str(device)])
    monkeypatch.setattr(torch.version, "hip", None)
    assert A.flex_unavailable("cuda:0") is None
    assert A.flex_unavailable("cuda:1") == "this GPU (compute capability 6.1) is older than Triton's 7.0"


def test_inf_or_nan_in_the_output_is_an_error(engine, whole30, monkeypatch):
    from streamvsr.models.shared.errors import PrecisionError

    frames, _ = whole30
    decode = engine.pipeline.tc_decoder.decode

    def broken(*args, **kwargs):
        video, state = decode(*args, **kwargs)
        return video * float("nan"), state

    monkeypatch.setattr(engine.pipeline.tc_decoder, "decode", broken)
    with pytest.raises(PrecisionError, match="FlashVSR computed inf or NaN in float32: the weights may be damaged"):
        engine.push(engine.new_state(42), frames[:25])


def test_an_overflow_of_the_dit_alone_is_an_error(engine, whole30, monkeypatch):
    """An inf from the DiT's output layer (fp16's range) came out as finite frames: the decoder's first layer maps
    it to 3 through a tanh."""
    from streamvsr.models.shared.errors import PrecisionError

    frames, _ = whole30
    forward_chunk = engine.pipeline.dit.forward_chunk

    def overflowing(*args, **kwargs):
        velocity = forward_chunk(*args, **kwargs)
        velocity[0, 0, 0, 0, 0] = float("inf")
        return velocity

    monkeypatch.setattr(engine.pipeline.dit, "forward_chunk", overflowing)
    with pytest.raises(PrecisionError, match="FlashVSR computed inf or NaN in float32"):
        engine.push(engine.new_state(42), frames[:25])


def test_a_failed_push_leaves_the_given_state_usable(engine):
    frames = _frames(34)
    state = engine.new_state(42)
    _, state = engine.push(state, frames[:26])
    before = [(b.k.clone(), b.v.clone()) for b in state.dit.blocks]
    with pytest.raises(UserInputError, match="NaN"):
        engine.push(state, torch.full((1, 3, 32, 32), float("nan")))
    out, later = engine.push(state, frames[26:])
    assert later.chunks == 2 and out.shape[0] == 8
    # running chunk 1 did not touch the caches the earlier state holds (ComfyUI keeps it for a retry)
    assert all(torch.equal(k, b.k) and torch.equal(v, b.v) for (k, v), b in zip(before, state.dit.blocks))
    again, _ = engine.push(state, frames[26:])
    assert torch.equal(again, out)


def test_scene_cut_finishes_the_shot_and_starts_a_new_stream(engine):
    a, b = _frames(30, seed=1), _frames(6, seed=2)
    state = engine.new_state(7)
    out_a, state = engine.push(state, a)
    assert state.dit is not None  # a chunk of the first shot ran: there is attention memory to drop
    cut, state = engine.reset_temporal(state)
    assert out_a.shape[0] + cut.shape[0] == 30 and engine.pending(state) == 0
    # the second shot is not influenced by the first, but its noise continues the sequence: it equals a new
    # sequence whose generator starts where the first shot's stopped
    fresh = replace(engine.new_state(7), generator_state=state.generator_state.clone())
    out_b, state = engine.push(state, b)
    tail, _ = engine.flush(state)
    shot_b = torch.cat([out_b, tail])
    assert shot_b.shape[0] == 6
    alone_out, fresh = engine.push(fresh, b)
    alone = torch.cat([alone_out, engine.flush(fresh)[0]])
    assert torch.equal(shot_b, alone)
    assert not torch.equal(shot_b, _run(engine, b, seed=7)[0])  # (not the first shot's noise again)


def test_bad_inputs_and_options(engine, folder):
    state = engine.new_state(0)
    _, state = engine.push(state, _frames(2))
    with pytest.raises(UserInputError, match="start a new sequence"):
        engine.push(state, _frames(1, h=16))
    with pytest.raises(UserInputError, match="channels"):
        engine.push(engine.new_state(0), torch.rand(1, 2, 32, 32))
    for bad in ({"sparse_ratio": 0}, {"kv_ratio": 0.5}, {"color_fix": "magic"}, {"scale": 2.5},
                {"local_range": 0}):
        with pytest.raises(UserInputError):
            load_engine(folder, device="cpu", dtype=torch.float32, **bad)


def test_grayscale_and_rgba_frames(engine):
    gray = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    a, _ = _run(engine, gray)
    b, _ = _run(engine, gray.expand(-1, 3, -1, -1))
    c, _ = _run(engine, torch.cat([gray.expand(-1, 3, -1, -1), torch.zeros(2, 1, 32, 32)], dim=1))
    assert torch.equal(a, b) and torch.equal(a, c)


def test_command_line_frames_and_convert(folder, tmp_path, engine, caplog):
    from PIL import Image

    from streamvsr.cli import main

    frames = _frames(23)
    src = tmp_path / "in"
    src.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray((f.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(src / f"f{i:03d}.png")
    with caplog.at_level("INFO"):
        assert main(["frames", str(src), str(tmp_path / "out"), "--model", str(folder), "--save", "npy",
                     "--device", "cpu"]) == 0
    # what ran is said, as the node says it (the version taken from the folder's name here)
    assert f"loaded FlashVSR v1.1 from {folder} (torch.float32, cpu, gather attention)" in caplog.text
    got = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in got] == [f"f{i:03d}.npy" for i in range(23)]
    pngs = torch.stack([torch.from_numpy(np.asarray(Image.open(p), np.float32) / 255).permute(2, 0, 1)
                        for p in sorted(src.iterdir())])
    want, _ = _run(engine, pngs)
    assert all(np.array_equal(np.load(p), w.permute(1, 2, 0).numpy()) for p, w in zip(got, want))

    single = tmp_path / "flashvsr.safetensors"
    assert main(["convert", str(folder), str(single), "--dtype", "fp32"]) == 0
    # without --dtype, every tensor keeps its file's precision (fp32 DiT, bf16 LQ projection and prompt)
    from safetensors import safe_open

    from streamvsr.models.flashvsr.weights import read_flashvsr

    assert main(["convert", str(folder), str(tmp_path / "kept.safetensors")]) == 0
    source = read_flashvsr(folder, "v1.1", need_decoder=False)
    with safe_open(str(tmp_path / "kept.safetensors"), "pt") as f:
        assert f.metadata()["dtype"] == "as-source"
        for part in ("dit", "lq_proj"):
            for k, v in getattr(source, part).items():
                assert torch.equal(f.get_tensor(f"{part}.{k}"), v) and f.get_tensor(f"{part}.{k}").dtype == v.dtype
        assert {f.get_tensor(k).dtype for k in f.keys() if k.startswith("dit.")} == {torch.float32}
        assert {f.get_tensor(k).dtype for k in f.keys() if k.startswith("lq_proj.")} == {torch.bfloat16}
    assert main(["frames", str(src), str(tmp_path / "out2"), "--model", str(single), "--save", "npy",
                 "--device", "cpu"]) == 0
    assert [p.name for p in sorted((tmp_path / "out2").iterdir())] == [p.name for p in got]
    assert all(np.array_equal(np.load(a), np.load(b))
               for a, b in zip(got, sorted((tmp_path / "out2").iterdir())))
    # the command line takes the scales the engine and the node take (1-8), not only the trained 4
    assert main(["frames", str(src), str(tmp_path / "x5"), "--model", str(single), "--save", "npy",
                 "--device", "cpu", "--scale", "5"]) == 0
    h, w = frames.shape[-2:]
    assert {np.load(p).shape for p in (tmp_path / "x5").iterdir()} == {(5 * h, 5 * w, 3)}
    # a Stream-DiffVSR option with a FlashVSR model is a one-line error, before anything is written
    assert main(["frames", str(src), str(tmp_path / "out3"), "--model", str(folder), "--steps", "2"]) == 2
    assert not (tmp_path / "out3").exists()
    # the attention as on the loader node: gather anywhere, flex only where it is compiled (CUDA with Triton)
    assert main(["frames", str(src), str(tmp_path / "gather"), "--model", str(single), "--save", "npy",
                 "--device", "cpu", "--attention", "gather"]) == 0
    assert [p.name for p in sorted((tmp_path / "gather").iterdir())] == [p.name for p in got]
    assert all(np.array_equal(np.load(a), np.load(b))
               for a, b in zip(got, sorted((tmp_path / "gather").iterdir())))
    assert main(["frames", str(src), str(tmp_path / "flex"), "--model", str(single), "--device", "cpu",
                 "--attention", "flex"]) == 2
    assert "'flex' cannot be used here: it is compiled for CUDA GPUs only" in caplog.text
    assert not any(p.name.startswith("flex") for p in tmp_path.iterdir())  # nothing written, no lock left


def test_convert_from_a_dit_file_never_replaces_the_files_next_to_it(tmp_path, caplog):
    """A model named by its DiT file is read with the files next to it (a port's layout, all .safetensors): none
    of them may become the output, not even with --overwrite."""
    from flashvsr_helpers import write_repackaged
    from streamvsr.cli import main

    folder = tmp_path / "lab"
    write_repackaged(folder, "1038lab")
    lq = folder / "LQ_proj_in.safetensors"
    before = lq.read_bytes()
    assert main(["convert", str(folder / "FlashVSR1_1.safetensors"), str(lq), "--overwrite",
                 "--flashvsr-version", "v1.1"]) == 2
    assert "is the input" in caplog.text and lq.read_bytes() == before
    assert main(["convert", str(folder / "FlashVSR1_1.safetensors"), str(tmp_path / "one.safetensors"),
                 "--flashvsr-version", "v1.1"]) == 0


def test_a_sparse_ratio_too_small_for_the_frame_size_is_one_line_before_any_work(folder, monkeypatch):
    engine = load_engine(folder, device="cpu", dtype=torch.float32, sparse_ratio=0.01)
    monkeypatch.setattr(type(engine), "_condition", lambda *a: pytest.fail("computed something"))
    with pytest.raises(UserInputError, match=r"sparse_ratio 0.01 leaves no attention budget at a 128x128 output "
                                             r"\(padded\): use at least 0.0167"):
        engine.push(engine.new_state(0), _frames(2, h=8, w=8))
    monkeypatch.undo()
    out, _ = _run(load_engine(folder, device="cpu", dtype=torch.float32, sparse_ratio=0.0167),
                  _frames(2, h=8, w=8))  # the least it names works
    assert out.shape == (2, 3, 32, 32)


def test_the_commands_find_a_sparse_ratio_too_small_for_the_input_before_loading(folder, tmp_path, caplog,
                                                                                 monkeypatch):
    av = pytest.importorskip("av")
    from PIL import Image
    from test_video import make_clip

    import streamvsr.models.flashvsr as flashvsr
    from streamvsr.cli import main

    monkeypatch.setattr(flashvsr, "load_pipeline", lambda *a, **k: pytest.fail("loaded the weights"))
    clip = make_clip(tmp_path / "in.mkv", n=2, w=8, h=8, audio=None, vcodec="ffv1")
    assert av.open(str(clip)).streams.video[0].width == 8
    assert main(["upscale", str(clip), str(tmp_path / "out.mkv"), "--model", str(folder), "--device", "cpu",
                 "--sparse-ratio", "0.01"]) == 2
    assert "sparse_ratio 0.01 leaves no attention budget at a 128x128 output (padded): use at least 0.0167" \
        in caplog.text
    src = tmp_path / "pngs"
    src.mkdir()
    Image.new("RGB", (8, 8)).save(src / "f0.png")
    caplog.clear()
    assert main(["frames", str(src), str(tmp_path / "out"), "--model", str(folder), "--device", "cpu",
                 "--sparse-ratio", "0.01"]) == 2
    assert "use at least 0.0167" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mkv", "pngs"]  # no output, no lock left


def test_video_file_streaming_writes_every_frame(engine, tmp_path):
    av = pytest.importorskip("av")
    from test_video import decode, make_clip

    from streamvsr.video.stream import upscale_video

    clip = make_clip(tmp_path / "in.mkv", n=27, w=32, h=24, audio="pcm", vcodec="ffv1")
    summary = upscale_video(engine, clip, tmp_path / "out.mkv", codec="lossless", seed=3)
    assert summary["frames"] == 27 and summary["size"] == (128, 96)
    got = decode(tmp_path / "out.mkv")
    assert len(got) == 27 and got[0].shape == (96, 128, 3)
    lr = [torch.from_numpy(f).permute(2, 0, 1).float() / 255 for f in decode(clip)]
    want, _ = _run(engine, torch.stack(lr), seed=3)
    want = (want.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    with av.open(str(tmp_path / "out.mkv")) as c:
        assert c.streams.audio  # audio copied through


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_fp32(folder, whole30, dtype):
    frames, whole = whole30
    eng = load_engine(folder, device="cpu", dtype=dtype)
    got, _ = _run(eng, frames[:22])
    assert got.dtype == torch.float32 and got.shape == (22, 3, 128, 128)
    reference, _ = _run(load_engine(folder, device="cpu", dtype=torch.float32), frames[:22])
    assert (got - reference).abs().mean() < 0.03


def test_video_resume_with_held_frames_equals_one_run(engine, tmp_path):
    pytest.importorskip("av")
    from test_video import decode, make_clip

    from streamvsr.video.stream import upscale_video

    clip = make_clip(tmp_path / "in.mkv", n=30, w=32, h=24, audio=None, vcodec="ffv1")
    upscale_video(engine, clip, tmp_path / "whole.mkv", codec="lossless", seed=4)
    polls = []
    out = tmp_path / "out.mkv"
    first = upscale_video(engine, clip, out, codec="lossless", seed=4, resume=True, checkpoint_frames=3,
                          should_stop=lambda: polls.append(1) or len(polls) > 27)
    # stopped after 27 LR frames: 21 written, 6 held inside the engine's checkpointed state
    assert first["interrupted"] and first["frames"] == 21
    second = upscale_video(engine, clip, out, codec="lossless", seed=4, resume=True, checkpoint_frames=3)
    assert second["resumed_from"] == 21 and second["frames"] == 30
    assert all(np.array_equal(a, b) for a, b in zip(decode(out), decode(tmp_path / "whole.mkv")))
    assert len(decode(out)) == 30


def test_frames_resume_with_held_frames_equals_one_run(engine, tmp_path, monkeypatch):
    """A `frames` job stopped mid-chunk keeps the frames the engine holds in its checkpoint, and continues them."""
    from PIL import Image

    from streamvsr.video.frames import upscale_folder
    from streamvsr.video.resume import ResumeFiles

    folder = tmp_path / "in"
    folder.mkdir()
    for i, frame in enumerate(_frames(30)):
        Image.fromarray((frame.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()).save(folder / f"{i:02d}.png")
    files = sorted(folder.iterdir())
    upscale_folder(engine, files, tmp_path / "whole", save="npy")

    class StopsAtPush:
        def __init__(self, at):
            self.pushes, self.at = 0, at

        def __getattr__(self, name):
            return getattr(engine, name)

        def push(self, state, frames, consume=False):
            self.pushes += 1
            if self.pushes > self.at:
                raise KeyboardInterrupt
            return engine.push(state, frames, consume)

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        upscale_folder(StopsAtPush(27), files, out, save="npy", resume=True)
    info = ResumeFiles(out).read_info()
    assert (info["consumed"], info["frames"]) == (27, 21)  # 6 frames held in the checkpointed state
    resumed = StopsAtPush(30)
    assert upscale_folder(resumed, files, out, save="npy", resume=True) == 30
    assert resumed.pushes == 3
    for name in [f"{i:02d}.npy" for i in range(30)]:
        assert np.array_equal(np.load(out / name), np.load(tmp_path / "whole" / name)), name
    # a stop asked for before the 28th frame (a first Ctrl-C): the held frames stay in the checkpoint, not finished
    out, polls = tmp_path / "asked", []
    assert upscale_folder(engine, files, out, save="npy", resume=True,
                          should_stop=lambda: polls.append(1) or len(polls) > 27) == 21
    info = ResumeFiles(out).read_info()
    assert (info["consumed"], info["frames"]) == (27, 21) and len(list(out.iterdir())) == 21
    assert upscale_folder(engine, files, out, save="npy", resume=True) == 30
    for name in [f"{i:02d}.npy" for i in range(30)]:
        assert np.array_equal(np.load(out / name), np.load(tmp_path / "whole" / name)), name
    # a stop mid-way through a burst (the first 21 frames come out at once): the checkpoint is the state before
    # that push, and the outputs already written of the burst are its own, replaced by the next run
    import streamvsr.video.frames as frames_module

    out, saved = tmp_path / "burst", frames_module.save_frame

    def stopped_at_the_sixth(hr, stem, fmt, **options):
        if stem.name == "05":
            raise KeyboardInterrupt
        return saved(hr, stem, fmt, **options)

    monkeypatch.setattr(frames_module, "save_frame", stopped_at_the_sixth)
    with pytest.raises(KeyboardInterrupt):
        upscale_folder(engine, files, out, save="npy", resume=True)
    monkeypatch.undo()
    info = ResumeFiles(out).read_info()
    assert (info["consumed"], info["frames"], info["after"]) == (24, 0, [f"{i:02d}.npy" for i in range(5)])
    # a continued run stopped before it writes them again still counts them as the job's own
    with pytest.raises(KeyboardInterrupt):
        upscale_folder(StopsAtPush(0), files, out, save="npy", resume=True)
    assert ResumeFiles(out).read_info()["after"] == [f"{i:02d}.npy" for i in range(5)]
    assert upscale_folder(engine, files, out, save="npy", resume=True) == 30
    for name in [f"{i:02d}.npy" for i in range(30)]:
        assert np.array_equal(np.load(out / name), np.load(tmp_path / "whole" / name)), name


def _live_kv_bytes() -> int:
    """Bytes of every attention cache block alive in the process (shared storage counted once)."""
    import gc

    from streamvsr.models.flashvsr.attention import BlockKV

    seen, total = set(), 0
    for o in gc.get_objects():
        if type(o) is BlockKV:  # (isinstance would touch every object, deprecated ones warn)
            for t in (o.k, o.v, o.k_mean):
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total


def test_a_consumed_state_gives_the_same_frames_with_one_attention_cache_alive(engine, whole30):
    """Kept, the caller's state holds its whole cache while the next one is built; consumed, each block's old cache
    goes as its successor is made (one cache alive). Within one call the engine's own intermediate states are let
    go either way: a flush of two chunks (30 frames) holds the caller's cache and one more, not two more."""
    frames, expected = whole30
    peaks: list = []
    hooks = [block.register_forward_pre_hook(lambda m, a: peaks.append(_live_kv_bytes()))
             for block in engine.pipeline.dit.blocks]
    try:
        for consume in (False, True):
            base = _live_kv_bytes()
            state, outs, cache = engine.new_state(42), [], 0
            peaks.clear()
            for i in range(len(frames)):
                out, state = engine.push(state, frames[i:i + 1], consume=consume)
                outs.append(out)
                cache = max(cache, state.dit.nbytes() if state.dit is not None else 0)
            push_peak = max(p - base for p in peaks)
            peaks.clear()
            out, state = engine.flush(state, consume=consume)
            outs.append(out)
            flush_peak = max(p - base for p in peaks)
            assert len(peaks) == 2 * len(engine.pipeline.dit.blocks)  # two chunks
            assert torch.equal(torch.cat(outs), expected)
            if consume:
                assert 0 < push_peak <= cache and flush_peak <= cache
            else:
                assert cache < flush_peak <= 2 * cache
    finally:
        for hook in hooks:
            hook.remove()
