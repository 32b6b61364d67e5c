"""CLIP text tower (transformers ``CLIPTextModel`` key layout) and the empty-prompt token ids.

Stream-DiffVSR only ever encodes the empty prompt, so the tower runs once at load time and is then dropped.
The token ids come straight from the tokenizer files: for an empty prompt, BPE never runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

KNOWN_LEFTOVER_KEYS = ("text_model.embeddings.position_ids",)


def _activation(name: str):
    if name == "gelu":
        return F.gelu
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    raise ValueError(f"text_encoder config: hidden_act={name!r} is not supported (use gelu or quick_gelu)")


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, operations, device, dtype):
        super().__init__()
        if dim % heads:
            raise ValueError(f"text_encoder config: hidden_size={dim} is not divisible by num_attention_heads={heads}")
        self.heads = heads
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self, name, operations.Linear(dim, dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def split(t):
            return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                             is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str, operations, device, dtype):
        super().__init__()
        self.act = _activation(act)
        self.fc1 = operations.Linear(dim, hidden, device=device, dtype=dtype)
        self.fc2 = operations.Linear(hidden, dim, device=device, dtype=dtype)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, config: dict, operations, device, dtype):
        super().__init__()
        dim, eps = int(config["hidden_size"]), float(config.get("layer_norm_eps", 1e-5))
        self.self_attn = _Attention(dim, int(config["num_attention_heads"]), operations, device, dtype)
        self.layer_norm1 = operations.LayerNorm(dim, eps=eps, device=device, dtype=dtype)
        self.mlp = _MLP(dim, int(config["intermediate_size"]), config.get("hidden_act", "quick_gelu"),
                        operations, device, dtype)
        self.layer_norm2 = operations.LayerNorm(dim, eps=eps, device=device, dtype=dtype)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Embeddings(nn.Module):
    def __init__(self, config: dict, operations, device, dtype):
        super().__init__()
        dim = int(config["hidden_size"])
        self.token_embedding = operations.Embedding(int(config["vocab_size"]), dim, device=device, dtype=dtype)
        self.position_embedding = operations.Embedding(int(config.get("max_position_embeddings", 77)), dim,
                                                       device=device, dtype=dtype)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(positions)[None]


class _Encoder(nn.Module):
    def __init__(self, config, operations, device, dtype):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(config, operations, device, dtype)
                                    for _ in range(int(config["num_hidden_layers"])))


class _TextModel(nn.Module):
    def __init__(self, config, operations, device, dtype):
        super().__init__()
        self.embeddings = _Embeddings(config, operations, device, dtype)
        self.encoder = _Encoder(config, operations, device, dtype)
        self.final_layer_norm = operations.LayerNorm(int(config["hidden_size"]),
                                                     eps=float(config.get("layer_norm_eps", 1e-5)),
                                                     device=device, dtype=dtype)


class CLIPTextTower(nn.Module):
    """``forward(input_ids)`` returns the last hidden state after ``final_layer_norm`` (B, N, hidden)."""

    def __init__(self, config: dict, operations=nn, device=None, dtype=None):
        super().__init__()
        _activation(config.get("hidden_act", "quick_gelu"))
        self.text_model = _TextModel(config, operations, device, dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.text_model.embeddings(input_ids)
        for layer in self.text_model.encoder.layers:
            x = layer(x)
        return self.text_model.final_layer_norm(x)


def _token(value) -> str:
    return value["content"] if isinstance(value, dict) else value


def empty_prompt_ids(tokenizer_dir) -> list[int]:
    """Token ids of ``""`` padded to the maximum length: ``[bos, eos, pad, pad, ...]``.

    The official tokenizer pads with "!" (id 0); other CLIP tokenizers pad with "<|endoftext|>", which gives a
    different embedding, so the pad token is read from the checkpoint's own files.
    """
    folder = Path(tokenizer_dir)
    vocab_path = folder / "vocab.json"
    if not vocab_path.exists():
        raise FileNotFoundError(f"missing tokenizer file {vocab_path}")
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    settings: dict = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).exists():
            settings.update({k: v for k, v in json.loads((folder / name).read_text(encoding="utf-8")).items()
                             if v is not None})
    bos = _token(settings.get("bos_token", "<|startoftext|>"))
    eos = _token(settings.get("eos_token", "<|endoftext|>"))
    pad = _token(settings.get("pad_token", eos))
    length = settings.get("model_max_length", 77)
    if not isinstance(length, int) or length > 10_000:  # transformers writes a huge sentinel for "unset"
        length = 77
    ids = []
    for token in (bos, eos, pad):
        if token not in vocab:
            raise ValueError(f"token {token!r} from the tokenizer settings is not in {vocab_path}")
        ids.append(vocab[token])
    return [ids[0], ids[1]] + [ids[2]] * (length - 2)

