"""FlashVSR weight files: the official folder and the ports' repackagings load, damaged or foreign files give a
WeightsError naming the file (and keys), pickled code is refused without running, version hints warn, and the
converted single file round-trips."""

import logging
import os
import pickle
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from flashvsr_helpers import one_thread, write_official_folder, write_repackaged
from streamvsr.models.flashvsr import weights as fw
from streamvsr.models.flashvsr.lq_proj import LQProjection
from streamvsr.models.flashvsr.tc_decoder import TCDecoder
from streamvsr.models.shared.errors import UserInputError, WeightsError


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


@pytest.fixture
def official(tmp_path):
    folder = tmp_path / "FlashVSR"
    return folder, write_official_folder(folder)


def assert_same(loaded: dict, written: dict):
    assert loaded.keys() == written.keys()
    for k in written:
        assert loaded[k].dtype == written[k].dtype and torch.equal(loaded[k], written[k]), k


def test_official_folder_loads(official, caplog):
    folder, sd = official
    with caplog.at_level(logging.INFO):
        w = fw.read_flashvsr(folder, "v1.1")
    assert_same(w.dit, sd["dit"])
    assert_same(w.lq_proj, sd["lq_proj"])
    assert_same(w.tc_decoder, sd["tc_decoder"])  # the unused entries are dropped...
    assert w.facts["ignored"]["tc_decoder"] == ["encoder.0.bias", "encoder.0.weight"]  # ...and logged
    assert "ignoring 2 unused entries" in caplog.text and "TCDecoder.ckpt" in caplog.text
    for picked in ("diffusion_pytorch_model_streaming_dmd.safetensors", "LQ_proj_in.ckpt", "posi_prompt.pth"):
        assert fw.find_files(folder / picked) == fw.find_files(folder)
    assert torch.equal(w.prompt, sd["prompt"]) and w.prompt.shape == (1, 16, 64)
    assert w.facts["dtypes"] == {"dit": "float32", "lq_proj": "bfloat16", "tc_decoder": "float32",
                                 "prompt": "bfloat16"}
    assert w.facts["lq_proj"]["hidden1"] == 32 and w.facts["tc_decoder"]["channels"] == (32, 16, 8, 8)
    assert w.facts["dit"]["dim"] == 256 and w.facts["dit"]["num_layers"] == 2


def test_entries_that_are_not_tensors_are_left_out_as_pytorch_loading_does(official, caplog):
    """The official code loads TCDecoder.ckpt non-strictly, ignoring entries whatever they hold; a checkpoint may
    carry a step count or a config beside its weights."""
    from streamvsr.models.shared.weights import read_state_dict

    folder, sd = official
    torch.save({**sd["tc_decoder"], "step": 12000, "config": {"channels": [64, 64]}}, folder / "TCDecoder.ckpt")
    with caplog.at_level(logging.INFO):
        w = fw.read_flashvsr(folder, "v1.1")
    assert_same(w.tc_decoder, sd["tc_decoder"])
    assert "left out 2 entries that are not tensors: config, step" in caplog.text
    torch.save({"step": 12000, "config": {}}, folder / "other.ckpt")
    with pytest.raises(WeightsError, match="does not hold a state dict of tensors"):
        read_state_dict(folder / "other.ckpt")


