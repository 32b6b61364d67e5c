"""CLIPTextTower against transformers' CLIPTextModel, and empty_prompt_ids against CLIPTokenizer, with tiny
models and vocabularies written by transformers' own save_pretrained."""

import json

import pytest
import torch
from safetensors.torch import load_file

from streamvsr.models.stream_diffvsr.clip_text import KNOWN_LEFTOVER_KEYS, CLIPTextTower, empty_prompt_ids

transformers = pytest.importorskip("transformers")

VOCAB = ["!", "a", "b", "c", "a</w>", "b</w>", "c</w>", "ab", "ab</w>", "<|startoftext|>", "<|endoftext|>"]
BOS, EOS = VOCAB.index("<|startoftext|>"), VOCAB.index("<|endoftext|>")


def _save_text_model(folder, hidden_act, seed):
    config = transformers.CLIPTextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, hidden_act=hidden_act, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0)
    torch.manual_seed(seed)
    ref = transformers.CLIPTextModel(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ref.parameters():  # move LayerNorms off identity and biases off zero
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    ref.save_pretrained(folder, safe_serialization=True)
    return ref


def _load_ours(folder):
    config = json.loads((folder / "config.json").read_text())
    sd = load_file(str(folder / "model.safetensors"))
    if not any(k.startswith("text_model.") for k in sd):
        # transformers >= 5 saves without the "text_model." prefix that the official export (4.x) has;
        # the loader adds it the same way.
        sd = {"text_model." + k: v for k, v in sd.items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # what older exports carry
    ours = CLIPTextTower(config).eval()
    leftovers = [k for k in sd if k.startswith(KNOWN_LEFTOVER_KEYS)]
    assert leftovers == ["text_model.embeddings.position_ids"]
    ours.load_state_dict({k: v for k, v in sd.items() if k not in leftovers}, strict=True)
    return ours


@pytest.mark.parametrize("hidden_act", ["gelu", "quick_gelu", "gelu_pytorch_tanh"])
def test_tower_matches_transformers(tmp_path, hidden_act):
    ref = _save_text_model(tmp_path / "te", hidden_act, seed=0)
    ours = _load_ours(tmp_path / "te")
    batches = {
        "empty prompt": torch.tensor([[BOS, EOS] + [0] * 75]),
        "random": torch.randint(0, 100, (2, 77), generator=torch.Generator().manual_seed(2)),
        "short": torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(3)),
    }
    with torch.no_grad():
        for name, ids in batches.items():
            expected = ref(input_ids=ids).last_hidden_state
            err = (ours(ids) - expected).abs().max().item()
            assert err <= 1e-5, (name, err)
        # causal: changing a later token leaves earlier positions alone
        ids = batches["random"][:1].clone()
        before = ours(ids)
        ids[0, 40] = (ids[0, 40] + 1) % 100
        after = ours(ids)
    assert torch.equal(before[:, :40], after[:, :40]) and (before[:, 40:] - after[:, 40:]).abs().max() > 1e-4


def test_unsupported_text_configs_are_rejected():
    base = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37,
            "vocab_size": 100, "max_position_embeddings": 77, "hidden_act": "gelu", "layer_norm_eps": 1e-5}
    CLIPTextTower(base, device="meta")
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextTower({**base, "hidden_act": "relu"}, device="meta")
    with pytest.raises(ValueError, match="num_attention_heads"):
        CLIPTextTower({**base, "num_attention_heads": 5}, device="meta")
    with pytest.raises(ValueError, match="n <= 77"):
        CLIPTextTower(base)(torch.zeros(1, 78, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------- tokenizer

def _write_raw_tokenizer(folder, pad, pad_as_dict=False, **config):
    """The official layout: vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(VOCAB)}))
    (folder / "merges.txt").write_text("#version: 0.2\na b</w>\na b\n")
    pad_entry = {"content": pad, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False} \
        if pad_as_dict else pad
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_entry,
               "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True, **special, **config}))
    return folder


def _reference_ids(folder, max_length=77):
    tok = transformers.CLIPTokenizer.from_pretrained(folder)
    return tok("", padding="max_length", max_length=max_length, truncation=True).input_ids


@pytest.mark.parametrize("pad,pad_id", [("!", 0), ("<|endoftext|>", EOS)])
@pytest.mark.parametrize("pad_as_dict", [False, True])
def test_empty_prompt_ids_match_clip_tokenizer(tmp_path, pad, pad_id, pad_as_dict):
    raw = _write_raw_tokenizer(tmp_path / "raw", pad, pad_as_dict)
    expected = _reference_ids(raw)
    assert expected == [BOS, EOS] + [pad_id] * 75
    assert empty_prompt_ids(raw) == expected
    # The same tokenizer written back by save_pretrained (whatever files this transformers version writes).
    transformers.CLIPTokenizer.from_pretrained(raw).save_pretrained(tmp_path / "saved")
    assert empty_prompt_ids(tmp_path / "saved") == _reference_ids(tmp_path / "saved") == expected


def test_special_tokens_map_overrides_tokenizer_config(tmp_path):
    folder = _write_raw_tokenizer(tmp_path, "!")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "pad_token": "<|endoftext|>"}))
    assert empty_prompt_ids(folder) == _reference_ids(folder) == [BOS, EOS] + [0] * 75


def test_defaults_and_padding_side(tmp_path):
    folder = _write_raw_tokenizer(tmp_path / "nopad", "!")
    (folder / "special_tokens_map.json").unlink()
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["pad_token"], cfg["model_max_length"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    # CLIPTokenizer pads with "<|endoftext|>" by default; without a stored length the pipeline's 77 applies.
    assert empty_prompt_ids(folder) == _reference_ids(folder) == [BOS, EOS] + [EOS] * 75
    left = _write_raw_tokenizer(tmp_path / "left", "!", padding_side="left")
    assert empty_prompt_ids(left) == _reference_ids(left) == [0] * 75 + [BOS, EOS]
    short = _write_raw_tokenizer(tmp_path / "short", "!", model_max_length=16)
    assert empty_prompt_ids(short) == _reference_ids(short, 16) == [BOS, EOS] + [0] * 14


def test_tokenizer_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        empty_prompt_ids(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        empty_prompt_ids(empty)
    folder = _write_raw_tokenizer(tmp_path / "badpad", "<pad>")
    with pytest.raises(ValueError, match=r"pad_token '<pad>'.*vocab\.json"):
        empty_prompt_ids(folder)
    broken = _write_raw_tokenizer(tmp_path / "broken", "!")
    (broken / "special_tokens_map.json").write_text("{not json")
    with pytest.raises(ValueError, match="special_tokens_map.json"):
        empty_prompt_ids(broken)
