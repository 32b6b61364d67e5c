"""The real-size Stream-DiffVSR architecture with random weights, for benchmarks.

The official configs (spec §1.3-1.5: SD-x4-upscaler UNet with 7 input channels and no class embedding, the ARTG
ControlNet made from it, the temporal tiny autoencoder) are written out here, so benchmarks can run at the real
size without the 4 GB download. ``write_hub_folder`` writes such a model in the official hub layout (diffusers
key names, safetensors), which both this package and the official pipeline load; the text encoder is a one-layer
CLIP stand-in with the real width (1024) and the tokenizer a tiny vocabulary whose pad token is "!", as the
official one.
"""

from __future__ import annotations

import json
from pathlib import Path

UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.27.2", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [256, 512, 512, 1024], "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 7, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_class_embeds": None, "only_cross_attention": [True, True, True, False],
    "out_channels": 4, "sample_size": 128,
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": False, "use_linear_projection": True,
}
CONTROLNET_CONFIG = {
    **{k: v for k, v in UNET_CONFIG.items() if k not in ("out_channels", "up_block_types", "sample_size")},
    "_class_name": "ControlNetModel", "class_embed_type": None, "conditioning_channels": 3,
    "conditioning_embedding_out_channels": [64, 128, 256], "controlnet_conditioning_channel_order": "rgb",
    "global_pool_conditions": False,
}
VAE_CONFIG = {
    "_class_name": "TemporalAutoencoderTiny", "_diffusers_version": "0.27.2", "act_fn": "relu",
    "block_out_channels": [64, 64, 64], "decoder_block_out_channels": [64, 64, 64],
    "encoder_block_out_channels": [64, 64, 64], "force_upcast": False, "in_channels": 3, "latent_channels": 4,
    "latent_magnitude": 3, "latent_shift": 0.5, "num_decoder_blocks": [3, 3, 1], "num_encoder_blocks": [1, 3, 3],
    "out_channels": 3, "scaling_factor": 1.0, "shift_factor": 0.0, "upsample_fn": "nearest",
    "upsampling_scaling_factor": 2,
}
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.21.0.dev0", "beta_end": 0.02,
    "beta_schedule": "scaled_linear", "beta_start": 0.0001, "clip_sample": False, "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "thresholding": False, "timestep_spacing": "trailing", "trained_betas": None,
}
TOKENS = ["!", "a", "b", "c", "a</w>", "b</w>", "c</w>", "ab", "ab</w>", "<|startoftext|>", "<|endoftext|>"]
TEXT_CONFIG = {
    "_name_or_path": "stand-in", "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
    "vocab_size": len(TOKENS), "hidden_size": 1024, "intermediate_size": 256, "num_hidden_layers": 1,
    "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu", "layer_norm_eps": 1e-05,
    "projection_dim": 16, "bos_token_id": len(TOKENS) - 2, "eos_token_id": len(TOKENS) - 1, "pad_token_id": 0,
    "torch_dtype": "float32",
}
MODEL_INDEX = {
    "_class_name": "StreamDiffVSRPipeline", "_diffusers_version": "0.21.0.dev0",
    "controlnet": ["diffusers", "ControlNetModel"], "feature_extractor": [None, None],
    "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": [None, "TemporalAutoencoderTiny"],
}


def random_modules(seed: int = 0):
    """UNet, ControlNet, temporal VAE and text tower of the real-size architecture, PyTorch default init."""
    import torch

    from streamvsr.models.stream_diffvsr.clip_text import CLIPTextTower
    from streamvsr.models.stream_diffvsr.controlnet import ControlNet
    from streamvsr.models.stream_diffvsr.tiny_vae import TemporalAutoencoderTiny
    from streamvsr.models.stream_diffvsr.unet import UNet

    torch.manual_seed(seed)
    return {"unet": UNet(UNET_CONFIG), "controlnet": ControlNet(CONTROLNET_CONFIG),
            "vae": TemporalAutoencoderTiny(VAE_CONFIG), "text_encoder": CLIPTextTower(TEXT_CONFIG)}


def write_hub_folder(folder, seed: int = 0) -> Path:
    """Write a random real-size model in the official hub layout into ``folder`` (about 2.7 GB); return it."""
    from safetensors.torch import save_file

    folder = Path(folder)
    modules = random_modules(seed)
    configs = {"unet": UNET_CONFIG, "controlnet": CONTROLNET_CONFIG, "vae": VAE_CONFIG}
    for name in list(modules):
        module = modules.pop(name)  # freed as we go (2.7 GB in total)
        sub = folder / name
        sub.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        if name == "text_encoder":
            state = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}
            (sub / "config.json").write_text(json.dumps(TEXT_CONFIG, indent=2))
            save_file(state, str(sub / "model.safetensors"), metadata={"format": "pt"})
        else:
            (sub / "config.json").write_text(json.dumps(configs[name], indent=2))
            save_file(state, str(sub / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    tok = folder / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    (tok / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(TOKENS)}))
    (tok / "merges.txt").write_text("#version: 0.2\na b</w>\na b\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
               "unk_token": "<|endoftext|>"}
    (tok / "special_tokens_map.json").write_text(json.dumps(special))
    (tok / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True, **special}))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return folder