def test_load_builds_modules_from_the_given_operations(official):
    folder, sd = official
    made = []

    def counting(cls):
        return type(cls.__name__, (cls,), {"__init__": lambda self, *a, **k: (made.append(cls.__name__),
                                                                            cls.__init__(self, *a, **k))[1]})

    ops = SimpleNamespace(**{n: counting(getattr(nn, n)) for n in ("Conv2d", "Conv3d", "Linear", "LayerNorm")})
    model = fw.load_flashvsr(folder, "v1", dtype=torch.float32, operations=ops, decoder_dtype=torch.float16,
                             verify_version=False)
    assert isinstance(model.lq_proj, LQProjection) and model.lq_proj.version == "v1"
    assert isinstance(model.tc_decoder, TCDecoder) and model.tc_decoder.decoder[1].weight.dtype == torch.float16
    assert {"Conv2d", "Conv3d", "Linear"} <= set(made)
    assert all(not p.is_meta for p in model.lq_proj.parameters())
    assert torch.equal(model.lq_proj.conv1.weight, sd["lq_proj"]["conv1.weight"].float())
    assert model.dit is not None and model.dit_state_dict == {}
    assert torch.equal(model.dit.state_dict()["blocks.1.ffn.2.weight"], sd["dit"]["blocks.1.ffn.2.weight"])
    lazy = fw.load_flashvsr(folder, "v1", dtype=torch.float32, build_dit=False, verify_version=False)
    assert lazy.dit is None and lazy.dit_state_dict.keys() == sd["dit"].keys()


def test_lq_prefix_and_fp32_lq_load(tmp_path):
    sd = write_official_folder(tmp_path, lq_prefix=True, lq_dtype=torch.float32, tc_extras=False)
    w = fw.read_flashvsr(tmp_path, "v1", verify_version=False)
    assert_same(w.lq_proj, sd["lq_proj"])
    assert w.facts["ignored"] == {}


@pytest.mark.parametrize("style,hinted", [("1038lab", "v1.1"), ("kijai", "v1")])
def test_repackaged_files_load(tmp_path, style, hinted, caplog):
    sd = write_repackaged(tmp_path, style)
    w = fw.read_flashvsr(tmp_path, hinted)
    assert_same(w.dit, sd["dit"])
    assert_same(w.lq_proj, sd["lq_proj"])
    assert_same(w.tc_decoder, sd["tc_decoder"])
    assert torch.equal(w.prompt, sd["prompt"])
    assert w.facts["version_hints"] and w.facts["version_hints"][0][1] == hinted
    assert "ghosting" not in caplog.text
    other = "v1" if hinted == "v1.1" else "v1.1"
    with caplog.at_level(logging.WARNING):
        fw.read_flashvsr(tmp_path, other)
    assert f"says {hinted}" in caplog.text  # the file name contradicts the chosen version


@pytest.mark.parametrize("style,named", [("1038lab", "v1.1"), ("kijai", "v1")])
def test_without_a_version_a_release_named_by_its_file_loads_as_that_release(tmp_path, style, named, caplog):
    """The command line leaves the version to the model (no --flashvsr-version): a DiT file whose name says its
    release loads as that release, with no warning."""
    from streamvsr.models.flashvsr import load_pipeline

    write_repackaged(tmp_path, style)
    with caplog.at_level(logging.WARNING):
        assert load_pipeline(tmp_path).version == named
    assert "says" not in caplog.text


def test_without_a_version_official_files_load_as_their_lq_file_or_folder_says_or_are_refused(tmp_path, monkeypatch):
    """The official names are the same for both releases. The published v1.1 LQ file says v1.1 wherever it is; a
    folder named for a release says that one ("FlashVSR" is the v1 repository's name and the v1 download's folder);
    where nothing says it and the LQ file is not the published v1.1 one (the official v1 file has no published
    hash), the load is refused with what to choose: it went on as v1.1, which gives v1 files ghosting."""
    from streamvsr.models.flashvsr import load_pipeline
    from streamvsr.models.shared.errors import UserInputError

    for name, version in (("FlashVSR-v1.1", "v1.1"), ("FlashVSR", "v1"), ("flashvsr_V1", "v1"), ("my v1", "v1")):
        write_official_folder(tmp_path / name)
        assert load_pipeline(tmp_path / name).version == version, name
    monkeypatch.chdir(tmp_path / "FlashVSR-v1.1")  # (given as "." from inside it: the folder's name still counts)
    assert load_pipeline(".").version == "v1.1"
    neutral = tmp_path / "weights"
    write_official_folder(neutral)
    with pytest.raises(UserInputError, match=r"does not say which FlashVSR release it holds, and its LQ_proj_in\.ckpt "
                                              r"is not the published v1\.1 file .*: choose the version, v1 or v1\.1"):
        load_pipeline(neutral)
    assert load_pipeline(neutral, version="v1").version == "v1"
    published = fw.sha256_of(neutral / "LQ_proj_in.ckpt")[:16]
    monkeypatch.setattr(fw, "LQ_SHA256", {published: "v1.1"})  # (as the published v1.1 file's hash would)
    assert load_pipeline(neutral).version == "v1.1"
    (tmp_path / "FlashVSR").rename(tmp_path / "old")
    write_official_folder(tmp_path / "FlashVSR")  # (the same tiny weights: the published file, in a "v1" folder)
    assert load_pipeline(tmp_path / "FlashVSR").version == "v1.1"


