"""End-to-end engine tests on a tiny random checkpoint in the official layout.

The reference below re-implements the official per-frame loop (spec §3) with diffusers' UNet, ControlNet and
DDIMScheduler, transformers' CLIP text model and tokenizer, torchvision's RAFT, and the spec's warp formula.
Only the temporal tiny autoencoder is ours (it has no library equivalent; tests/test_tiny_vae.py checks it
against diffusers' AutoencoderTiny and the spec's TPM formulas).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import make_tiny_checkpoint

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
tv_flow = pytest.importorskip("torchvision.models.optical_flow")

from streamvsr.models.stream_diffvsr.engine import StreamEngine, StreamState  # noqa: E402
from streamvsr.models.stream_diffvsr.loader import load_pipeline  # noqa: E402

LR_H, LR_W = 32, 40  # HR 128x160: the smallest size torchvision's RAFT accepts unpadded


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def raft():
    torch.manual_seed(1)
    model = tv_flow.raft_small(weights=None).eval()
    return model


@pytest.fixture(scope="module")
def frames():
    g = torch.Generator().manual_seed(3)
    base = torch.rand(3, LR_H + 8, LR_W + 8, generator=g)
    # A moving crop of one texture, so consecutive frames are related by a translation, like video.
    return [base[:, i: i + LR_H, 2 * i: 2 * i + LR_W].contiguous() for i in range(4)]


def _flow_fn(raft):
    def flow(image1, image2):
        with torch.no_grad():
            return raft(image1, image2, num_flow_updates=4)[-1]
    return flow


def spec_warp(x, flow):
    """Spec §3.5 written out: align_corners=True normalisation, sampled with align_corners=False."""
    _, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    gx = xs[None] + flow[:, 0]
    gy = ys[None] + flow[:, 1]
    grid = torch.stack([2 * gx / max(w - 1, 1) - 1, 2 * gy / max(h - 1, 1) - 1], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def reference_run(folder, frames, raft, seed, steps=4):
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    controlnet = diffusers.ControlNetModel.from_pretrained(folder / "controlnet").eval()
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    ours = load_pipeline(folder)  # only its temporal VAE is used here
    vae = ours.vae
    with torch.no_grad():
        ids = tokenizer("", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        embeds = text_encoder(ids)[0]
        generator = torch.Generator().manual_seed(seed)
        latents = [torch.randn((1, 4, LR_H, LR_W), generator=generator) for _ in frames]
        scheduler.set_timesteps(steps)
        outputs, prev_out, prev_up = [], None, None
        for i, frame in enumerate(frames):
            lr = frame[None] * 2 - 1
            up = F.interpolate(lr, scale_factor=4, mode="bicubic")
            warped = temporal = None
            if i > 0:
                flow = _flow_fn(raft)(up, prev_up)
                warped = spec_warp(prev_out, flow)
                temporal = vae.encode_features(warped)[::-1]
            z = latents[i]
            for t in scheduler.timesteps:
                inp = torch.cat([z, lr], dim=1)
                down = mid = None
                if warped is not None:
                    down, mid = controlnet(inp, t, encoder_hidden_states=embeds, controlnet_cond=warped,
                                           conditioning_scale=1.0, return_dict=False)
                v = unet(inp, t, encoder_hidden_states=embeds, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]
                z = scheduler.step(v, t, z).prev_sample
            out = vae.decode(z, temporal)
            outputs.append((out / 2 + 0.5).clamp(0, 1))
            prev_out, prev_up = out, up
    return outputs


def run_engine(engine, frames, state):
    outs = []
    for f in frames:
        hr, state = engine.step(f, state)
        outs.append(hr)
    return outs, state


def test_matches_reference_pipeline(checkpoint, raft, frames):
    expected = reference_run(checkpoint, frames, raft, seed=42)
    engine = StreamEngine(load_pipeline(checkpoint), _flow_fn(raft))
    got, state = run_engine(engine, frames, engine.new_state(42))
    assert state.frame_index == 4
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == (1, 3, 4 * LR_H, 4 * LR_W)
        err = (a - b).abs().max().item()
        assert err <= 1e-5, f"frame {i}: max abs error {err}"
    # The temporal path must matter: frame 1 without the previous frame's guidance differs.
    alone, _ = engine.step(frames[1], engine.new_state(42))
    assert (alone - got[1]).abs().max() > 1e-4


@pytest.mark.parametrize("split", [1, 2, 3])
def test_chunked_equals_one_call(checkpoint, raft, frames, split):
    engine = StreamEngine(load_pipeline(checkpoint), _flow_fn(raft))
    whole, _ = run_engine(engine, frames, engine.new_state(7))
    first, state = run_engine(engine, frames[:split], engine.new_state(7))
    # The state survives a round trip through its serialised form (as when resuming a job).
    tensors, meta = state.to_dict()
    state = StreamState.from_dict(tensors, meta)
    second, _ = run_engine(engine, frames[split:], state)
    for a, b in zip(whole, first + second):
        assert torch.equal(a, b)


def test_seed_reproduces_and_differs(checkpoint, raft, frames):
    engine = StreamEngine(load_pipeline(checkpoint), _flow_fn(raft))
    a, _ = run_engine(engine, frames[:2], engine.new_state(5))
    b, _ = run_engine(engine, frames[:2], engine.new_state(5))
    c, _ = run_engine(engine, frames[:2], engine.new_state(6))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all((x - y).abs().max() > 1e-4 for x, y in zip(a, c))


def test_step_does_not_mutate_inputs(checkpoint, raft, frames):
    engine = StreamEngine(load_pipeline(checkpoint), _flow_fn(raft))
    _, state = engine.step(frames[0], engine.new_state(1))
    frame = frames[1].clone()
    snapshot = (state.generator_state.clone(), state.prev_output.clone(), state.prev_upscaled.clone())
    engine.step(frame, state)
    assert torch.equal(frame, frames[1])
    assert torch.equal(state.generator_state, snapshot[0])
    assert torch.equal(state.prev_output, snapshot[1]) and torch.equal(state.prev_upscaled, snapshot[2])
    assert state.frame_index == 1


@pytest.mark.parametrize("steps", [1, 2, 8])
def test_other_step_counts_match_reference(checkpoint, raft, frames, steps):
    expected = reference_run(checkpoint, frames[:2], raft, seed=3, steps=steps)
    engine = StreamEngine(load_pipeline(checkpoint), _flow_fn(raft), steps=steps)
    got, _ = run_engine(engine, frames[:2], engine.new_state(3))
    for a, b in zip(got, expected):
        assert (a - b).abs().max() <= 1e-5


def test_sizes_not_multiple_of_four_are_padded_and_cropped(checkpoint, raft):
    """A frame of another size is padded at the bottom and right by repeating its last row and column, and the
    output cropped back: exactly what the padded frame gives, cut to 4x the frame (the first frame and a guided
    one, whose previous output is the padded one)."""
    engine = StreamEngine(load_pipeline(checkpoint), _flow_fn(raft))
    g = torch.Generator().manual_seed(0)
    h, w = LR_H - 1, LR_W - 3
    frames = [torch.rand(3, h, w, generator=g) for _ in range(2)]
    state, padded_state = engine.new_state(0), engine.new_state(0)
    for frame in frames:
        hr, state = engine.step(frame, state)
        assert hr.shape == (1, 3, 4 * h, 4 * w)
        whole, padded_state = engine.step(F.pad(frame[None], (0, 3, 0, 1), mode="replicate")[0], padded_state)
        assert torch.equal(hr, whole[..., :4 * h, :4 * w])
    with pytest.raises(ValueError, match="reset the state"):
        engine.step(torch.rand(3, LR_H, LR_W), state)
    with pytest.raises(ValueError, match="reset the state"):
        engine.step(torch.rand(3, LR_H, LR_W), state)


def test_bad_frames_raise_clear_errors(checkpoint, raft):
    engine = StreamEngine(load_pipeline(checkpoint), _flow_fn(raft))
    state = engine.new_state(0)
    bad = torch.rand(3, LR_H, LR_W)
    bad[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        engine.step(bad, state)
    with pytest.raises(ValueError, match="channels"):
        engine.step(torch.rand(2, LR_H, LR_W), state)
    gray, _ = engine.step(torch.full((1, LR_H, LR_W), 0.5), state)
    rgb, _ = engine.step(torch.full((3, LR_H, LR_W), 0.5), state)
    assert torch.equal(gray, rgb)
    rgba, _ = engine.step(torch.cat([torch.full((3, LR_H, LR_W), 0.5), torch.zeros(1, LR_H, LR_W)]), state)
    assert torch.equal(rgba, rgb)


def test_values_outside_0_1_are_taken_as_a_saved_image_of_them(checkpoint, raft, frames):
    # An IMAGE from a filter that overshoots: the model sees what a PNG of it would hold, as FlashVSR does.
    engine = StreamEngine(load_pipeline(checkpoint), _flow_fn(raft))
    over = [f * 1.4 - 0.2 for f in frames[:2]]
    assert min(float(f.min()) for f in over) < 0 and max(float(f.max()) for f in over) > 1
    got, _ = run_engine(engine, over, engine.new_state(3))
    expected, _ = run_engine(engine, [f.clamp(0, 1) for f in over], engine.new_state(3))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_an_overflow_is_an_error_that_says_which_precision_to_use(checkpoint, raft, frames, monkeypatch):
    """inf or NaN would become white or black frames without a word."""
    from streamvsr.models.shared.errors import PrecisionError

    half = StreamEngine(load_pipeline(checkpoint, dtype=torch.float16), _flow_fn(raft))
    decode = half.pipeline.vae.decode
    monkeypatch.setattr(half.pipeline.vae, "decode", lambda z, t=None: decode(z, t) * 1e5)  # past fp16's 65504
    with pytest.raises(PrecisionError, match="computed inf or NaN in float16: load the model in bf16 or fp32"):
        half.step(frames[0], half.new_state(1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_fp32(checkpoint, raft, frames, dtype):
    full = StreamEngine(load_pipeline(checkpoint), _flow_fn(raft))
    half = StreamEngine(load_pipeline(checkpoint, dtype=dtype), _flow_fn(raft))
    assert half.pipeline.unet.conv_in.weight.dtype == dtype
    a, state_a = run_engine(full, frames[:2], full.new_state(1))
    b, state_b = run_engine(half, frames[:2], half.new_state(1))
    # The recurrent state and the outputs stay float32 whatever the network precision.
    assert state_b.prev_output.dtype == torch.float32 and b[1].dtype == torch.float32
    for x, y in zip(a, b):
        assert torch.isfinite(y).all()
        assert (x - y).abs().mean() < 0.02
