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

# Buffers some exports carry that the tower recomputes (transformers < 4.31 saved the position ids).
KNOWN_LEFTOVER_KEYS = ("text_model.embeddings.position_ids",)

# CLIPTextConfig's own defaults, used only for keys a config leaves out.
DEFAULTS = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": _quick_gelu, "gelu_pytorch_tanh": _tanh_gelu, "gelu_new": _tanh_gelu}


def _settings(config: dict) -> dict:
    s = {k: config.get(k, v) for k, v in DEFAULTS.items()}
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings"):
        if isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] < 1:
            raise ValueError(f"text_encoder config: {key}={s[key]!r} must be a positive integer")
    if s["hidden_act"] not in ACTIVATIONS:
        raise ValueError(f"text_encoder config: hidden_act={s['hidden_act']!r} is not supported "
                         f"(use one of {sorted(ACTIVATIONS)})")
    if s["hidden_size"] % s["num_attention_heads"]:
        raise ValueError(f"text_encoder config: hidden_size={s['hidden_size']} is not divisible by "
                         f"num_attention_heads={s['num_attention_heads']}")
    if isinstance(s["layer_norm_eps"], bool) or not isinstance(s["layer_norm_eps"], (int, float)) \
            or not s["layer_norm_eps"] > 0:
        raise ValueError(f"text_encoder config: layer_norm_eps={s['layer_norm_eps']!r} must be a positive number")
    return s


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, operations, device, dtype):
        super().__init__()
        self.heads = heads
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self, name, operations.Linear(dim, dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def heads(t):
            return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

        # CLIP's text tower is causal even though every prompt token may see the padding after it otherwise.
        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                             is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str, operations, device, dtype):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.fc1 = operations.Linear(dim, hidden, device=device, dtype=dtype)
        self.fc2 = operations.Linear(hidden, dim, device=device, dtype=dtype)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, s: dict, operations, device, dtype):
        super().__init__()
        dim, eps = s["hidden_size"], float(s["layer_norm_eps"])
        self.self_attn = _Attention(dim, s["num_attention_heads"], operations, device, dtype)
        self.layer_norm1 = operations.LayerNorm(dim, eps=eps, device=device, dtype=dtype)
        self.mlp = _MLP(dim, s["intermediate_size"], s["hidden_act"], operations, device, dtype)
        self.layer_norm2 = operations.LayerNorm(dim, eps=eps, device=device, dtype=dtype)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Embeddings(nn.Module):
    def __init__(self, s: dict, operations, device, dtype):
        super().__init__()
        dim = s["hidden_size"]
        self.token_embedding = operations.Embedding(s["vocab_size"], dim, device=device, dtype=dtype)
        self.position_embedding = operations.Embedding(s["max_position_embeddings"], dim, device=device, dtype=dtype)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(positions)[None]


class _Encoder(nn.Module):
    def __init__(self, s: dict, operations, device, dtype):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(s, operations, device, dtype) for _ in range(s["num_hidden_layers"]))


class _TextModel(nn.Module):
    def __init__(self, s: dict, operations, device, dtype):
        super().__init__()
        self.embeddings = _Embeddings(s, operations, device, dtype)
        self.encoder = _Encoder(s, operations, device, dtype)
        self.final_layer_norm = operations.LayerNorm(s["hidden_size"], eps=float(s["layer_norm_eps"]),
                                                     device=device, dtype=dtype)


class CLIPTextTower(nn.Module):
    """``forward(input_ids)`` returns the last hidden state after ``final_layer_norm`` (B, N, hidden)."""

    def __init__(self, config: dict, operations=nn, device=None, dtype=None):
        super().__init__()
        s = _settings(config)
        self.max_length = s["max_position_embeddings"]
        self.text_model = _TextModel(s, operations, device, dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.ndim != 2 or input_ids.shape[1] > self.max_length:
            raise ValueError(f"input_ids must be (batch, n) with n <= {self.max_length}, got {tuple(input_ids.shape)}")
        x = self.text_model.embeddings(input_ids)
        for layer in self.text_model.encoder.layers:
            x = layer(x)
        return self.text_model.final_layer_norm(x)


# ---------------------------------------------------------------------------------------------- tokenizer files

# CLIPTokenizer's constructor defaults; the official tokenizer overrides only the pad token ("!").
TOKEN_DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
DEFAULT_MAX_LENGTH = 77
_UNSET_MAX_LENGTH = 10**6  # transformers writes int(1e30) when a tokenizer has no length of its own


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"tokenizer file {path} is not valid JSON ({e})") from None


def _content(value):
    # Special tokens are stored as plain strings or as serialised AddedToken dicts.
    return value.get("content") if isinstance(value, dict) else value


def _vocabulary(folder: Path) -> tuple[dict[str, int], Path]:
    """token -> id for the ids the empty prompt needs: the BPE vocabulary plus any added tokens."""
    vocab: dict[str, int] = {}
    if (folder / "vocab.json").exists():
        source = folder / "vocab.json"
        vocab.update(_read_json(source))
    elif (folder / "tokenizer.json").exists():  # transformers >= 5 writes only the fast-tokenizer file
        source = folder / "tokenizer.json"
        data = _read_json(source)
        vocab.update((data.get("model") or {}).get("vocab") or {})
        vocab.update({t["content"]: t["id"] for t in data.get("added_tokens") or []})
    else:
        raise FileNotFoundError(f"missing tokenizer file {folder / 'vocab.json'} (nor is there a tokenizer.json)")
    if (folder / "added_tokens.json").exists():
        vocab.update(_read_json(folder / "added_tokens.json"))
    if (folder / "tokenizer_config.json").exists():
        decoder = _read_json(folder / "tokenizer_config.json").get("added_tokens_decoder") or {}
        vocab.update({_content(v): int(k) for k, v in decoder.items()})
    return vocab, source


def empty_prompt_ids(tokenizer_dir) -> list[int]:
    """Token ids of ``""`` padded to the tokenizer's maximum length: ``[bos, eos, pad, pad, ...]``.

    The official tokenizer pads with "!" (id 0); other CLIP tokenizers pad with "<|endoftext|>", which gives a
    different embedding, so the pad token is read from the checkpoint's own files. As in transformers,
    special_tokens_map.json overrides tokenizer_config.json.
    """
    folder = Path(tokenizer_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    vocab, vocab_source = _vocabulary(folder)
    settings: dict = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).exists():
            data = _read_json(folder / name)
            settings.update({k: v for k, v in data.items() if v is not None})

    ids = []
    for key in ("bos_token", "eos_token", "pad_token"):
        token = _content(settings.get(key, TOKEN_DEFAULTS[key]))
        if token not in vocab:
            raise ValueError(f"{key} {token!r} from the tokenizer settings in {folder} is not in {vocab_source}")
        ids.append(int(vocab[token]))
    bos, eos, pad = ids

    length = settings.get("model_max_length", DEFAULT_MAX_LENGTH)
    if isinstance(length, float) and length.is_integer():
        length = int(length)
    if isinstance(length, int) and length >= _UNSET_MAX_LENGTH:
        length = DEFAULT_MAX_LENGTH
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"model_max_length={length!r} in {folder / 'tokenizer_config.json'} must be an integer >= 2")
    padding = [pad] * (length - 2)
    if settings.get("padding_side", "right") == "left":
        return padding + [bos, eos]
    return [bos, eos] + padding