def test_a_folder_with_both_releases_dit_gives_the_chosen_one(tmp_path):
    """1038lab's folder holds the v1.1 DiT (FlashVSR1_1.safetensors) and the v1 one under kijai's name: the
    chosen version picks the file, whichever comes first in the list of known names."""
    from safetensors.torch import save_file

    new = write_repackaged(tmp_path, "1038lab", seed=1)
    old = write_repackaged(tmp_path / "kijai", "kijai", seed=2)
    save_file(old["dit"], str(tmp_path / "Wan2_1-T2V-1_3B_FlashVSR_fp32.safetensors"))
    assert fw.find_files(tmp_path, "v1").dit.name == "Wan2_1-T2V-1_3B_FlashVSR_fp32.safetensors"
    assert fw.find_files(tmp_path, "v1.1").dit.name == "FlashVSR1_1.safetensors"
    assert_same(fw.read_flashvsr(tmp_path, "v1", verify_version=False).dit, old["dit"])
    assert_same(fw.read_flashvsr(tmp_path, "v1.1", verify_version=False).dit, new["dit"])


def test_dit_with_merged_lq_projection(tmp_path):
    from safetensors.torch import save_file

    sd = write_official_folder(tmp_path)
    merged = {**sd["dit"], **{"LQ_proj_in." + k: v for k, v in sd["lq_proj"].items()}}
    save_file(merged, str(tmp_path / "diffusion_pytorch_model_streaming_dmd.safetensors"))
    (tmp_path / "LQ_proj_in.ckpt").unlink()
    w = fw.read_flashvsr(tmp_path, "v1.1")
    assert_same(w.dit, sd["dit"])
    assert_same(w.lq_proj, sd["lq_proj"])
    assert fw.detect(tmp_path / "diffusion_pytorch_model_streaming_dmd.safetensors")


def test_version_is_required(official):
    folder, _ = official
    with pytest.raises(UserInputError, match="v1 or v1.1"):
        fw.read_flashvsr(folder)
    with pytest.raises(ValueError, match="version"):
        fw.read_flashvsr(folder, "v2")


def test_lq_hash_warns_when_the_version_contradicts_it(official, caplog, monkeypatch):
    folder, _ = official
    digest = fw.sha256_of(folder / "LQ_proj_in.ckpt")
    monkeypatch.setattr(fw, "LQ_SHA256", {digest[:16]: "v1.1"})
    with caplog.at_level(logging.WARNING):
        w = fw.read_flashvsr(folder, "v1")
    assert w.facts["lq_sha256"] == digest
    assert "sha256 of LQ_proj_in.ckpt" in caplog.text and "says v1.1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fw.read_flashvsr(folder, "v1.1")
    assert caplog.text == ""


def test_unknown_lq_file_loaded_as_v1_1_warns(official, caplog):
    folder, _ = official
    with caplog.at_level(logging.WARNING):
        fw.read_flashvsr(folder, "v1.1")
    assert "is not the published v1.1 file" in caplog.text


# --- damaged and foreign files --------------------------------------------------------------------------------


def test_truncated_pickle(official):
    folder, _ = official
    path = folder / "LQ_proj_in.ckpt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match="LQ_proj_in.ckpt"):
        fw.read_flashvsr(folder, "v1")


