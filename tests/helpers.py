"""Tiny, randomly initialised Stream-DiffVSR checkpoints in the official hub layout, for CPU tests.

UNet, ControlNet and text encoder are written by diffusers/transformers ``save_pretrained`` (the libraries the
official checkpoint was exported with); the temporal VAE has no library class, so its tensors are written with
safetensors under the official key names.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.21.0.dev0",
    "beta_end": 0.02, "beta_schedule": "scaled_linear", "beta_start": 0.0001, "clip_sample": False,
    "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "rescale_betas_zero_snr": False, "sample_max_value": 1.0,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "thresholding": False,
    "timestep_spacing": "trailing", "trained_betas": None,
}

TINY_UNET = dict(
    sample_size=32, in_channels=7, out_channels=4, layers_per_block=2,
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=4, cross_attention_dim=32, only_cross_attention=(True, True, True, False),
    use_linear_projection=True, norm_num_groups=8, num_class_embeds=None,
)

TINY_VAE = {
    "_class_name": "TemporalAutoencoderTiny", "_diffusers_version": "0.27.2", "act_fn": "relu",
    "block_out_channels": [16, 16, 16], "decoder_block_out_channels": [16, 16, 16],
    "encoder_block_out_channels": [16, 16, 16], "force_upcast": False, "in_channels": 3,
    "latent_channels": 4, "latent_magnitude": 3, "latent_shift": 0.5, "num_decoder_blocks": [3, 3, 1],
    "num_encoder_blocks": [1, 3, 3], "out_channels": 3, "scaling_factor": 1.0, "shift_factor": 0.0,
    "upsample_fn": "nearest", "upsampling_scaling_factor": 2,
}

# The official tokenizer pads with "!" (id 0); a tiny vocabulary keeps that property.
TINY_VOCAB = ["!", "a", "b", "c", "a</w>", "b</w>", "c</w>", "ab", "ab</w>", "<|startoftext|>", "<|endoftext|>"]


def _perturb(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.05) -> None:
    # Zero-initialised layers (ControlNet's zero convs, conv_out) would hide wiring mistakes.
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


def write_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(TINY_VOCAB)}))
    (folder / "merges.txt").write_text("#version: 0.2\na b</w>\na b\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
               "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True, **special}))


def make_tiny_checkpoint(folder, seed: int = 0) -> Path:
    """Write a tiny random Stream-DiffVSR checkpoint in the official layout into ``folder``; return it."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from streamvsr.models.stream_diffvsr.tiny_vae import TemporalAutoencoderTiny

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)

    unet = UNet2DConditionModel(**TINY_UNET)
    _perturb(unet, generator)
    unet.save_pretrained(folder / "unet", safe_serialization=True)

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64))
    _perturb(controlnet, generator)
    controlnet.save_pretrained(folder / "controlnet", safe_serialization=True)

    vae = TemporalAutoencoderTiny(TINY_VAE)
    _perturb(vae, generator, scale=0.02)
    (folder / "vae").mkdir(exist_ok=True)
    (folder / "vae" / "config.json").write_text(json.dumps(TINY_VAE, indent=2))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()},
              str(folder / "vae" / "diffusion_pytorch_model.safetensors"))

    text_config = CLIPTextConfig(vocab_size=len(TINY_VOCAB), hidden_size=32, intermediate_size=37,
                                 num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                 hidden_act="gelu", projection_dim=16, bos_token_id=len(TINY_VOCAB) - 2,
                                 eos_token_id=len(TINY_VOCAB) - 1, pad_token_id=0)
    text_encoder = CLIPTextModel(text_config)
    _perturb(text_encoder, generator)
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    # The official export (transformers 4.x) prefixes every key with "text_model."; newer transformers do not.
    te_path = folder / "text_encoder" / "model.safetensors"
    te = load_file(str(te_path))
    save_file({(k if k.startswith("text_model.") else "text_model." + k): v.contiguous() for k, v in te.items()},
              str(te_path), metadata={"format": "pt"})
    write_tokenizer(folder / "tokenizer")

    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StreamDiffVSRPipeline", "_diffusers_version": "0.21.0.dev0",
        "controlnet": ["diffusers", "ControlNetModel"], "feature_extractor": [None, None],
        "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": [None, "TemporalAutoencoderTiny"],
    }, indent=2))
    return folder


def make_tiny_raft(path, seed: int = 0, small: bool = True) -> Path:
    """A randomly initialised torchvision RAFT state dict saved as .pth (torchvision's released format)."""
    from torchvision.models.optical_flow import raft_large, raft_small

    torch.manual_seed(seed)
    model = (raft_small if small else raft_large)(weights=None)
    path = Path(path)
    torch.save(model.state_dict(), path)
    return path


OFFICIAL_KEYS = Path(__file__).resolve().parent / "data" / "official_keys"


def official_keys(name: str) -> dict:
    """``{key: shape}`` of an official state dict, from the key lists of the hub checkpoint (one ``key<TAB>shape``
    line per tensor) kept in tests/data/official_keys."""
    rows = (line.split("\t") for line in (OFFICIAL_KEYS / name).read_text().splitlines() if line.strip())
    return {key: tuple(int(v) for v in shape.strip("()").split(",") if v.strip()) for key, shape in rows}
