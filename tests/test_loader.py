"""Loading the official folder layout and our single file, and the errors for damaged checkpoints."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import make_tiny_checkpoint
from streamvsr.models.stream_diffvsr.loader import WeightsError, convert_to_single_file, load_pipeline

pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def copy(checkpoint, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(checkpoint, dst)
    return dst


def _same_weights(a, b, atol=0.0):
    for name in ("unet", "controlnet", "vae"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.allclose(sa[k].float(), sb[k].float(), atol=atol, rtol=0), (name, k)


def test_folder_loads_every_tensor_strictly(checkpoint):
    pipe = load_pipeline(checkpoint)
    for name, sub in (("unet", "unet"), ("controlnet", "controlnet"), ("vae", "vae")):
        on_disk = load_file(str(checkpoint / sub / "diffusion_pytorch_model.safetensors"))
        loaded = getattr(pipe, name).state_dict()
        assert on_disk.keys() == loaded.keys()
        assert all(torch.equal(on_disk[k], loaded[k]) for k in on_disk)
    assert pipe.prompt_embeds.shape == (1, 77, 32)


def test_prompt_embedding_matches_transformers(checkpoint):
    tokenizer = transformers.CLIPTokenizer.from_pretrained(checkpoint / "tokenizer")
    model = transformers.CLIPTextModel.from_pretrained(checkpoint / "text_encoder").eval()
    ids = tokenizer("", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids[0, :3].tolist() == [tokenizer.bos_token_id, tokenizer.eos_token_id, 0]  # pad "!" is id 0
    with torch.no_grad():
        expected = model(ids)[0]
    assert (load_pipeline(checkpoint).prompt_embeds - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_single_file_round_trip(checkpoint, tmp_path, dtype):
    out = convert_to_single_file(checkpoint, tmp_path / "streamvsr.safetensors", dtype=dtype)
    single = load_pipeline(out)
    folder = load_pipeline(checkpoint)
    assert torch.equal(single.prompt_embeds, folder.prompt_embeds)
    assert single.scheduler_config == folder.scheduler_config
    tol = {torch.float32: 0.0, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    _same_weights(single, folder, atol=tol)
    assert load_pipeline(out, dtype=torch.float16).unet.conv_in.weight.dtype == torch.float16


def test_a_conversion_that_fails_leaves_no_part_file(checkpoint, tmp_path, monkeypatch):
    """The converted file is written under OUT.part first: a failure (a full disk, the move refused) must not leave
    it behind; it is as large as the model."""
    import os

    from streamvsr.models.stream_diffvsr import loader

    def refuse(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loader.os, "replace", refuse)
    with pytest.raises(OSError, match="No space left"):
        convert_to_single_file(checkpoint, tmp_path / "out.safetensors")
    assert os.listdir(tmp_path) == []


def test_known_leftover_is_tolerated(copy, caplog):
    path = copy / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(path))
    sd["class_embedding.weight"] = torch.zeros(1000, 128)
    save_file(sd, str(path))
    with caplog.at_level("INFO"):
        load_pipeline(copy)
    assert "class_embedding.weight" in caplog.text


def test_missing_and_unexpected_keys_are_named(copy):
    path = copy / "controlnet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(path))
    del sd["controlnet_mid_block.weight"]
    sd["surprise.weight"] = torch.zeros(1)
    save_file(sd, str(path))
    with pytest.raises(WeightsError) as e:
        load_pipeline(copy)
    msg = str(e.value)
    assert "controlnet_mid_block.weight" in msg and "surprise.weight" in msg and str(path) in msg
    assert "Jamichsu/Stream-DiffVSR" in msg


def test_wrong_file_for_component(copy):
    # The VAE's weights where the UNet's should be.
    shutil.copy(copy / "vae" / "diffusion_pytorch_model.safetensors",
                copy / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError, match="unet weights .* do not match"):
        load_pipeline(copy)


def _cut(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_file(copy):
    path = copy / "unet" / "diffusion_pytorch_model.safetensors"
    size = path.stat().st_size
    _cut(path)
    with pytest.raises(WeightsError, match=f"unet.diffusion_pytorch_model.safetensors is damaged .*cut short: its "
                                           f"tensors need {size:,} bytes; delete it and download it again"):
        load_pipeline(copy)


def test_truncated_single_file(checkpoint, tmp_path):
    out = convert_to_single_file(checkpoint, tmp_path / "m.safetensors")
    out.write_bytes(out.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="truncated"):
        load_pipeline(out)


@pytest.mark.parametrize("component", ["unet", "controlnet", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_missing_component(copy, component):
    shutil.rmtree(copy / component)
    with pytest.raises(WeightsError, match=component):
        load_pipeline(copy)


def test_unsupported_config_value(copy):
    cfg_path = copy / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_class_embeds"] = 1000
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="num_class_embeds"):
        load_pipeline(copy)


@pytest.mark.parametrize("edit", [{"block_out_channels": 5}, {"attention_head_dim": 0}, {"in_channels": -4}])
def test_a_damaged_config_value_is_a_weights_error_not_a_traceback(checkpoint, tmp_path, edit):
    dst = tmp_path / "model"
    shutil.copytree(checkpoint, dst)
    cfg_path = dst / "unet" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **edit}))
    with pytest.raises(WeightsError, match="the unet config that comes with .* is not supported"):
        load_pipeline(dst)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_pipeline(tmp_path / "nothing")
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(WeightsError, match="not a Stream-DiffVSR single file"):
        load_pipeline(other)


@pytest.fixture
def built(monkeypatch):
    """The components the loader builds, in order: a damaged download should be found before any of them."""
    from streamvsr.models.stream_diffvsr import loader

    names = []
    real = loader.build_component

    def spy(cls, config, state_dict, component, *args, **kwargs):
        names.append(component)
        return real(cls, config, state_dict, component, *args, **kwargs)

    monkeypatch.setattr(loader, "build_component", spy)
    return names


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("damage, match", [
    (lambda m: (m / "scheduler" / "scheduler_config.json").unlink(), "scheduler_config.json"),
    (lambda m: (m / "scheduler" / "scheduler_config.json").write_text("{not json"), "not valid JSON"),
    (lambda m: (m / "scheduler" / "scheduler_config.json").write_text("[1, 2]"), "not an object"),
    (lambda m: _edit_json(m / "scheduler" / "scheduler_config.json", clip_sample=True), "clip_sample"),
    (lambda m: (m / "tokenizer" / "vocab.json").unlink(), "vocab.json"),
    (lambda m: (m / "text_encoder" / "model.safetensors").unlink(), "no weights in"),
    (lambda m: (m / "text_encoder" / "config.json").unlink(), "text_encoder"),
    (lambda m: (m / "vae" / "diffusion_pytorch_model.safetensors").unlink(), "no weights in"),
    (lambda m: _cut(m / "vae" / "diffusion_pytorch_model.safetensors"), "vae.* cut short"),
    (lambda m: _cut(m / "controlnet" / "diffusion_pytorch_model.safetensors", 0.0001),
     "controlnet.* cut short before the end of its header"),
    (lambda m: (m / "unet" / "diffusion_pytorch_model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n"), "unet.* Git LFS pointer"),
    (lambda m: (m / "text_encoder" / "model.safetensors").write_bytes(b""), "model.safetensors is empty"),
], ids=["no-scheduler", "scheduler-bad-json", "scheduler-not-object", "scheduler-unsupported", "no-vocab",
        "no-text-weights", "no-text-config", "no-vae-weights", "cut-vae", "cut-controlnet-header", "lfs-unet",
        "empty-text-weights"])
def test_folder_small_files_are_checked_before_any_weights_load(copy, built, damage, match):
    damage(copy)
    with pytest.raises(WeightsError, match=match):
        load_pipeline(copy)
    assert built == []


def test_folder_loads_text_encoder_first(copy, built):
    # Encoding the prompt first frees the 1.4 GB text encoder before the large components load.
    load_pipeline(copy)
    assert built == ["text_encoder", "unet", "controlnet", "vae"]


@pytest.fixture(scope="module")
def single(checkpoint, tmp_path_factory):
    return convert_to_single_file(checkpoint, tmp_path_factory.mktemp("single") / "m.safetensors")


def _rewrite_single(src, dst, edit_meta=lambda m: None, edit_tensors=lambda t: None):
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(src))
    edit_meta(meta)
    edit_tensors(tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize("edit_meta, edit_tensors, match", [
    (lambda m: m.pop("scheduler_config"), None, "no scheduler_config in its metadata"),
    (lambda m: m.update(unet_config="{oops"), None, "unet_config in its metadata is not valid JSON"),
    (lambda m: m.update(vae_config="3"), None, "vae_config in its metadata is not a JSON object"),
    (lambda m: m.update(scheduler_config=json.dumps({"prediction_type": "flow"})), None, "prediction_type"),
    (None, lambda t: t.pop("prompt_embeds"), "no prompt_embeds"),
    (None, lambda t: t.update(prompt_embeds=torch.zeros(1, 77, 16)), r"prompt embedding .* \(1, 77, 16\)"),
    (None, lambda t: t.update(extra=torch.zeros(1)), "unexpected tensors: extra"),
], ids=["no-scheduler", "unet-bad-json", "vae-not-object", "scheduler-unsupported", "no-prompt", "prompt-width",
        "unexpected"])
def test_single_file_metadata_is_checked_before_any_weights_load(single, tmp_path, built, edit_meta, edit_tensors,
                                                                 match):
    damaged = _rewrite_single(single, tmp_path / "damaged.safetensors",
                              edit_meta or (lambda m: None), edit_tensors or (lambda t: None))
    with pytest.raises(WeightsError, match=match):
        load_pipeline(damaged)
    assert built == []


# safetensors' words for a failed write: from 0.6.1, and before it (0.4 and 0.5, which requirements.txt admits)
NEW_IO_ERROR = ("Error while serializing: I/O error: There is not enough space on the disk. (os error {code}) at "
                'path "X"')
OLD_IO_ERROR = 'Error while serializing: IoError(Os {{ code: {code}, kind: StorageFull, message: "No space left" }})'


@pytest.mark.parametrize("system,code,expected,words", [
    ("posix", 28, 28, NEW_IO_ERROR), ("nt", 112, None, NEW_IO_ERROR), ("posix", 28, 28, OLD_IO_ERROR)])
def test_a_full_disk_while_writing_weights_is_the_os_error_it_is(tmp_path, monkeypatch, system, code, expected,
                                                                  words):
    """safetensors reports a failed write in its own type with the system's number in the text: an errno on POSIX,
    a Windows error code on Windows (112: disk full), which was read as errno 112, "Host is down" on Linux."""
    import safetensors.torch
    from safetensors import SafetensorError

    from streamvsr.models.shared import weights

    def full(*args, **kwargs):
        raise SafetensorError(words.format(code=code))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr(weights.os, "name", system)
    try:
        with pytest.raises(OSError) as e:
            weights.save_safetensors({"x": torch.zeros(1)}, tmp_path / "out.safetensors")
    finally:
        monkeypatch.undo()
    assert e.value.filename == str(tmp_path / "out.safetensors") and e.value.errno == expected
    assert expected is not None or "not enough space" in e.value.strerror  # (Windows maps 112 to ENOSPC itself)