def test_truncated_safetensors(official):
    folder, _ = official
    path = folder / "diffusion_pytorch_model_streaming_dmd.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(WeightsError, match="diffusion_pytorch_model_streaming_dmd"):
        fw.read_flashvsr(folder, "v1")


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # (no shell: a path with a space would have made it a payload that never runs)
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("name", ["LQ_proj_in.ckpt", "TCDecoder.ckpt", "posi_prompt.pth"])
@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_pickled_code_is_refused_and_not_run(official, tmp_path, name, how):
    folder, _ = official
    marker = tmp_path / "payload-ran"
    evil = {"conv1.weight": Payload(marker)}
    if how == "torch":
        torch.save(evil, folder / name)
    else:
        with open(folder / name, "wb") as f:
            pickle.dump(evil, f, protocol=2)
    with pytest.raises(WeightsError, match=name) as e:
        fw.read_flashvsr(folder, "v1")
    assert not marker.exists()
    assert "weights_only" not in str(e.value)  # (torch's advice to load it with weights_only=False would run it)
    if how == "pickle":  # the payload is live: an unrestricted unpickler runs it
        with open(folder / name, "rb") as f:
            pickle.load(f)
        assert marker.exists()


def test_git_lfs_pointer(official):
    folder, _ = official
    (folder / "TCDecoder.ckpt").write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:e224bdcf2f52745cbf4d393ff5374c2ba09e90285d5d19062d2bf63b915b6161\nsize 189018333\n")
    with pytest.raises(WeightsError, match="TCDecoder.ckpt is a Git LFS pointer"):
        fw.read_flashvsr(folder, "v1")


@pytest.mark.parametrize("name", ["TCDecoder.ckpt", "LQ_proj_in.ckpt", "posi_prompt.pth"])
def test_a_cut_short_small_file_is_found_before_the_dit_is_read(official, monkeypatch, name):
    folder, _ = official
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    real = fw.read_state_dict

    def reader(path, *args, **kwargs):
        assert not str(path).endswith(".safetensors"), "read the DiT first"
        return real(path, *args, **kwargs)

    monkeypatch.setattr(fw, "read_state_dict", reader)
    with pytest.raises(WeightsError, match=f"{name} is damaged .*: a PyTorch archive that is cut short; delete it"):
        fw.read_flashvsr(folder, "v1.1")


def test_html_page(official):
    folder, _ = official
    (folder / "LQ_proj_in.ckpt").write_text("<!DOCTYPE html>\n<html><body>Sign in</body></html>\n")
    with pytest.raises(WeightsError, match="LQ_proj_in.ckpt is a web page"):
        fw.read_flashvsr(folder, "v1")


def test_wrong_file_in_place_of_another(official):
    folder, sd = official
    torch.save(sd["tc_decoder"], folder / "LQ_proj_in.ckpt")
    with pytest.raises(WeightsError, match="LQ_proj_in.ckpt.*conv1.weight"):
        fw.read_flashvsr(folder, "v1")


@pytest.mark.parametrize("component,file", [("lq_proj", "LQ_proj_in.ckpt"), ("tc_decoder", "TCDecoder.ckpt")])
def test_a_wrapped_file_is_reported_with_the_keys_it_holds(official, component, file):
    # keys under a prefix no known file uses ("module." and a "state_dict" wrapper are taken off when reading)
    folder, sd = official
    torch.save({f"net.{k}": v for k, v in sd[component].items()}, folder / file)
    with pytest.raises(WeightsError) as e:
        fw.read_flashvsr(folder, "v1")
    assert file in str(e.value) and "net." + sorted(sd[component])[0] in str(e.value)


def test_mismatched_decoder_keys(official):
    folder, sd = official
    bad = dict(sd["tc_decoder"])
    del bad["decoder.5.conv.0.weight"]
    bad["decoder.27.weight"] = torch.zeros(3)
    torch.save(bad, folder / "TCDecoder.ckpt")
    with pytest.raises(WeightsError) as e:
        fw.read_flashvsr(folder, "v1")
    assert "TCDecoder.ckpt" in str(e.value)
    assert "decoder.5.conv.0.weight" in str(e.value) and "decoder.27.weight" in str(e.value)


