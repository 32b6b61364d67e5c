"""Our UNet against diffusers' ``UNet2DConditionModel`` (tiny random configs written by ``save_pretrained``),
and its state-dict keys against the official key list."""

import json
import math
import types

import pytest
import torch
from safetensors.torch import load_file

from helpers import official_keys
from streamvsr.models.stream_diffvsr.unet import UNet, timestep_embedding

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5

TINY = dict(
    in_channels=7, out_channels=4, block_out_channels=(32, 64, 64, 64), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8, cross_attention_dim=32, only_cross_attention=(True, True, True, False),
    use_linear_projection=True, num_class_embeds=None, norm_num_groups=8,
)

# Spec §1.3 (the official Stream-DiffVSR UNet config).
OFFICIAL = {
    "_class_name": "UNet2DConditionModel", "in_channels": 7, "out_channels": 4,
    "block_out_channels": [256, 512, 512, 1024], "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": 8, "cross_attention_dim": 1024, "only_cross_attention": [True, True, True, False],
    "use_linear_projection": True, "upcast_attention": False, "num_class_embeds": None, "class_embed_type": None,
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "center_input_sample": False,
    "dual_cross_attention": False, "resnet_time_scale_shift": "default", "sample_size": 128,
}


def perturb(module, seed):
    # Zero-initialised layers (conv_out, zero convs) would otherwise hide wiring mistakes.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def save_and_load(ref, folder):
    """Write ``ref`` with diffusers, then build ours from the written config.json and safetensors."""
    ref.save_pretrained(folder, safe_serialization=True)
    ours = UNet(json.loads((folder / "config.json").read_text()))
    ours.load_state_dict(load_file(str(folder / "diffusion_pytorch_model.safetensors")), strict=True)
    return ours.eval()


def skip_shapes(config, h, w):
    """Skip-tensor shapes of the diffusers down path: conv_in output, then per block each resnet output and the
    downsampler output; stride-2 convs with padding 1 round up."""
    chans, layers = config["block_out_channels"], config["layers_per_block"]
    shapes = [(chans[0], h, w)]
    for i, c in enumerate(chans):
        shapes += [(c, h, w)] * layers
        if i < len(chans) - 1:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
            shapes.append((c, h, w))
    return shapes, (chans[-1], h, w)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**TINY).eval()
    perturb(ref, 1)
    return ref, save_and_load(ref, tmp_path_factory.mktemp("unet"))


@pytest.mark.parametrize("size", [(12, 20), (11, 13)])  # (11, 13): upsampling to odd skip sizes (quirk Q15)
def test_matches_diffusers(pair, size):
    ref, ours = pair
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, *size, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    down_shapes, mid_shape = skip_shapes(TINY, *size)
    down = [torch.randn(2, *s, generator=g) * 0.5 for s in down_shapes]
    mid = torch.randn(2, *mid_shape, generator=g) * 0.5
    errors = []
    with torch.no_grad():
        for t in (999, torch.tensor(249), torch.tensor([749, 499])):
            errors.append((ours(x, t, ctx) - ref(x, t, ctx).sample).abs().max().item())
        expected = ref(x, 499, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        got = ours(x, torch.tensor(499), ctx, down, mid)
        errors.append((got - expected).abs().max().item())
        # The residuals must actually change the output, or the comparison above proves nothing.
        assert (got - ours(x, 499, ctx)).abs().max() > 1e-2
    assert got.shape == (2, 4, *size)
    assert max(errors) <= TOL, errors


def test_rejects_wrong_residual_count(pair):
    ours = pair[1]
    x = torch.randn(1, 7, 8, 8)
    with pytest.raises(ValueError, match="residuals"):
        ours(x, 1, torch.randn(1, 77, 32), [torch.zeros(1)] * 3)


def _down_path_shapes(unet, x, ctx):
    """The shapes the down path really produces (skip tensors, deepest features)."""
    with torch.no_grad():
        temb = unet.embed_time(1, x)
        deepest, skips = unet.run_down_blocks(unet.conv_in(x), temb, ctx)
    return [tuple(t.shape) for t in skips], tuple(deepest.shape)


@pytest.mark.parametrize("size", [(12, 20), (11, 13), (5, 9)])
def test_skip_shapes_are_those_of_the_down_path(pair, tmp_path, size):
    """``skip_shapes`` predicts the residual shapes without running anything: padding 1 (the official) and 0,
    odd sizes included."""
    ours = pair[1]
    x, ctx = torch.randn(2, 7, *size), torch.randn(2, 5, 32)
    assert ours.skip_shapes(x.shape) == _down_path_shapes(ours, x, ctx)
    torch.manual_seed(0)
    variant = save_and_load(diffusers.UNet2DConditionModel(**VARIANT).eval(), tmp_path)
    x, ctx = torch.randn(1, 5, *size), torch.randn(1, 6, 24)
    assert variant.skip_shapes(x.shape) == _down_path_shapes(variant, x, ctx)


def test_zero_residuals_change_no_number(pair):
    """The compiled engine's first frame passes zeros where later frames pass ControlNet residuals: the output
    must be bit-identical to passing none."""
    ours = pair[1]
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(1, 7, 11, 13, generator=g), torch.randn(1, 77, 32, generator=g)
    shapes, mid = ours.skip_shapes(x.shape)
    with torch.no_grad():
        zero = ours(x, 499, ctx, [torch.zeros(s) for s in shapes], torch.zeros(mid))
        assert torch.equal(zero, ours(x, 499, ctx))


VARIANT = dict(  # the less common options, all at once
    in_channels=5, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=(1, 2, 1),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4, 8), cross_attention_dim=24, only_cross_attention=True, use_linear_projection=False,
    transformer_layers_per_block=(2, 1, 2), upcast_attention=True, norm_num_groups=4, norm_eps=1e-6,
    flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, mid_block_scale_factor=2.0, time_embedding_dim=40,
    conv_in_kernel=5, conv_out_kernel=1,
)


