"""Our ControlNet against diffusers' ``ControlNetModel`` (a tiny random config written by ``save_pretrained``),
and its state-dict keys against the official key list."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import official_keys
from streamvsr.models.stream_diffvsr.controlnet import ControlNet

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5

TINY = dict(
    in_channels=7, conditioning_channels=3, conditioning_embedding_out_channels=(16, 32, 64),
    block_out_channels=(32, 64, 64, 64), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    attention_head_dim=8, cross_attention_dim=32, only_cross_attention=(True, True, True, False),
    use_linear_projection=True, num_class_embeds=None, norm_num_groups=8,
)

# Spec §1.4: the UNet's down/mid settings (§1.3) plus a 3-entry conditioning embedding.
OFFICIAL = {
    "_class_name": "ControlNetModel", "in_channels": 7, "conditioning_channels": 3,
    "conditioning_embedding_out_channels": [64, 128, 256], "controlnet_conditioning_channel_order": "rgb",
    "global_pool_conditions": False, "block_out_channels": [256, 512, 512, 1024], "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "attention_head_dim": 8, "cross_attention_dim": 1024, "only_cross_attention": [True, True, True, False],
    "use_linear_projection": True, "upcast_attention": False, "num_class_embeds": None, "class_embed_type": None,
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "resnet_time_scale_shift": "default",
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    ref = diffusers.ControlNetModel(**TINY).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the zero convs would otherwise make every residual zero
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    folder = tmp_path_factory.mktemp("controlnet")
    ref.save_pretrained(folder, safe_serialization=True)
    ours = ControlNet(json.loads((folder / "config.json").read_text()))
    ours.load_state_dict(load_file(str(folder / "diffusion_pytorch_model.safetensors")), strict=True)
    return ref, ours.eval()


@pytest.mark.parametrize("size", [(12, 20), (11, 13)])  # odd sizes: ceil-rounded downsampling
def test_matches_diffusers(pair, size):
    ref, ours = pair
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, *size, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    cond = torch.randn(2, 3, size[0] * 4, size[1] * 4, generator=g)
    errors = []
    with torch.no_grad():
        for t, scale in ((999, 1.0), (torch.tensor([749, 249]), 0.6)):
            down_ref, mid_ref = ref(x, t, ctx, controlnet_cond=cond, conditioning_scale=scale, return_dict=False)
            down, mid = ours(x, t, ctx, cond, conditioning_scale=scale)
            assert len(down) == len(down_ref) == 12
            for a, b in zip(down, down_ref):
                assert a.shape == b.shape
                errors.append((a - b).abs().max().item())
            assert mid.shape == mid_ref.shape
            errors.append((mid - mid_ref).abs().max().item())
    assert max(errors) <= TOL, errors


@pytest.mark.parametrize("key,value", [
    ("num_class_embeds", 1000), ("controlnet_conditioning_channel_order", "bgr"),
    ("global_pool_conditions", True), ("mid_block_type", "UNetMidBlock2D"),
])
def test_unsupported_config_raises(key, value):
    with pytest.raises(ValueError, match=key):
        ControlNet({**TINY, key: value}, device="meta")


def test_state_dict_matches_official_key_list():
    expected = official_keys("controlnet_keys.txt")
    got = {k: tuple(v.shape) for k, v in ControlNet(OFFICIAL, device="meta").state_dict().items()}
    assert got.keys() == expected.keys()
    assert got == expected