def test_misshapen_lq_and_dit_keys(official):
    folder, sd = official
    bad = dict(sd["lq_proj"])
    bad["norm2.gamma"] = torch.ones(47, 1, 1, 1)
    torch.save(bad, folder / "LQ_proj_in.ckpt")
    with pytest.raises(WeightsError, match="LQ_proj_in.ckpt.*norm2.gamma"):
        fw.read_flashvsr(folder, "v1")

    from safetensors.torch import save_file

    dit = {k: v for k, v in sd["dit"].items() if k != "blocks.1.cross_attn.norm_k.weight"}
    save_file(dit, str(folder / "diffusion_pytorch_model_streaming_dmd.safetensors"))
    with pytest.raises(WeightsError, match="streaming_dmd.safetensors.*blocks.1.cross_attn.norm_k.weight"):
        fw.read_flashvsr(folder, "v1")


def test_components_must_fit_together(tmp_path):
    write_official_folder(tmp_path)
    torch.save(torch.zeros(1, 16, 32), tmp_path / "posi_prompt.pth")
    with pytest.raises(WeightsError, match="posi_prompt.pth.*64-wide"):
        fw.read_flashvsr(tmp_path, "v1")
    torch.save({"a": torch.zeros(3), "b": torch.zeros(3)}, tmp_path / "posi_prompt.pth")
    with pytest.raises(WeightsError, match="posi_prompt.pth"):
        fw.read_flashvsr(tmp_path, "v1")


def test_missing_files_are_named(official):
    folder, _ = official
    (folder / "posi_prompt.pth").unlink()
    with pytest.raises(WeightsError, match="no prompt embedding.*posi_prompt.pth"):
        fw.read_flashvsr(folder, "v1")
    (folder / "TCDecoder.ckpt").unlink()
    with pytest.raises(WeightsError, match="TCDecoder.ckpt"):
        fw.read_flashvsr(folder, "v1")
    empty = folder.parent / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match="no FlashVSR DiT"):
        fw.read_flashvsr(empty, "v1")


def test_every_missing_file_of_a_folder_is_named_in_one_error(official, monkeypatch):
    """A download that stopped half-way lacks several files: one run names them all (before the DiT is read)."""
    folder, _ = official
    for name in ("posi_prompt.pth", "TCDecoder.ckpt", "LQ_proj_in.ckpt"):
        (folder / name).unlink()
    read = []
    monkeypatch.setattr(fw, "_read", lambda path: read.append(path))
    with pytest.raises(WeightsError, match="no prompt embedding and no TC decoder and no LQ projection next to .*"
                                           "posi_prompt.pth.*TCDecoder.ckpt.*LQ_proj_in.ckpt.*'\\(download\\) …'"):
        fw.read_flashvsr(folder, "v1.1")
    assert read == []
    # one that a stopped download set aside is named: the user may be looking for it
    (folder / "LQ_proj_in.ckpt.mismatch").write_bytes(b"mine")
    with pytest.raises(WeightsError, match="no prompt embedding .*/LQ_proj_in.ckpt.mismatch was set aside by a "
                                           "download that stopped"):
        fw.read_flashvsr(folder, "v1.1")


def test_a_missing_file_or_version_is_found_before_the_dit_is_read(official, monkeypatch):
    folder, _ = official
    read = []
    monkeypatch.setattr(fw, "_read", lambda path: read.append(path))
    with pytest.raises(UserInputError, match="v1 or v1.1"):
        fw.read_flashvsr(folder)
    with pytest.raises(ValueError, match="version"):
        fw.read_flashvsr(folder, "v2")
    (folder / "TCDecoder.ckpt").unlink()
    with pytest.raises(WeightsError, match="no TC decoder.*TCDecoder.ckpt"):
        fw.read_flashvsr(folder, "v1")
    (folder / "posi_prompt.pth").unlink()
    with pytest.raises(WeightsError, match="no prompt embedding.*posi_prompt.pth"):
        fw.read_flashvsr(folder, "v1", need_decoder=False)
    assert read == []


