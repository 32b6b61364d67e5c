"""TemporalAutoencoderTiny against diffusers' AutoencoderTiny (the same network without the TPM), the TPM
against a plain re-derivation of spec §1.5 / quirk Q12, and the official key list."""

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import official_keys
from streamvsr.models.stream_diffvsr.tiny_vae import TemporalAutoencoderTiny, TemporalAutoencoderTinyBlock

diffusers = pytest.importorskip("diffusers")


# The official vae/config.json (spec §1.5), including the keys the model ignores.
OFFICIAL = {
    "_class_name": "TemporalAutoencoderTiny", "_diffusers_version": "0.27.2",
    "_name_or_path": "iccv_ckpt/reds/temporalAE/checkpoint-1310000", "act_fn": "relu",
    "block_out_channels": [64, 64, 64], "decoder_block_out_channels": [64, 64, 64],
    "encoder_block_out_channels": [64, 64, 64], "force_upcast": False, "in_channels": 3, "latent_channels": 4,
    "latent_magnitude": 3, "latent_shift": 0.5, "num_decoder_blocks": [3, 3, 1], "num_encoder_blocks": [1, 3, 3],
    "out_channels": 3, "scaling_factor": 1.0, "shift_factor": 0.0, "upsample_fn": "nearest",
    "upsampling_scaling_factor": 2,
}
TINY = {**OFFICIAL, "block_out_channels": [16] * 3, "encoder_block_out_channels": [16] * 3,
        "decoder_block_out_channels": [16] * 3}
# A different layout: four stages, empty stages, other widths per side, another activation and latent size.
ODD = {"in_channels": 3, "out_channels": 2, "latent_channels": 3, "act_fn": "silu", "upsample_fn": "nearest",
       "encoder_block_out_channels": [8, 8, 8, 8], "num_encoder_blocks": [2, 0, 1, 2],
       "decoder_block_out_channels": [12, 12, 12, 12], "num_decoder_blocks": [1, 2, 0, 2],
       "upsampling_scaling_factor": 2, "scaling_factor": 1.0}
DIFFUSERS_ARGS = ("in_channels", "out_channels", "latent_channels", "act_fn", "upsample_fn",
                  "encoder_block_out_channels", "num_encoder_blocks", "decoder_block_out_channels",
                  "num_decoder_blocks", "upsampling_scaling_factor", "scaling_factor")


