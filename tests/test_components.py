"""Each component against an independent implementation (diffusers / transformers) or the spec's formulas,
with tiny random configs written by the libraries' own ``save_pretrained``."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import TINY_UNET, TINY_VAE, _perturb
from streamvsr.models.clip_text import CLIPTextTower, empty_prompt_ids
from streamvsr.models.controlnet import ControlNet
from streamvsr.models.tiny_vae import TemporalAutoencoderTiny, TemporalAutoencoderTinyBlock
from streamvsr.models.unet import UNet

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def _saved(model, folder):
    model.save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    weights = next(folder.glob("*.safetensors"))
    return config, load_file(str(weights))


@pytest.mark.parametrize("size", [(12, 20), (11, 13)])  # (11, 13): upsampling to odd skip sizes (quirk Q15)
def test_unet_matches_diffusers(tmp_path, size):
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**TINY_UNET)
    _perturb(ref, torch.Generator().manual_seed(1))
    config, sd = _saved(ref, tmp_path / "unet")
    ours = UNet(config)
    ours.load_state_dict(sd, strict=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 7, *size, generator=g)
    ctx = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        for t in (999, 249):
            assert (ours(x, torch.tensor(t), ctx) - ref(x, t, ctx).sample).abs().max() <= 1e-5
        ref_ctrl = diffusers.ControlNetModel.from_unet(ref, conditioning_embedding_out_channels=(16, 32, 64))
        down, mid = ref_ctrl(x, 499, ctx, controlnet_cond=torch.randn(1, 3, size[0] * 4, size[1] * 4, generator=g),
                             return_dict=False)
        down = [d + torch.randn_like(d) * 0.1 for d in down]  # zero convs give zeros: make residuals matter
        mid = mid + torch.randn_like(mid) * 0.1
        expected = ref(x, 499, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        assert (ours(x, 499, ctx, down, mid) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_controlnet_matches_diffusers(tmp_path, scale):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**TINY_UNET)
    ref = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64))
    _perturb(ref, torch.Generator().manual_seed(3))
    config, sd = _saved(ref, tmp_path / "controlnet")
    ours = ControlNet(config)
    ours.load_state_dict(sd, strict=True)
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(1, 7, 11, 13, generator=g), torch.randn(1, 77, 32, generator=g)
    cond = torch.randn(1, 3, 44, 52, generator=g)
    with torch.no_grad():
        down_ref, mid_ref = ref(x, 749, ctx, controlnet_cond=cond, conditioning_scale=scale, return_dict=False)
        down, mid = ours(x, torch.tensor(749), ctx, cond, conditioning_scale=scale)
    assert len(down) == len(down_ref) == 12
    for a, b in zip(down, down_ref):
        assert (a - b).abs().max() <= 1e-5
    assert (mid - mid_ref).abs().max() <= 1e-5


def test_unsupported_unet_config_is_rejected():
    with pytest.raises(ValueError, match="num_class_embeds"):
        UNet({**TINY_UNET, "num_class_embeds": 1000}, device="meta")


def _taesd_pair():
    ref = diffusers.AutoencoderTiny(
        in_channels=3, out_channels=3, encoder_block_out_channels=(16, 16, 16), decoder_block_out_channels=(16, 16, 16),
        act_fn="relu", latent_channels=4, upsampling_scaling_factor=2, num_encoder_blocks=(1, 3, 3),
        num_decoder_blocks=(3, 3, 1), scaling_factor=1.0)
    _perturb(ref, torch.Generator().manual_seed(5), scale=0.05)
    ours = TemporalAutoencoderTiny(TINY_VAE)
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    # AutoencoderTiny has no TPM: only the temporal tensors (unused without previous features) may be missing.
    assert not unexpected and all(k.endswith("alpha") or ".temporal_processor." in k for k in missing)
    return ref, ours


def test_tiny_vae_without_tpm_matches_autoencoder_tiny():
    ref, ours = _taesd_pair()
    g = torch.Generator().manual_seed(6)
    image = torch.rand(1, 3, 36, 44, generator=g) * 2 - 1
    latent = torch.randn(1, 4, 9, 11, generator=g) * 2
    with torch.no_grad():
        assert (ours.encode(image) - ref.encoder(image)).abs().max() <= 1e-5
        assert (ours.decode(latent) - ref.decoder(latent)).abs().max() <= 1e-5
        # Features: diffusers' encoder layers run on the raw input (no [0,1] scaling: quirk Q4).
        x, expected = image, []
        for layer in ref.encoder.layers:
            x = layer(x)
            if isinstance(layer, diffusers.models.autoencoders.vae.AutoencoderTinyBlock):
                expected.append(x)
        got = ours.encode_features(image)
    assert len(got) == len(expected) == 7
    for a, b in zip(got, expected):
        assert (a - b).abs().max() <= 1e-5


def tpm_reference(block, x, prev):
    """Spec §1.5 step by step, with explicit loops for pooling and the temporal mixing."""
    f = block.conv(x)
    b, c, h, w = f.shape
    ph, pw = h // 4, w // 4

    def pool(t):
        out = torch.zeros(b, c, ph, pw, dtype=t.dtype)
        for i in range(ph):
            for j in range(pw):
                out[:, :, i, j] = t[:, :, 4 * i: 4 * i + 4, 4 * j: 4 * j + 4].mean(dim=(2, 3))
        return out

    cur, old = pool(f), pool(prev)
    seq = torch.cat([cur.flatten(2), old.flatten(2)], dim=2)  # current first, previous second
    conv0, conv2 = block.temporal_processor[0], block.temporal_processor[2]
    seq = F.conv1d(seq, conv0.weight, conv0.bias, padding=1).clamp(min=0)
    seq = F.conv1d(seq, conv2.weight, conv2.bias, padding=1)
    n = ph * pw
    a = block.alpha
    fused = a * seq[..., :n].reshape(b, c, ph, pw) + (1 - a) * seq[..., n:].reshape(b, c, ph, pw)
    up = F.interpolate(fused, size=(h, w), mode="bilinear", align_corners=False)
    return (f + 0.1 * up + x).clamp(min=0)


@pytest.mark.parametrize("size", [(16, 20), (18, 23)])
def test_tpm_block_matches_spec(size):
    torch.manual_seed(7)
    block = TemporalAutoencoderTinyBlock(8, "relu")
    with torch.no_grad():
        block.alpha.fill_(1.7)  # the official alpha is not clamped to [0, 1]
        x, prev = torch.randn(1, 8, *size), torch.randn(1, 8, *size)
        assert (block(x, prev) - tpm_reference(block, x, prev)).abs().max() <= 1e-5
        assert (block(x) - (block.conv(x) + x).clamp(min=0)).abs().max() == 0


def test_decoder_with_temporal_features_matches_composition():
    torch.manual_seed(8)
    vae = TemporalAutoencoderTiny(TINY_VAE)
    _perturb(vae, torch.Generator().manual_seed(9), scale=0.05)
    g = torch.Generator().manual_seed(10)
    warped = torch.rand(1, 3, 32, 40, generator=g) * 2 - 1
    z = torch.randn(1, 4, 8, 10, generator=g)
    with torch.no_grad():
        feats = vae.encode_features(warped)[::-1]
        got = vae.decode(z, feats)
        x, k = torch.tanh(z / 3) * 3, 0
        for layer in vae.decoder.layers:
            if isinstance(layer, TemporalAutoencoderTinyBlock):
                x = tpm_reference(layer, x, feats[k])
                k += 1
            else:
                x = layer(x)
    assert k == 7
    assert (got - (x * 2 - 1)).abs().max() <= 1e-5


def test_clip_tower_matches_transformers(tmp_path):
    from helpers import write_tokenizer

    config = transformers.CLIPTextConfig(vocab_size=120, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                                         num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                                         bos_token_id=9, eos_token_id=10, pad_token_id=0)
    torch.manual_seed(11)
    ref = transformers.CLIPTextModel(config).eval()
    _perturb(ref, torch.Generator().manual_seed(12))
    cfg, sd = _saved(ref, tmp_path / "te")
    if not any(k.startswith("text_model.") for k in sd):
        sd = {"text_model." + k: v for k, v in sd.items()}
    ours = CLIPTextTower(cfg)
    ours.load_state_dict({k: v for k, v in sd.items() if not k.endswith("position_ids")}, strict=True)
    write_tokenizer(tmp_path / "tok")
    ids = torch.tensor([empty_prompt_ids(tmp_path / "tok")])
    other = torch.randint(0, 120, (2, 77), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        for batch in (ids, other):
            assert (ours(batch) - ref(batch).last_hidden_state).abs().max() <= 1e-5


@pytest.mark.parametrize("pad", ["!", "<|endoftext|>"])
def test_empty_prompt_ids_match_clip_tokenizer(tmp_path, pad):
    from helpers import write_tokenizer

    write_tokenizer(tmp_path)
    special = json.loads((tmp_path / "special_tokens_map.json").read_text())
    special["pad_token"] = pad
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special))
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["pad_token"] = pad
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    expected = tok("", padding="max_length", max_length=77, truncation=True).input_ids
    assert empty_prompt_ids(tmp_path) == expected