# --- conversion and detection -----------------------------------------------------------------------------------


def test_convert_round_trips(official, tmp_path):
    folder, sd = official
    source = fw.read_flashvsr(folder, "v1.1", verify_version=False)
    out = fw.convert_flashvsr(folder, tmp_path / "out" / "flashvsr-v1.1.safetensors", version="v1.1")
    assert out.is_file() and not list(out.parent.glob("*.part"))
    w = fw.read_flashvsr(out)  # the version comes from the file
    assert w.version == "v1.1"
    assert_same(w.dit, source.dit)
    assert_same(w.lq_proj, source.lq_proj)
    assert_same(w.tc_decoder, source.tc_decoder)
    assert torch.equal(w.prompt, source.prompt)
    assert w.facts["lq_sha256"] == fw.sha256_of(folder / "LQ_proj_in.ckpt")
    model = fw.load_flashvsr(out, dtype=torch.float32)
    assert model.version == "v1.1" and model.dit is not None

    half = fw.convert_flashvsr(folder, tmp_path / "half.safetensors", dtype=torch.float16, version="v1")
    w16 = fw.read_flashvsr(half)
    assert w16.version == "v1" and set(w16.facts["dtypes"].values()) == {"float16"}
    assert_same(w16.lq_proj, {k: v.half() for k, v in source.lq_proj.items()})
    with pytest.raises(UserInputError, match="safetensors"):
        fw.convert_flashvsr(folder, tmp_path / "x.ckpt", version="v1")


def test_converted_file_with_an_unknown_version_and_a_killed_conversion(official, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = official
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "c.safetensors"
    leftover = tmp_path / "out" / "c.safetensors.part"  # what a conversion killed half-way leaves
    leftover.write_bytes(b"half of a big file")
    fw.convert_flashvsr(folder, out, version="v1", verify_version=False)
    assert [p.name for p in out.parent.iterdir()] == ["c.safetensors"]  # replaced, then renamed into place
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    save_file(load_file(str(out)), str(out), metadata={**meta, "version": "1.1"})  # edited by hand, or another tool
    with pytest.raises(WeightsError, match="records the FlashVSR version '1.1'.*convert the model again"):
        fw.read_flashvsr(out)


def test_a_file_too_large_for_the_memory_left_is_not_called_damaged(official, monkeypatch):
    import safetensors.torch

    from streamvsr.models.shared.weights import read_state_dict

    folder, _ = official

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 5726623744 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(safetensors.torch, "load_file", no_memory)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        read_state_dict(folder / "diffusion_pytorch_model_streaming_dmd.safetensors")
    # the same on Windows and a Mac, whose allocators say it in other words (it was "delete it and download again")
    for words in ("[enforce fail at alloc_cpu.cpp:114] data. DefaultCPUAllocator: not enough memory: you tried to "
                  "allocate 5726623744 bytes.",
                  "MPS backend out of memory (MPS allocated: 17.50 GB, other allocations: 1.20 GB, max allowed: "
                  "18.13 GB). Tried to allocate 1.00 GB on private pool."):
        monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(words)))
        with pytest.raises(RuntimeError, match=words[:20].replace("[", "\\[")):
            read_state_dict(folder / "diffusion_pytorch_model_streaming_dmd.safetensors")
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(MemoryError):
        read_state_dict(folder / "diffusion_pytorch_model_streaming_dmd.safetensors")


def test_converted_file_loaded_as_the_other_version_warns(official, tmp_path, caplog):
    folder, _ = official
    out = fw.convert_flashvsr(folder, tmp_path / "c.safetensors", version="v1", verify_version=False)
    with caplog.at_level(logging.WARNING):
        assert fw.read_flashvsr(out, "v1.1").version == "v1.1"
    assert "converted as v1" in caplog.text