def _perturb(module, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _is_temporal(key):
    return key.endswith(".alpha") or ".temporal_processor." in key


def _pair(config, seed):
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderTiny(**{k: config[k] for k in DIFFUSERS_ARGS}).eval()
    _perturb(ref, seed + 1)
    ours = TemporalAutoencoderTiny(config).eval()
    _perturb(ours, seed + 2, scale=0.5)  # temporal tensors stay random: without the TPM they must not matter
    ref_sd = ref.state_dict()
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    # Same layout: every diffusers tensor exists under the same key and shape; ours adds only the TPM tensors.
    assert {k: tuple(v.shape) for k, v in ref_sd.items()} == {k: s for k, s in ours_shapes.items()
                                                              if not _is_temporal(k)}
    missing, unexpected = ours.load_state_dict(ref_sd, strict=False)
    assert not unexpected and missing and all(_is_temporal(k) for k in missing)
    return ref, ours


def _diffusers_block_outputs(ref, x):
    """diffusers' encoder layers run by hand on the unscaled input, keeping every block's output."""
    outs = []
    for layer in ref.encoder.layers:
        x = layer(x)
        if isinstance(layer, diffusers.models.autoencoders.vae.AutoencoderTinyBlock):
            outs.append(x)
    return outs


@pytest.mark.parametrize("config,image_size,n_blocks", [
    (TINY, (36, 44), 7),
    (TINY, (35, 41), 7),  # odd sizes: the stride-2 convs round up
    (ODD, (40, 24), 5),
])
def test_matches_autoencoder_tiny_without_tpm(config, image_size, n_blocks):
    ref, ours = _pair(config, seed=0)
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, *image_size, generator=g) * 2.4 - 1.2
    with torch.no_grad():
        latent_ref = ref.encode(image).latents
        err_enc = (ours.encode(image) - latent_ref).abs().max().item()
        latent = torch.randn(latent_ref.shape, generator=g) * 2.5  # beyond ±3 the tanh clamp is active
        err_dec = (ours.decode(latent) - ref.decode(latent).sample).abs().max().item()
        expected = _diffusers_block_outputs(ref, image)
        got = ours.encode_features(image)
    assert err_enc <= 1e-5 and err_dec <= 1e-5, (err_enc, err_dec)
    assert len(got) == len(expected) == n_blocks
    for a, b in zip(got, expected):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5
    # The feature path really skips the (x+1)/2 scaling (quirk Q4): it differs from the scaled run.
    with torch.no_grad():
        scaled = _diffusers_block_outputs(ref, image.add(1).div(2))
    assert (got[-1] - scaled[-1]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------- TPM, written from the spec

def _pool4(t):
    """AvgPool 4x4 stride 4, floor: remainder rows/columns are dropped."""
    b, c, h, w = t.shape
    out = torch.empty(b, c, h // 4, w // 4, dtype=t.dtype)
    for i in range(h // 4):
        for j in range(w // 4):
            out[:, :, i, j] = t[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].sum(dim=(2, 3)) / 16
    return out


def _conv1d_k3(seq, weight, bias):
    """Conv1d kernel 3, padding 1, as a sum over the three taps."""
    padded = F.pad(seq, (1, 1))
    n = seq.shape[-1]
    out = bias[None, :, None].expand(seq.shape[0], -1, n).clone()
    for k in range(3):
        out = out + torch.einsum("oi,bin->bon", weight[:, :, k], padded[:, :, k:k + n])
    return out


def _bilinear(t, size):
    """Bilinear resize with half-pixel centres (align_corners=False), coordinates clamped at the border."""
    h_in, w_in = t.shape[-2:]

    def axis(n_out, n_in):
        src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo).to(t.dtype)

    y0, y1, fy = axis(size[0], h_in)
    x0, x1, fx = axis(size[1], w_in)
    rows = t[:, :, y0] * (1 - fy)[:, None] + t[:, :, y1] * fy[:, None]
    return rows[..., x0] * (1 - fx) + rows[..., x1] * fx


def spec_block(block, x, prev=None):
    """Spec §1.5 TemporalAutoencoderTinyBlock, step by step."""
    c0, c2, c4 = block.conv[0], block.conv[2], block.conv[4]
    f = F.conv2d(F.relu(F.conv2d(F.relu(F.conv2d(x, c0.weight, c0.bias, padding=1)), c2.weight, c2.bias,
                                 padding=1)), c4.weight, c4.bias, padding=1)
    if prev is not None:
        b, c, h, w = f.shape
        cur, old = _pool4(f), _pool4(prev)
        hp, wp = cur.shape[-2:]
        # row-major flattening, current first then previous
        seq = torch.stack([cur[:, :, i, j] for i in range(hp) for j in range(wp)]
                          + [old[:, :, i, j] for i in range(hp) for j in range(wp)], dim=2)
        t0, t2 = block.temporal_processor[0], block.temporal_processor[2]
        seq = _conv1d_k3(F.relu(_conv1d_k3(seq, t0.weight, t0.bias)), t2.weight, t2.bias)
        a = block.alpha.item()
        fused = torch.empty(b, c, hp, wp, dtype=f.dtype)
        for i in range(hp):
            for j in range(wp):
                fused[:, :, i, j] = a * seq[:, :, i * wp + j] + (1 - a) * seq[:, :, hp * wp + i * wp + j]
        f = f + 0.1 * _bilinear(fused, (h, w))
    return torch.clamp(f + x, min=0)


def test_bilinear_helper_agrees_with_torch():
    # The helper is the independent side of the TPM check; make sure it is itself a faithful bilinear resize.
    t = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    for size in ((16, 20), (17, 23), (5, 5)):
        assert (_bilinear(t, size) - F.interpolate(t, size=size, mode="bilinear", align_corners=False)
                ).abs().max() < 1e-12


@pytest.mark.parametrize("size", [(16, 20), (18, 23), (7, 13), (4, 4)])
@pytest.mark.parametrize("alpha", [0.5, 1.7, -0.3])
def test_tpm_block_matches_spec(size, alpha):
    torch.manual_seed(2)
    block = TemporalAutoencoderTinyBlock(6, "relu")
    _perturb(block, 3, scale=0.2)
    with torch.no_grad():
        block.alpha.fill_(alpha)
        x, prev = torch.randn(2, 6, *size), torch.randn(2, 6, *size) * 2
        err = (block(x, prev) - spec_block(block, x, prev)).abs().max().item()
        assert err <= 1e-5, err
        assert torch.equal(block(x), torch.clamp(block.conv(x) + x, min=0))  # no prev: plain TAESD block
        assert (block(x, prev) - block(x)).abs().max() > 1e-3


def test_tpm_alpha_is_not_clamped():
    torch.manual_seed(4)
    block = TemporalAutoencoderTinyBlock(4, "relu")
    _perturb(block, 5, scale=0.3)
    x, prev = torch.randn(1, 4, 12, 12), torch.randn(1, 4, 12, 12)
    with torch.no_grad():
        outs = {}
        for a in (1.0, 1.7):
            block.alpha.fill_(a)
            outs[a] = block(x, prev)
        assert (outs[1.7] - spec_block(block, x, prev)).abs().max() <= 1e-5
    assert (outs[1.7] - outs[1.0]).abs().max() > 1e-4


def test_tpm_rejects_mismatched_or_tiny_maps():
    block = TemporalAutoencoderTinyBlock(4, "relu")
    with torch.no_grad(), pytest.raises(ValueError, match="do not match"):
        block(torch.randn(1, 4, 12, 12), torch.randn(1, 4, 12, 13))
    with torch.no_grad(), pytest.raises(ValueError, match="at least 4x4"):
        block(torch.randn(1, 4, 3, 12), torch.randn(1, 4, 3, 12))


class _CastOps:
    """An operations namespace like ComfyUI's manual_cast: weights are cast to the input dtype in forward."""

    class Conv2d(torch.nn.Conv2d):
        def forward(self, x):
            return self._conv_forward(x, self.weight.to(x.dtype), self.bias.to(x.dtype) if self.bias is not None
                                      else None)

    class Conv1d(torch.nn.Conv1d):
        def forward(self, x):
            return self._conv_forward(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


def test_operations_namespace_and_alpha_cast():
    torch.manual_seed(6)
    vae = TemporalAutoencoderTiny(TINY, operations=_CastOps).eval()
    _perturb(vae, 7)
    convs = [m for m in vae.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d))]
    assert convs and all(isinstance(m, (_CastOps.Conv1d, _CastOps.Conv2d)) for m in convs)
    g = torch.Generator().manual_seed(8)
    warped = torch.rand(1, 3, 32, 40, generator=g, dtype=torch.float64) * 2 - 1
    z = torch.randn(1, 4, 8, 10, generator=g, dtype=torch.float64)
    reference = copy.deepcopy(vae).double()
    with torch.no_grad():
        out = vae.decode(z, vae.encode_features(warped)[::-1])  # float32 weights and alpha, float64 input
        ref = reference.decode(z, reference.encode_features(warped)[::-1])
    assert out.dtype == torch.float64
    assert (out - ref).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------- decoder with features

def test_decode_with_temporal_features_matches_composition():
    torch.manual_seed(9)
    vae = TemporalAutoencoderTiny(TINY).eval()
    _perturb(vae, 10, scale=0.05)
    with torch.no_grad():
        for block in vae.decoder.layers:
            if isinstance(block, TemporalAutoencoderTinyBlock):
                block.alpha.uniform_(-0.5, 1.5)
    g = torch.Generator().manual_seed(11)
    warped = torch.rand(1, 3, 36, 44, generator=g) * 2.2 - 1.1
    z = torch.randn(1, 4, 9, 11, generator=g) * 2
    with torch.no_grad():
        # encoder features: every block's output, encoder run on the raw image (no (x+1)/2)
        x, enc = warped, []
        for layer in vae.encoder.layers:
            if isinstance(layer, TemporalAutoencoderTinyBlock):
                x = spec_block(layer, x)
                enc.append(x)
            else:
                x = layer(x)
        feats = enc[::-1]
        # decoder: tanh clamp, blocks fed in execution order, output *2-1 unclamped
        x, k = torch.tanh(z / 3) * 3, 0
        for layer in vae.decoder.layers:
            if isinstance(layer, TemporalAutoencoderTinyBlock):
                x = spec_block(layer, x, feats[k])
                k += 1
            else:
                x = layer(x)
        expected = x * 2 - 1
        ours_feats = vae.encode_features(warped)
        got = vae.decode(z, ours_feats[::-1])
        plain = vae.decode(z)
        plain_after = vae.decode(z)
    assert k == 7 and len(ours_feats) == 7
    for a, b in zip(ours_feats, enc):
        assert (a - b).abs().max() <= 1e-5
    err = (got - expected).abs().max().item()
    assert err <= 1e-5, err
    assert (got - plain).abs().max() > 1e-4  # the features are used
    assert torch.equal(plain, plain_after)  # and leave no state behind
    with torch.no_grad(), pytest.raises(ValueError, match="6 temporal feature maps for 7"):
        vae.decode(z, ours_feats[::-1][:6])


# ---------------------------------------------------------------------------------------------- config and keys

def test_official_config_keys_equal_the_official_list():
    expected = official_keys("vae_keys.txt")
    vae = TemporalAutoencoderTiny(OFFICIAL, device="meta")
    assert {k: tuple(v.shape) for k, v in vae.state_dict().items()} == expected
    assert len(expected) == 166


@pytest.mark.parametrize("change,match", [
    ({"act_fn": "tanh"}, "act_fn"),
    ({"upsample_fn": "bilinear"}, "upsample_fn"),
    ({"encoder_block_out_channels": [16, 32, 32]}, "encoder_block_out_channels"),
    ({"num_decoder_blocks": [3, 3]}, "num_decoder_blocks"),
    ({"num_encoder_blocks": [1, -1, 3]}, "num_encoder_blocks"),
    ({"latent_channels": 0}, "latent_channels"),
    ({"upsampling_scaling_factor": 1.5}, "upsampling_scaling_factor"),
    ({"scaling_factor": 0}, "scaling_factor"),
])
def test_unsupported_config_values_are_rejected(change, match):
    with pytest.raises(ValueError, match=match):
        TemporalAutoencoderTiny({**TINY, **change}, device="meta")
