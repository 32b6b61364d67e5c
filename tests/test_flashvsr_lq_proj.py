"""FlashVSR's LQ projection: streaming == whole clip (bit for bit), the v1 / v1.1 temporal padding against
whole-sequence re-derivations, the receptive field of each version, and the key layout."""

import pytest
import torch
import torch.nn.functional as F

from flashvsr_helpers import lq_shapes, one_thread, tiny_state_dicts
from streamvsr.models.flashvsr.lq_proj import LQProjection, LQProjState, lq_config_from_state_dict

@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


H, W = 32, 48  # a 2 x 3 token grid


def make(version, seed=0):
    sd = tiny_state_dicts(seed)["lq_proj"]
    model = LQProjection(version, **lq_config_from_state_dict(sd))
    model.load_state_dict(sd, strict=True)
    return model.eval()


def video(frames, seed=1):
    return torch.rand(1, 3, frames, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def latents(tokens):
    """(B, k*h*w, C) -> per latent frame list."""
    return list(tokens.unflatten(1, (-1, (H // 16) * (W // 16))).unbind(1))


@pytest.mark.parametrize("version", ["v1", "v1.1"])
def test_streaming_equals_whole_clip(version):
    model = make(version)
    v = video(1 + 4 * 8)
    with torch.no_grad():
        whole = model(v)[0]
        # the official tiny-long calls: frame 0 alone, then one 4-frame clip per call
        out, state = model.project(v[:, :, :1])
        assert out is None and state.clips == 1
        pieces = []
        for i in range(8):
            out, state = model.project(v[:, :, 1 + 4 * i:5 + 4 * i], state)
            pieces.append(out[0])
        # the engine's chunks: 1 + 24 frames, then 8 at a time
        chunk0, state2 = model.project(v[:, :, :25])
        chunk1, state2 = model.project(v[:, :, 25:33], state2)
    assert whole.shape == (1, 8 * 6, 256)
    assert torch.equal(torch.cat(pieces, 1), whole)
    assert torch.equal(torch.cat([chunk0[0], chunk1[0]], 1), whole)
    assert state.clips == state2.clips == 9


def _conv(conv, x, front=0):
    """The conv with ``front`` replicate frames in front and 1 replicate pixel around."""
    return F.conv3d(F.pad(x, (1, 1, 1, 1, front, 0), mode="replicate"), conv.weight, conv.bias, stride=(2, 1, 1))


def _causal(conv, x):
    return _conv(conv, x, front=2)


def _norm_act(norm, x):
    return F.silu(x / x.pow(2).sum(1, keepdim=True).sqrt() * x.shape[1] ** 0.5 * norm.gamma)


def _s2d(v):
    return F.pixel_unshuffle(v.transpose(1, 2), 16).transpose(1, 2)  # (c, row, col) order, c outermost


def test_v1_1_is_a_causal_conv_over_the_whole_stream():
    model = make("v1.1")
    v = video(1 + 4 * 6)
    with torch.no_grad():
        stream = torch.cat([v[:, :, :1].expand(-1, -1, 3, -1, -1), v], dim=2)  # frame 0 repeated 3 times in front
        y = _norm_act(model.norm1, _causal(model.conv1, _s2d(stream)))
        z = _norm_act(model.norm2, _causal(model.conv2, y))[:, :, 1:]  # the priming clip's output is not emitted
        ref = model.linear_layers[0](z.flatten(2).transpose(1, 2))
        got = model(v)[0]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_v1_pads_every_clip_with_its_own_tail():
    model = make("v1")
    v = video(1 + 4 * 6)
    with torch.no_grad():
        clips = _s2d(v[:, :, 1:]).unflatten(2, (6, 4)).transpose(1, 2).flatten(0, 1)  # (6, C, 4, h, w)
        x = torch.cat([clips[:, :, 2:], clips], dim=2)  # [x2 x3 x0 x1 x2 x3]
        y = _norm_act(model.norm1, _conv(model.conv1, x))
        y = torch.cat([y, y], dim=2)  # conv2 pads its 2 frames with themselves
        z = _norm_act(model.norm2, _conv(model.conv2, y))
        ref = model.linear_layers[0](z.flatten(2).transpose(1, 2)).reshape(1, -1, 256)
        got = model(v)[0]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def _changed_latents(model, frames):
    v = video(1 + 4 * 6)
    w = v.clone()
    w[:, :, frames] += 0.5
    with torch.no_grad():
        a, b = latents(model(v)[0]), latents(model(w)[0])
    return [i for i, (x, y) in enumerate(zip(a, b)) if not torch.equal(x, y)]


def test_v1_has_no_memory_across_clips():
    model = make("v1")
    assert _changed_latents(model, slice(1, 5)) == [0]
    assert _changed_latents(model, slice(9, 13)) == [2]
    assert _changed_latents(model, slice(0, 1)) == []  # frame 0 only primes, and v1 forgets it


def test_v1_1_remembers_earlier_clips():
    model = make("v1.1")
    assert _changed_latents(model, slice(1, 5)) == [0, 1, 2]
    assert _changed_latents(model, slice(9, 13)) == [2, 3, 4]
    assert _changed_latents(model, slice(0, 1)) == [0, 1]


def test_versions_differ_on_the_same_weights():
    v = video(9)
    with torch.no_grad():
        a, b = make("v1")(v)[0], make("v1.1")(v)[0]
    assert a.shape == b.shape and not torch.allclose(a, b)


@pytest.mark.parametrize("version", ["v1", "v1.1"])
def test_state_survives_a_round_trip(version):
    model = make(version)
    v = video(1 + 4 * 4)
    with torch.no_grad():
        _, state = model.project(v[:, :, :9])
        tensors, meta = state.to_dict()
        restored = LQProjState.from_dict({k: t.clone() for k, t in tensors.items()}, dict(meta))
        a, _ = model.project(v[:, :, 9:], state)
        b, _ = model.project(v[:, :, 9:], restored.to("cpu"))
    assert torch.equal(a[0], b[0])
    assert (state.conv1 is None) == (version == "v1")


def test_frame_counts_are_checked():
    model = make("v1.1")
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        model.project(video(4))
    _, state = model.project(video(1))
    with pytest.raises(ValueError, match="multiple of 4"):
        model.project(video(5), state)
    with pytest.raises(ValueError, match="divisible by 16"):
        model.project(torch.zeros(1, 3, 1, 24, 32))
    with pytest.raises(ValueError, match="version"):
        LQProjection("v2")


def test_keys_and_sizes():
    sd = tiny_state_dicts(0)["lq_proj"]
    assert lq_config_from_state_dict(sd) == dict(in_channels=768, hidden1=32, hidden2=48, out_dim=256, num_layers=1)
    model = LQProjection("v1", device="meta")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == lq_shapes((2048, 3072), 1536)
    assert sum(p.numel() for p in model.parameters()) == 287_845_888  # the released LQ_proj_in


def test_batch_elements_are_independent():
    model = make("v1.1")
    v = torch.cat([video(9, seed=1), video(9, seed=2)])
    with torch.no_grad():
        both = model(v)[0]
        one = model(v[1:])[0]
    torch.testing.assert_close(both[1:], one, rtol=1e-5, atol=1e-5)