def test_detect(official, tmp_path):
    folder, sd = official
    assert fw.detect(folder)
    assert fw.detect(folder / "diffusion_pytorch_model_streaming_dmd.safetensors")
    # another component named as the model is its folder's model (`find_files` takes it so), in the CLI too
    assert fw.detect(folder / "LQ_proj_in.ckpt") and fw.detect(folder / "TCDecoder.ckpt")
    assert fw.find_files(folder / "TCDecoder.ckpt").dit == folder / "diffusion_pytorch_model_streaming_dmd.safetensors"
    out = fw.convert_flashvsr(folder, tmp_path / "single" / "model.safetensors", version="v1")
    assert fw.detect(out) and fw.detect(out.parent)
    assert fw.find_files(out.parent).single
    other = tmp_path / "other"
    other.mkdir()
    from safetensors.torch import save_file

    save_file({"conv_in.weight": torch.zeros(2)}, str(other / "diffusion_pytorch_model.safetensors"))
    (other / "junk.safetensors").write_text("not a safetensors file")
    (other / "TCDecoder.ckpt").write_bytes(b"")  # a name alone, with no FlashVSR model beside it
    assert not fw.detect(other) and not fw.detect(other / "junk.safetensors")
    assert not fw.detect(other / "TCDecoder.ckpt")
    assert not fw.detect(other / "diffusion_pytorch_model.safetensors")
    assert not fw.detect(tmp_path / "missing")
    for style in ("1038lab", "kijai"):
        write_repackaged(tmp_path / style, style)
        assert fw.detect(tmp_path / style)


def test_convert_asks_for_a_version_the_files_do_not_state_and_needs_every_component(official, tmp_path, caplog):
    """The converted file records its version for good, and the official names are the same for v1 and v1.1: the
    user says it where the files do not (a folder named for neither release). A file that no node can use (no TC
    decoder) is not written."""
    from streamvsr.models.flashvsr import convert

    folder, _ = official
    folder = folder.rename(folder.with_name("weights"))
    with pytest.raises(UserInputError, match="does not say which FlashVSR release.*give --flashvsr-version v1 or "
                                             "v1.1"):
        convert(folder, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()
    v1 = folder.rename(folder.with_name("FlashVSR"))  # (the v1 download folder's name, the v1 repository's)
    assert fw.read_flashvsr(convert(v1, tmp_path / "a.safetensors")).version == "v1"
    named = v1.rename(folder.with_name("FlashVSR-v1.1"))  # (the v1.1 download folder's name)
    assert fw.read_flashvsr(convert(named, tmp_path / "b.safetensors")).version == "v1.1"
    # its LQ file is not the published v1.1 one: the converted file still says so when it loads
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fw.read_flashvsr(tmp_path / "b.safetensors")
    assert "is not the published v1.1 file" in caplog.text
    (named / "TCDecoder.ckpt").unlink()
    with pytest.raises(WeightsError, match="no TC decoder next to"):
        convert(named, tmp_path / "c.safetensors", version="v1")
    assert not (tmp_path / "c.safetensors").exists()


def test_a_converted_file_is_readable_by_other_users_as_the_umask_allows(official, tmp_path, monkeypatch):
    """safetensors writes through a private temporary file (mode 0600): a model converted by one user would be
    unreadable to a ComfyUI that runs as another (a service, a container). A drive without file modes (exFAT, a
    network share) refuses the change, and the conversion is still written."""
    import errno
    import stat

    if os.name != "posix":
        pytest.skip("file modes are POSIX")
    folder, _ = official
    old = os.umask(0o022)
    try:
        out = fw.convert_flashvsr(folder, tmp_path / "m.safetensors", version="v1")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644

    def refused(path, mode):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(path))

    monkeypatch.setattr(os, "chmod", refused)
    assert fw.read_flashvsr(fw.convert_flashvsr(folder, tmp_path / "fat.safetensors", version="v1")).version == "v1"