def test_variant_config_matches_diffusers(tmp_path):
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**VARIANT).eval()
    perturb(ref, 3)
    ours = save_and_load(ref, tmp_path)
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(1, 5, 9, 11, generator=g), torch.randn(1, 6, 24, generator=g)
    with torch.no_grad():
        err = (ours(x, 321, ctx) - ref(x, 321, ctx).sample).abs().max().item()
    assert err <= TOL


def test_timestep_embedding_formula():
    # Spec §1.3: freqs = exp(-ln(10000) * arange(half) / half), emb = [cos(t*f), sin(t*f)] with flip_sin_to_cos.
    t = torch.tensor([0, 249, 999])
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    args = t[:, None].double() * freqs
    expected = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    got = timestep_embedding(t, 256, flip_sin_to_cos=True, freq_shift=0)
    assert got.dtype == torch.float32 and (got.double() - expected).abs().max() < 1e-4


def test_time_embedding_follows_sample_dtype(pair):
    ours = pair[1]
    half = torch.zeros(2, 7, 4, 4, dtype=torch.bfloat16)
    ours.time_embedding.to(torch.bfloat16)
    try:
        assert ours.embed_time(torch.tensor(999), half).dtype == torch.bfloat16
    finally:
        ours.time_embedding.float()


@pytest.mark.parametrize("key,value", [
    ("num_class_embeds", 1000), ("class_embed_type", "timestep"), ("act_fn", "gelu"),
    ("resnet_time_scale_shift", "scale_shift"), ("addition_embed_type", "text"), ("center_input_sample", True),
    ("down_block_types", ["DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]),
    ("up_block_types", ["CrossAttnUpBlock2D"] * 3), ("attention_head_dim", [8, 8]),
    ("attention_head_dim", 3), ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
])
def test_unsupported_config_raises(key, value):
    with pytest.raises(ValueError, match=key):
        UNet({**TINY, key: value}, device="meta")


def test_state_dict_matches_official_key_list():
    expected = official_keys("unet_keys.txt")
    got = {k: tuple(v.shape) for k, v in UNet(OFFICIAL, device="meta").state_dict().items()}
    assert got.keys() == expected.keys()
    assert got == expected


def test_every_weight_comes_from_operations():
    made = []

    def recording(cls):
        return type(cls.__name__, (cls,), {"__init__": lambda self, *a, **k: (cls.__init__(self, *a, **k),
                                                                               made.append(self))[0]})

    ops = types.SimpleNamespace(**{n: recording(getattr(torch.nn, n))
                                   for n in ("Conv2d", "Linear", "GroupNorm", "LayerNorm")})
    model = UNet(TINY, operations=ops, device="meta")
    owners = {id(m) for m in model.modules() if any(True for _ in m.parameters(recurse=False))}
    assert owners == {id(m) for m in made}