def test_the_official_checkouts_layout_finds_the_prompt_beside_the_release_folder(tmp_path):
    """The official scripts read the release cloned into examples/WanVSR/ and the prompt from the folder beside
    it, examples/WanVSR/prompt_tensor/."""
    checkout = tmp_path / "examples" / "WanVSR"
    sd = write_official_folder(checkout / "FlashVSR-v1.1")
    (checkout / "prompt_tensor").mkdir()
    (checkout / "FlashVSR-v1.1" / "posi_prompt.pth").rename(checkout / "prompt_tensor" / "posi_prompt.pth")
    assert torch.equal(fw.read_flashvsr(checkout / "FlashVSR-v1.1", "v1.1").prompt, sd["prompt"])


def test_which_model_a_path_holds_when_it_is_not_plain(official, tmp_path, caplog):
    """Two converted files and no DiT: which one is meant. A folder with both families' files: which one is
    meant. A FlashVSR option given with a Stream-DiffVSR model: the option is wrong (the user meant FlashVSR),
    not the missing flow."""
    from PIL import Image

    from streamvsr.cli import main
    from streamvsr.models.registry import detect_family

    folder, _ = official
    for name in ("a", "b"):
        fw.convert_flashvsr(folder, tmp_path / "two" / f"{name}.safetensors", version="v1")
    with pytest.raises(UserInputError, match=r"holds 2 converted FlashVSR files \(a.safetensors, b.safetensors\): "
                                             r"give one of them$"):
        fw.find_files(tmp_path / "two")
    (folder / "model_index.json").write_text("{}")  # Stream-DiffVSR's hub files too
    with pytest.raises(UserInputError, match="holds the files of Stream-DiffVSR and FlashVSR: give the folder or "
                                             "file of one model"):
        detect_family(folder)
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "model_index.json").write_text("{}")
    frames = tmp_path / "frames"
    frames.mkdir()
    Image.new("RGB", (8, 8)).save(frames / "f0.png")
    for option in (["--flashvsr-version", "v1"], ["--scale", "2"]):
        caplog.clear()
        assert main(["frames", str(frames), str(tmp_path / "out"), "--model", str(sd), *option]) == 2
        assert f"{option[0]} is a FlashVSR option, but {sd} is a Stream-DiffVSR model" in caplog.text
        assert "needs optical flow" not in caplog.text


def test_what_the_files_say_ranks_a_files_name_and_hash_above_a_folders_name(tmp_path):
    """A folder's name is the user's and the weakest sign: kijai's v1 DiT in a folder named after Wan 2.1 (whose
    "2.1-1.3B" once read as "v1.1") or after v1.1 is still v1."""
    from streamvsr.models.flashvsr import _version_or_default

    names = ("FlashVSR-v1.1", "FlashVSR_v1_1", "FlashVSR1_1", "v1.1", "Wan2.1-1.3B_FlashVSR", "wan2_1_1_3b",
             "FlashVSR", "v1.10")
    assert [bool(fw.FOLDER_V11.search(n)) for n in names] == [True] * 4 + [False] * 4
    v1_names = ("FlashVSR", "FlashVSR-v1", "flashvsr_V1", "my v1", "FlashVSR-v1.0", "FlashVSR-v1.1", "FlashVSR_v1_1",
                "v1.10", "dev1", "FlashVSR-x", "flashvsr")  # (the last: ComfyUI's models/flashvsr folder)
    assert [bool(fw.FOLDER_V1.search(n)) for n in v1_names] == [True] * 5 + [False] * 6
    for folder in ("Wan2.1-1.3B_FlashVSR", "FlashVSR-v1.1"):
        write_repackaged(tmp_path / folder, "kijai")
        assert _version_or_default(tmp_path / folder, None) == "v1"
    write_official_folder(tmp_path / "FlashVSR_v1_1")
    assert _version_or_default(tmp_path / "FlashVSR_v1_1", None) == "v1.1"
