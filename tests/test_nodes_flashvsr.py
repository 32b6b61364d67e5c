"""FlashVSR nodes, Load Video Chunk and the video-file node with FlashVSR, on CPU with a tiny FlashVSR checkpoint
in the official file layout and stand-ins for the ComfyUI modules (tests/fake_comfy.py).

Expected values come from the engine driven directly (FlashVSREngine over the whole sequence) and from the video
reader, never from earlier node output.
"""

import asyncio
import json
import math
import shutil
import re
import types

import pytest
import torch

import fake_comfy
from fake_comfy import FileVideo
from flashvsr_helpers import one_thread, write_official_folder
from streamvsr.models.shared.errors import UserInputError
from streamvsr.models.stream_diffvsr import SINGLE_FILE_FORMAT as SDVSR_FORMAT

FLASH_NODES = {"StreamVSRLoadFlashVSR", "StreamVSRFlashVSRUpscale", "StreamVSRFlashVSRSettings",
               "StreamVSRFlashVSRTrimDecoded", "StreamVSRLoadVideoChunk", "StreamVSRVideoUpscale"}
SETTINGS = dict(scale=4, sparse_ratio=2.0, local_range=11, kv_ratio=3.0, color_fix="adain")


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("flashvsr_nodes") / "FlashVSR-v1.1"
    write_official_folder(path, seed=3)
    return path


def _install(monkeypatch, tmp_path, folder, **kwargs):
    models = tmp_path / "models"
    shutil.copytree(folder, models / "flashvsr" / "FlashVSR-v1.1")
    mm = fake_comfy.install(monkeypatch, models, **kwargs)
    import streamvsr

    ext = asyncio.run(streamvsr.comfy_entrypoint())
    nodes = {n.define_schema().node_id: n for n in asyncio.run(ext.get_node_list())}
    return mm, nodes


@pytest.fixture
def comfy(monkeypatch, tmp_path, folder):
    return _install(monkeypatch, tmp_path, folder)


def _run(node, unique_id="7", **inputs):
    node.hidden = types.SimpleNamespace(unique_id=unique_id)
    return node.execute(**inputs).values


def _frames(n, h=32, w=32, seed=0):
    """A pattern drifting right and down, (n, h, w, 3) as ComfyUI's IMAGE."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(h + n, w + 2 * n, 3, generator=g)
    return torch.stack([base[i: i + h, 2 * i: 2 * i + w] for i in range(n)])


def _load(nodes, **kw):
    (model,) = _run(nodes["StreamVSRLoadFlashVSR"], **{"model": "FlashVSR-v1.1", "version": "v1.1",
                                                       "precision": "auto", **kw})
    return model


def _held(output) -> bool:
    """An output of a run that held all its frames back: it skips the nodes after it, silently (ComfyUI's
    ExecutionBlocker without a message), instead of an empty batch that fails them."""
    return type(output).__name__ == "ExecutionBlocker" and output.message is None


def _upscale(nodes, model, images, unique_id="7", seed=42, continue_sequence=False, last_chunk=True, **kw):
    return _run(nodes["StreamVSRFlashVSRUpscale"], unique_id, model=model, images=images, seed=seed,
                continue_sequence=continue_sequence, last_chunk=last_chunk, **{**SETTINGS, **kw})


def _reference(model, images, seed=42, **settings):
    """The engine over the whole sequence, and the latents it made, straight from the model's modules."""
    from streamvsr.models.flashvsr.engine import FlashVSREngine

    latents = []
    engine = FlashVSREngine(model.pipeline, device="cpu", compute_dtype=torch.float32,
                            latent_sink=latents.append, **{**SETTINGS, **settings})
    state = engine.new_state(seed)
    out, state = engine.push(state, images.permute(0, 3, 1, 2))
    rest, _ = engine.flush(state)
    return torch.cat([out, rest]).permute(0, 2, 3, 1), torch.cat(latents, dim=2)


@pytest.fixture(scope="module")
def whole30():
    return _frames(30)


def test_registration_schemas(comfy):
    _, nodes = comfy
    assert FLASH_NODES <= nodes.keys()
    for node_id in FLASH_NODES:
        schema = nodes[node_id].define_schema()
        assert schema.node_id == node_id and node_id.startswith("StreamVSR")
        assert schema.kwargs.get("description") and schema.kwargs.get("display_name")
        for inp in schema.inputs:
            assert inp.kwargs.get("tooltip"), f"{node_id}.{inp.id} has no tooltip"
            if inp.io_type in ("INT", "FLOAT"):
                assert "min" in inp.kwargs and "max" in inp.kwargs, f"{node_id}.{inp.id} is unbounded"
    upscale = {i.id: i for i in nodes["StreamVSRFlashVSRUpscale"].define_schema().inputs}
    assert upscale["sparse_ratio"].kwargs["default"] == 2.0 and upscale["local_range"].kwargs["default"] == 11
    assert upscale["kv_ratio"].kwargs["default"] == 3.0 and upscale["last_chunk"].kwargs["default"] is True
    assert upscale["start_frame"].kwargs.get("optional") and upscale["start_frame"].kwargs.get("force_input")
    outputs = [o.io_type for o in nodes["StreamVSRFlashVSRUpscale"].define_schema().outputs]
    assert outputs == ["IMAGE", "STREAMVSR_STATE", "LATENT"]
    video = {i.id: i for i in nodes["StreamVSRVideoUpscale"].define_schema().inputs}
    assert video["model"].io_type == "STREAMVSR_MODEL,STREAMVSR_FLASHVSR_MODEL"
    assert video["flow_model"].kwargs.get("optional") and video["flashvsr_settings"].kwargs.get("optional")
    chunk = {i.id: i for i in nodes["StreamVSRLoadVideoChunk"].define_schema().inputs}
    assert chunk["chunk_index"].kwargs["control_after_generate"] is True


def test_model_list_folders_files_and_extra_paths(monkeypatch, tmp_path, folder):
    import sys

    from safetensors.torch import save_file

    from streamvsr.models.flashvsr.weights import convert_flashvsr

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(folder, elsewhere / "FlashVSR-v1.1")
    write_official_folder(elsewhere / "kijai", seed=1)  # a folder of another name holding the official files
    convert_flashvsr(folder, elsewhere / "converted.safetensors", version="v1")
    (elsewhere / "loose").mkdir()
    save_file({"x": torch.zeros(1)}, str(elsewhere / "loose" / "Wan2.1_VAE.safetensors"))  # a VAE: not listed
    save_file({"x": torch.zeros(1)}, str(elsewhere / "loose" / "merged_dit.safetensors"))
    # Stream-DiffVSR's models put in the wrong folder: its hub folder's files and its single file are not listed
    (elsewhere / "sdvsr" / "unet").mkdir(parents=True)
    (elsewhere / "sdvsr" / "model_index.json").write_text("{}")
    unet = elsewhere / "sdvsr" / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({"conv_in.weight": torch.zeros(1)}, str(unet))
    save_file({"x": torch.zeros(1)}, str(elsewhere / "sdvsr.safetensors"), metadata={"format": SDVSR_FORMAT})
    fake_comfy.install(monkeypatch, tmp_path / "models")
    sys.modules["folder_paths"].folder_names_and_paths["flashvsr"] = ([str(elsewhere)], set())  # from the yaml
    import streamvsr

    nodes = {n.define_schema().node_id: n
             for n in asyncio.run(asyncio.run(streamvsr.comfy_entrypoint()).get_node_list())}
    paths, exts = sys.modules["folder_paths"].folder_names_and_paths["flashvsr"]
    assert paths == [str(elsewhere), str(tmp_path / "models" / "flashvsr")] and ".ckpt" in exts
    options = next(i for i in nodes["StreamVSRLoadFlashVSR"].define_schema().inputs
                   if i.id == "model").kwargs["options"]
    assert options == ["FlashVSR-v1.1", "converted.safetensors", "kijai", "loose/merged_dit.safetensors",
                       "(download) FlashVSR, the version below"]
    # one picked anyway (a workflow from elsewhere) is refused by name, not by its keys
    with pytest.raises(UserInputError, match=r"sdvsr.safetensors is a Stream-DiffVSR model: load it with Load "
                                             r"Stream-DiffVSR Model$"):
        _run(nodes["StreamVSRLoadFlashVSR"], model="sdvsr.safetensors", version="v1.1", precision="auto")
    sd_options = next(i for i in nodes["StreamVSRLoadModel"].define_schema().inputs
                      if i.id == "model").kwargs["options"]
    assert sd_options == ["(download) Jamichsu/Stream-DiffVSR"]  # (models/streamvsr is empty)


def test_loader_patchers_precision_attention_and_versions(comfy, folder, tmp_path, caplog):
    from streamvsr.models.flashvsr.weights import convert_flashvsr
    from streamvsr.nodes.flashvsr import FlashVSRModel

    mm, nodes = comfy
    model = _load(nodes)
    assert isinstance(model, FlashVSRModel) and model.attention == "gather"  # auto on the CPU
    assert model.compute_dtype == torch.float32 and model.pipeline.dtype == torch.float32
    assert isinstance(model.core, fake_comfy.ModelPatcher) and isinstance(model.decoder, fake_comfy.ModelPatcher)
    # DiT and LQ projection in one patcher, the TC decoder in its own
    core = set(model.core.model.state_dict())
    assert any(k.startswith("dit.") for k in core) and any(k.startswith("lq_proj.") for k in core)
    assert not any("decoder" in k for k in core)
    assert model.decoder.model is model.pipeline.tc_decoder and model.pipeline.version == "v1.1"
    assert _load(nodes, version="v1").pipeline.version == "v1"
    with pytest.raises(UserInputError, match="'flex' cannot be used here: it is compiled for CUDA GPUs only. "
                                             "Choose 'gather'"):
        _load(nodes, attention="flex")  # eager FlexAttention would hold the whole score matrix
    # a converted file keeps the version recorded in it, and says so when the widget disagrees
    convert_flashvsr(folder, tmp_path / "models" / "flashvsr" / "one.safetensors", version="v1")
    with caplog.at_level("WARNING"):
        assert _load(nodes, model="one.safetensors").pipeline.version == "v1"
    assert "converted as v1" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # auto, the widget's default: the record, and nothing to warn about
        assert _load(nodes, model="one.safetensors", version="auto").pipeline.version == "v1"
    assert "converted as" not in caplog.text
    # auto takes what the files say: kijai's v1 DiT by its name, the folder named for v1.1
    from flashvsr_helpers import write_repackaged

    write_repackaged(tmp_path / "models" / "flashvsr" / "kijai", "kijai")
    with caplog.at_level("WARNING"):
        assert _load(nodes, model="kijai", version="auto").pipeline.version == "v1"
        assert _load(nodes, version="auto").pipeline.version == "v1.1"
    assert "says" not in caplog.text
    default = next(i for i in nodes["StreamVSRLoadFlashVSR"].define_schema().inputs if i.id == "version")
    assert default.kwargs["default"] == "auto"
    with pytest.raises(ValueError, match=r"not in any flashvsr model folder \(.*\): pick '\(download\) FlashVSR, the "
                                         "version below' in the list"):
        _load(nodes, model="gone")
    # a name that says v1 (the v1 download's folder is "FlashVSR"): auto would fetch v1.1
    for name, version in (("FlashVSR", "auto"), ("FlashVSR-v1", "v1.1"), ("mine\\FlashVSR-v1\\", "auto")):
        with pytest.raises(ValueError, match=r"pick '\(download\) FlashVSR, the version below' with version v1 in"):
            _load(nodes, model=name, version=version)
    with pytest.raises(ValueError, match=r"version below' with version v1.1 \(or auto\) in the list"):
        _load(nodes, model="mine-v1.1", version="v1")
    for name, version in (("mine-v1.1", "auto"), ("FlashVSR-v1", "v1")):
        with pytest.raises(ValueError, match=r"version below' in the list"):
            _load(nodes, model=name, version=version)


def test_out_of_memory_advice_fits_the_device(comfy, monkeypatch):
    """On a CPU-only ComfyUI the advice is the CPU's: no GPU steps, and not the CPU as the last resort."""
    from streamvsr.nodes.flashvsr import oom_message

    mm, _ = comfy
    engine = types.SimpleNamespace(scale=4, kv_ratio=3.0, sparse_ratio=2.0, compute_dtype=torch.float32)
    cpu = oom_message(engine, 32, 48)
    assert cpu == ("FlashVSR ran out of memory on 48x32 frames (192x128 output). Try, in this order: kv_ratio 2 "
                   "instead of 3 (two latent slices of attention memory); sparse_ratio 1.5 instead of 2 (fewer key "
                   "blocks per query); precision bf16 on Load FlashVSR Model (half the weights and activations; fast "
                   "on CPUs with bf16 arithmetic); upscale smaller frames or use a smaller scale (memory grows with "
                   "the output size); close other programs.")
    # only what the engine does not do already
    done = oom_message(types.SimpleNamespace(scale=4, kv_ratio=2.0, sparse_ratio=1.5, compute_dtype=torch.bfloat16),
                       32, 48)
    assert "kv_ratio" not in done and "sparse_ratio" not in done and "bf16" not in done
    monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device("cuda"))
    gpu = oom_message(engine, 32, 48)
    assert "--lowvram" in gpu and "kv_ratio 2 instead of 3" in gpu and "precision bf16 or fp16" in gpu
    # on a GPU too, nothing that is set already: auto precision is bf16 or fp16 there, and other ratios are named
    gpu = oom_message(types.SimpleNamespace(scale=4, kv_ratio=4.0, sparse_ratio=1.5, compute_dtype=torch.bfloat16),
                      32, 48)
    assert "kv_ratio 2 instead of 4" in gpu and "sparse_ratio" not in gpu and "precision" not in gpu, gpu
    assert gpu.endswith("as a last resort run on the CPU (--cpu, very slow).")


def test_whole_clip_equals_engine_with_latents_and_model_management(comfy, whole30):
    mm, nodes = comfy
    model = _load(nodes)
    images = whole30[:6]
    before = images.clone()
    out, state, latent = _upscale(nodes, model, images)
    expected, latents = _reference(model, images)
    assert out.shape == (6, 128, 128, 3) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.equal(images, before)  # inputs are never modified
    assert torch.allclose(out, expected, atol=1e-6)
    # the Wan 2.1 LATENT: the DiT's latents in the VAE's scale, (1, 16, T, H/8, W/8), T = (stream length - 1) / 4
    samples = latent["samples"]
    assert samples.shape == (1, 16, 6, 16, 16)
    std = fake_comfy.Wan21.latents_std.view(1, 16, 1, 1, 1)
    mean = fake_comfy.Wan21.latents_mean.view(1, 16, 1, 1, 1)
    assert torch.allclose(samples, latents * std + mean, atol=1e-6)
    info = dict(latent["streamvsr_flashvsr"])
    lr = info.pop("lr_frames")
    assert info == {"first_frame": 0, "frames": 6, "height": 128, "width": 128, "complete": True,
                    "color_fix": "adain", "scale": 4}
    assert lr.dtype == torch.uint8 and torch.equal(lr, (images * 255).round().to(torch.uint8))
    # ComfyUI was asked for room for the DiT plus the activation estimate; the decoder is loaded whole
    (core_call, decoder_call) = mm.calls["load_models_gpu"][-2:]
    assert core_call[0] == [model.core] and decoder_call[0] == [model.decoder]
    assert decoder_call[2].get("force_full_load") is True
    least, reserve = mm.minimum_inference_memory(), mm.extra_reserved_memory()  # (as for Stream-DiffVSR's flow)
    decoder_size = model.decoder.model_size()
    assert max(least, core_call[1] + reserve) >= 1.1 * decoder_size + max(least, decoder_call[1] + reserve)
    assert decoder_call[1] > 0
    assert fake_comfy.ProgressBar.updates[-1][2]  # a preview with the last chunk
    assert state.frame_index == 0  # the last chunk ended the sequence


def test_chunked_runs_equal_one_run(comfy, whole30, caplog):
    """Three queue runs (continue, last_chunk off, off, on) give the frames of one run, each once, in order; each
    says under the node what came out and what it holds back."""
    _, nodes = comfy
    model = _load(nodes)
    whole, _, _ = _upscale(nodes, model, whole30, "1")
    counts, parts, said = [], [], []
    for a, b, last in ((0, 12, False), (12, 26, False), (26, 30, True)):
        caplog.clear()
        with caplog.at_level("INFO"):
            out, state, latent = _upscale(nodes, model, whole30[a:b], "2", continue_sequence=a > 0, last_chunk=last)
        said.append([r.getMessage() for r in caplog.records if "frames" in r.getMessage()
                     and r.getMessage().startswith("StreamVSR: ")][-1])
        if _held(out):
            assert _held(latent)
            out = whole[:0]
        counts.append(out.shape[0])
        parts.append(out)
    assert counts == [0, 21, 9]  # nothing before the first 25 frames; the look-ahead comes out with the last run
    assert said[0].startswith("StreamVSR: FlashVSR holds all 12 frames of this run back")
    assert said[1:] == ["StreamVSR: 21 frames out; 5 held back for the next chunk", "StreamVSR: 9 frames out"]
    assert torch.equal(torch.cat(parts), whole)
    # the same through start_frame (what Load Video Chunk connects), chunks of 10; a chunk queued again after its
    # frames reached no node (a later node failed) is upscaled again, the last one too, which ended the sequence
    parts = []
    for a in (0, 10, 20):
        out, _, _ = _upscale(nodes, model, whole30[a:a + 10], "3", start_frame=a, last_chunk=a == 20)
        if a:
            again, _, _ = _upscale(nodes, model, whole30[a:a + 10], "3", start_frame=a, last_chunk=a == 20)
            assert _held(again) == _held(out) and (_held(out) or torch.equal(again, out))
        parts.append(whole[:0] if _held(out) else out)
    assert [len(p) for p in parts] == [0, 0, 30]  # (the first 25 frames come out together)
    assert torch.equal(torch.cat(parts), whole)


def test_a_sequence_may_switch_attention_and_a_finished_state_input_starts_anew(comfy, whole30):
    """gather and FlexAttention compute the same: a chunk may continue under the other (as a resume may); a state
    input whose sequence ended (last chunk) starts a new one from the seed, as continue_sequence does."""
    import dataclasses

    _, nodes = comfy
    model = _load(nodes)
    flex = dataclasses.replace(model, attention="flex")  # what auto picks on a CUDA machine with Triton
    whole, _, _ = _upscale(nodes, model, whole30, "40")
    first, _, _ = _upscale(nodes, flex, whole30[:16], "41", start_frame=0, last_chunk=False)
    rest, _, _ = _upscale(nodes, model, whole30[16:], "41", start_frame=16, last_chunk=True)
    assert _held(first) and torch.allclose(rest, whole, atol=1e-5)
    _, finished, _ = _upscale(nodes, model, whole30[:8], "42", last_chunk=True)
    assert finished.frame_index == 0
    again, _, _ = _upscale(nodes, model, whole30, "43", state=finished)
    assert torch.equal(again, whole)


def test_chunk_errors_and_restarts(comfy, whole30, caplog):
    from streamvsr.models.stream_diffvsr.engine import new_state as stream_diffvsr_state
    from streamvsr.nodes import flashvsr

    mm, nodes = comfy
    model = _load(nodes)
    # mistakes in the sequence are reported before the models load
    with pytest.raises(ValueError, match="no earlier chunk"):
        _upscale(nodes, model, whole30[8:16], "4", start_frame=8, last_chunk=False)
    with pytest.raises(ValueError, match="another kind of upscale node.*FlashVSR Upscale"):
        _upscale(nodes, model, whole30[8:16], "4", state=stream_diffvsr_state(1))
    assert mm.calls["load_models_gpu"] == []
    _upscale(nodes, model, whole30[:8], "4", start_frame=0, last_chunk=False)
    stored = flashvsr.STREAMS.get("4")
    with pytest.raises(ValueError, match="ended at frame 8: queue the chunk that starts at frame 8"):
        _upscale(nodes, model, whole30[16:24], "4", start_frame=16, last_chunk=False)  # a chunk skipped
    with pytest.raises(ValueError, match="settings changed"):
        _upscale(nodes, model, whole30[8:16], "4", start_frame=8, last_chunk=False, kv_ratio=2.0)
    assert flashvsr.STREAMS.get("4") is stored  # failed runs leave the sequence as it was
    _upscale(nodes, model, whole30[8:16], "4", start_frame=8, last_chunk=True)
    with pytest.raises(ValueError, match="ended its sequence"):
        _upscale(nodes, model, whole30[24:30], "4", start_frame=24)
    # the next chunk after a run that ended the sequence: last_chunk left on, not wired to Load Video Chunk
    with pytest.raises(ValueError, match="frame 16, right after the last run of this node, but that run ended the "
                                         "sequence as a last chunk does: connect Load Video Chunk's last_chunk"):
        _upscale(nodes, model, whole30[16:24], "4", start_frame=16)
    # continue_sequence after a last chunk starts anew, and says so
    with caplog.at_level("WARNING"):
        out, state, _ = _upscale(nodes, model, whole30[:3], "4", continue_sequence=True)
    assert "ended its sequence" in caplog.text and out.shape[0] == 3
    # another seed or frame size when continuing a run that holds frames back: a restart would drop them unseen,
    # so the user decides (it used to be a console warning); without frames held back, a new sequence, logged (as
    # test_nodes.py checks)
    _upscale(nodes, model, whole30[:3], "5", last_chunk=False)
    with pytest.raises(ValueError, match="FlashVSR Upscale node 5 cannot continue its sequence: the model, precision, "
                                         "seed or FlashVSR settings changed since its last run, which holds back its "
                                         "last 3 frames for look-ahead. To have them, queue the rest of the video "
                                         "with the earlier settings and last_chunk on; .* set continue_sequence to "
                                         "restart"):
        _upscale(nodes, model, whole30[3:6], "5", seed=1, continue_sequence=True)
    with pytest.raises(ValueError, match="the frame size changed from 32x32 to 32x24 since its last run, which "
                                         "holds back its last 3 frames"):
        _upscale(nodes, model, whole30[3:6, :24], "5", continue_sequence=True)
    out, _, _ = _upscale(nodes, model, whole30[3:6], "5", seed=1, continue_sequence=False)
    assert out.shape[0] == 3


def test_returned_frames_own_their_memory_and_flex_is_refused_before_a_download(comfy, whole30, monkeypatch):
    """A run that returns fewer frames than it could (look-ahead held back) must not keep the whole buffer alive in
    ComfyUI's cache; and a loader choice that cannot run fails before GBs are downloaded."""
    from streamvsr.models.flashvsr import hub
    from streamvsr.nodes import flashvsr

    _, nodes = comfy
    model = _load(nodes)
    out, _, _ = _upscale(nodes, model, whole30[:26], "9", last_chunk=False)
    assert out.shape[0] == 21 and out.untyped_storage().nbytes() == out.numel() * out.element_size()

    def download(*args, **kwargs):
        raise AssertionError("downloaded")

    monkeypatch.setattr(hub, "download_flashvsr", download)
    with pytest.raises(UserInputError, match="'flex' cannot be used here"):
        _load(nodes, model=flashvsr.DOWNLOAD, attention="flex")


def test_state_socket_and_fingerprint(comfy, whole30):
    from streamvsr.nodes import flashvsr

    _, nodes = comfy
    model = _load(nodes)
    whole, _, _ = _upscale(nodes, model, whole30[:28], "6")
    first, state, _ = _upscale(nodes, model, whole30[:26], "6", last_chunk=False)
    second, _, _ = _upscale(nodes, model, whole30[26:28], "8", state=state)
    assert torch.equal(torch.cat([first, second]), whole)
    assert flashvsr.StreamVSRFlashVSRUpscale.fingerprint_inputs(continue_sequence=True) != \
        flashvsr.StreamVSRFlashVSRUpscale.fingerprint_inputs(continue_sequence=True)  # NaN: always re-run
    assert math.isnan(flashvsr.StreamVSRFlashVSRUpscale.fingerprint_inputs(continue_sequence=None))  # linked
    # last_chunk decides what the stored stream holds back: the same frames run with it on and then off are two
    # runs, or a cached result of the first (LRU/RAM caches keep it) would stand for the stream the second left
    fp = flashvsr.StreamVSRFlashVSRUpscale.fingerprint_inputs
    _upscale(nodes, model, whole30[:9], "9", last_chunk=True)
    key = fp(continue_sequence=False)
    _upscale(nodes, model, whole30[:9], "9", last_chunk=False)
    assert fp(continue_sequence=False) != key


def test_more_upscale_nodes_than_the_store_keeps(comfy, whole30, caplog):
    """Over capacity, a stream holding no frames back goes first; a node whose frames went with its stream is
    refused with the reason, not restarted as if it had never run."""
    from streamvsr.nodes import flashvsr

    _, nodes = comfy
    model = _load(nodes)
    capacity = flashvsr.STREAMS.capacity
    _upscale(nodes, model, whole30[:4], "empty", last_chunk=True)  # least recently used, holds nothing back
    for i in range(capacity):
        _upscale(nodes, model, whole30[:4], f"held{i}", last_chunk=False)
    assert flashvsr.STREAMS.get("empty") is None and flashvsr.STREAMS.get("held0") is not None
    _upscale(nodes, model, whole30[:4], "one more", last_chunk=False)  # now every candidate holds frames back
    assert flashvsr.STREAMS.get("held0") is None
    assert "dropped the stored sequence of node held0, and with it the 4 frames it held back" in caplog.text
    with pytest.raises(ValueError, match="cannot continue its sequence: its stored sequence was dropped together "
                                         "with the 4 frames it held back"):
        _upscale(nodes, model, whole30[4:8], "held0", continue_sequence=True, last_chunk=False)
    with pytest.raises(ValueError, match="starts at frame 4, but its stored sequence was dropped together with the "
                                         "4 frames"):
        _upscale(nodes, model, whole30[4:8], "held0", start_frame=4, last_chunk=False)
    caplog.clear()
    with caplog.at_level("WARNING"):  # a dropped stream that held nothing back: a new sequence, said plainly
        out, _, _ = _upscale(nodes, model, whole30[4:8], "empty", continue_sequence=True)
    assert out.shape[0] == 4 and "node empty cannot continue its sequence: its stored sequence was dropped" in \
        caplog.text


def test_trim_wan_vae_decode(comfy, whole30):
    import numpy as np
    from PIL import Image

    _, nodes = comfy
    model = _load(nodes)
    lr = _frames(5, h=24, w=40)
    out, _, latent = _upscale(nodes, model, lr, color_fix="none")
    assert out.shape == (5, 96, 160, 3)
    t = latent["samples"].shape[2]
    decoded = torch.rand(4 * t - 3, 128, 256, 3)  # what VAE Decode makes of it: padded frames and sides
    (trimmed,) = _run(nodes["StreamVSRFlashVSRTrimDecoded"], images=decoded, latent=latent)
    assert torch.equal(trimmed, decoded[:5, :96, :160])
    # With a colour fix, the official full decode's: per frame and channel, the decoded frame in [-1, 1] takes the
    # mean and standard deviation (population, eps 1e-5) of the 8-bit LR frame upscaled with PIL's bicubic filter
    # (spec section 1.7), clamped to [-1, 1]
    _, _, latent = _upscale(nodes, model, lr, "8", color_fix="adain")
    (fixed,) = _run(nodes["StreamVSRFlashVSRTrimDecoded"], images=decoded, latent=latent)
    for i in range(5):
        pixels = (lr[i].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        up = np.asarray(Image.fromarray(pixels).resize((160, 96), Image.BICUBIC), dtype=np.float32) / 255 * 2 - 1
        ref = torch.from_numpy(up).reshape(-1, 3).double()
        x = decoded[i, :96, :160].reshape(-1, 3).double() * 2 - 1
        want = (x - x.mean(0)) / (x.var(0, unbiased=False) + 1e-5).sqrt() * (ref.var(0, unbiased=False) + 1e-5).sqrt()
        want = ((want + ref.mean(0)).clamp(-1, 1) + 1) / 2
        assert torch.allclose(fixed[i].reshape(-1, 3).double(), want, atol=1e-5), i
    latent["streamvsr_flashvsr"]["lr_frames"] = None  # a latent from before the colour fix was kept with it
    with pytest.raises(ValueError, match="lacks the input frames its colour fix needs.*older version"):
        _run(nodes["StreamVSRFlashVSRTrimDecoded"], images=decoded, latent=latent)
    # A clip whose first run held all its frames back: its latents are whole, but the frames stayed with that run
    out, _, held = _upscale(nodes, model, lr[:3], "11", color_fix="adain", last_chunk=False)
    assert _held(out) and _held(held)
    _, _, whole = _upscale(nodes, model, lr[3:], "11", color_fix="adain", continue_sequence=True)
    assert torch.equal(whole["samples"], latent["samples"])
    with pytest.raises(ValueError, match="several runs.*upscale it in one run.*color_fix to none"):
        _run(nodes["StreamVSRFlashVSRTrimDecoded"], images=decoded, latent=whole)
    _, _, partial = _upscale(nodes, model, whole30[:26], "9", last_chunk=False)
    _, _, rest = _upscale(nodes, model, whole30[26:], "9", continue_sequence=True)
    with pytest.raises(ValueError, match="whole clip"):
        _run(nodes["StreamVSRFlashVSRTrimDecoded"], images=torch.rand(25, 128, 128, 3), latent=partial)
    with pytest.raises(ValueError, match="whole clip"):
        _run(nodes["StreamVSRFlashVSRTrimDecoded"], images=torch.rand(9, 128, 128, 3), latent=rest)
    with pytest.raises(ValueError, match="expected the VAE decode"):
        _run(nodes["StreamVSRFlashVSRTrimDecoded"], images=decoded[:3], latent=latent)
    with pytest.raises(ValueError, match="latent output of FlashVSR Upscale"):
        _run(nodes["StreamVSRFlashVSRTrimDecoded"], images=decoded, latent={"samples": latent["samples"]})


def test_bad_inputs_interrupt_and_out_of_memory(monkeypatch, tmp_path, folder, whole30):
    mm, nodes = _install(monkeypatch, tmp_path, folder, interrupt_after=3)
    from streamvsr.models.flashvsr.engine import FlashVSREngine
    from streamvsr.nodes import flashvsr

    mm.calls["interrupt_checks"] = -1000  # no interrupt until the interrupt check below
    model = _load(nodes)
    with pytest.raises(ValueError, match="empty"):
        _upscale(nodes, model, torch.zeros(0, 8, 8, 3))
    nan = whole30[:2].clone()
    nan[1, 3, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="frame 1 .*NaN"):
        _upscale(nodes, model, nan)
    with pytest.raises(ValueError, match="Load FlashVSR Model"):
        _upscale(nodes, fake_comfy.ModelPatcher(torch.nn.Linear(1, 1), "cpu", "cpu"), whole30[:2])
    # grayscale and RGBA frames: as their RGB
    rgb, _, _ = _upscale(nodes, model, whole30[:2].mean(-1, keepdim=True).expand(-1, -1, -1, 3).clone(), "11")
    gray, _, _ = _upscale(nodes, model, whole30[:2].mean(-1, keepdim=True), "11")
    assert torch.equal(gray, rgb)
    mm.calls["interrupt_checks"] = 0
    _upscale(nodes, model, whole30[:8], "10", last_chunk=False)  # 1 interrupt check
    stored = flashvsr.STREAMS.get("10")
    with pytest.raises(fake_comfy.Interrupted):
        _upscale(nodes, model, whole30[8:30], "10", continue_sequence=True)  # interrupted at the 4th check
    assert flashvsr.STREAMS.get("10") is stored and stored.state.frame_index == 8
    mm.calls["interrupt_checks"] = -1000

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(FlashVSREngine, "push", out_of_memory)
    with pytest.raises(RuntimeError, match="kv_ratio 2.*sparse_ratio 1.5.*bf16.*close other programs.$"):
        _upscale(nodes, model, whole30[8:16], "10", continue_sequence=True)
    assert flashvsr.STREAMS.get("10") is stored


def test_a_sparse_ratio_too_small_for_the_frames_is_refused_before_anything_loads(comfy, tmp_path, whole30):
    pytest.importorskip("av")
    from test_video import make_clip

    mm, nodes = comfy
    model = _load(nodes)
    with pytest.raises(ValueError, match="sparse_ratio 0.01 leaves no attention budget .* use at least 0.0167"):
        _upscale(nodes, model, whole30[:2, :8, :8], sparse_ratio=0.01)
    clip = make_clip(tmp_path / "in.mp4", n=2, w=8, h=8)
    settings = {"scale": 4, "sparse_ratio": 0.01, "local_range": 11, "kv_ratio": 3.0, "color_fix": "adain"}
    with pytest.raises(ValueError, match="use at least 0.0167"):
        nodes["StreamVSRVideoUpscale"].execute(model=model, video=FileVideo(clip), seed=1, steps=4, codec="h264",
                                               scene_cut_threshold=0.0, filename_prefix="small/x",
                                               flashvsr_settings=settings)
    assert mm.calls["load_models_gpu"] == [] and not (tmp_path / "models" / "output" / "small").exists()


def test_load_video_chunk_seeks_and_reports(comfy, tmp_path):
    pytest.importorskip("av")
    from test_video import make_clip

    from streamvsr.video.reader import FrameReader

    _, nodes = comfy
    clip = make_clip(tmp_path / "ten.mp4", n=10, w=32, h=24) or tmp_path / "ten.mp4"
    expected = torch.stack([f for _, f, _ in FrameReader(str(clip))]).permute(0, 2, 3, 1)
    node = nodes["StreamVSRLoadVideoChunk"]
    got = []
    for index in range(3):
        images, start, last, fps, chunks, total = _run(node, video=FileVideo(clip), chunk_index=index, chunk_frames=4)
        assert (start, last, chunks, total) == (4 * index, index == 2, 3, 10) and fps == 24.0
        assert start.chunk_frames == 4  # (for naming the chunk index to queue next)
        got.append(images)
    assert [g.shape[0] for g in got] == [4, 4, 2]
    assert torch.equal(torch.cat(got), expected)
    with pytest.raises(ValueError, match="past the end.*10 frames.*3 chunks.*back to 0 .*where a run was "
                                         "cancelled or failed on the way, to the first chunk that did not finish"):
        _run(node, video=FileVideo(clip), chunk_index=3, chunk_frames=4)
    with pytest.raises(ValueError, match="gone.mp4 does not exist$"):  # (was os.stat's FileNotFoundError)
        _run(node, video=FileVideo(tmp_path / "gone.mp4"), chunk_index=0, chunk_frames=4)


def test_load_video_chunk_says_when_the_file_was_cut_off(comfy, tmp_path, caplog):
    """The frames a cut-off file has are still chunked, but not silently (the video-file node refuses such a file
    unless allow_truncated is on)."""
    pytest.importorskip("av")
    from test_video import make_clip

    _, nodes = comfy
    clip = make_clip(tmp_path / "whole.mkv", n=40, w=32, h=24, audio=None, vcodec="ffv1")
    data = clip.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) * 9 // 10])
    node = nodes["StreamVSRLoadVideoChunk"]
    _run(node, video=FileVideo(clip), chunk_index=0, chunk_frames=16)
    assert "ends early" not in caplog.text
    images, *_, total = _run(node, video=FileVideo(cut), chunk_index=0, chunk_frames=16)
    assert images.shape[0] == 16 and total < 40
    assert f"cut.mkv ends early: its header says" in caplog.text and f"the chunks cover the {total} frames" \
        in caplog.text


def test_chunk_loader_into_upscale_equals_one_run(comfy, tmp_path):
    """What the chunked workflow does: Load Video Chunk's start_frame and last_chunk wired into FlashVSR Upscale."""
    pytest.importorskip("av")
    from test_video import make_clip

    _, nodes = comfy
    clip = tmp_path / "thirty.mp4"
    make_clip(clip, n=30, w=32, h=24)
    model = _load(nodes)
    loader = nodes["StreamVSRLoadVideoChunk"]
    (everything, *_rest) = _run(loader, video=FileVideo(clip), chunk_index=0, chunk_frames=64)
    whole, _, _ = _upscale(nodes, model, everything, "20")
    parts = []
    for index in range(2):
        images, start, last, *_ = _run(loader, video=FileVideo(clip), chunk_index=index, chunk_frames=26)
        out, _, _ = _upscale(nodes, model, images, "21", start_frame=start, last_chunk=last)
        parts.append(out)
    assert [p.shape[0] for p in parts] == [21, 9]
    assert torch.equal(torch.cat(parts), whole)


def test_chunks_of_two_videos_queued_in_turn_never_share_a_sequence(comfy, tmp_path):
    """Two workflows opened from one template have the same node ids. Queued in turn with two videos of one size
    (A0, B0, A1), A's second chunk must not continue B's sequence (it would get B's held-back frames and attention
    cache): it is refused, naming both files, and B goes on as if alone. A file rewritten between chunks is
    another video too."""
    pytest.importorskip("av")
    import os

    from test_video import make_clip

    _, nodes = comfy
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    make_clip(a, n=30, w=32, h=24)
    make_clip(b, n=30, w=32, h=24, cut_at=0)  # other frames
    model = _load(nodes)
    loader = nodes["StreamVSRLoadVideoChunk"]

    def chunk(path, index):
        images, start, last, *_ = _run(loader, video=FileVideo(path), chunk_index=index, chunk_frames=26)
        return images, start, last

    images, start, last = chunk(a, 0)
    assert start == 0 and isinstance(start, int)
    _upscale(nodes, model, images, "21", start_frame=start, last_chunk=last)
    parts = []
    images, start, last = chunk(b, 0)
    parts.append(_upscale(nodes, model, images, "21", start_frame=start, last_chunk=last)[0])
    images, start, last = chunk(a, 1)
    with pytest.raises(ValueError, match=r"frame 26 of a\.mp4, but this node's earlier chunks were of b\.mp4.*"
                                         r"same node ids.*chunk index to 0"):
        _upscale(nodes, model, images, "21", start_frame=start, last_chunk=last)
    images, start, last = chunk(b, 1)
    parts.append(_upscale(nodes, model, images, "21", start_frame=start, last_chunk=last)[0])
    (everything, *_rest) = _run(loader, video=FileVideo(b), chunk_index=0, chunk_frames=64)
    whole, _, _ = _upscale(nodes, model, everything, "22")
    assert torch.equal(torch.cat(parts), whole)

    images, start, last = chunk(a, 0)
    _upscale(nodes, model, images, "21", start_frame=start, last_chunk=last)
    make_clip(a, n=30, w=32, h=24, cut_at=10)
    os.utime(a, ns=(os.stat(a).st_atime_ns, os.stat(a).st_mtime_ns + 10**9))  # even where the clock is coarse
    images, start, last = chunk(a, 1)
    with pytest.raises(ValueError, match=r"a\.mp4 changed since this node upscaled its earlier chunks"):
        _upscale(nodes, model, images, "21", start_frame=start, last_chunk=last)
    # another file of the same name is another video, named by its path
    other = tmp_path / "elsewhere" / "a.mp4"
    other.parent.mkdir()
    make_clip(other, n=30, w=32, h=24, cut_at=0)
    images, start, last = chunk(a, 0)
    _upscale(nodes, model, images, "21", start_frame=start, last_chunk=last)
    images, start, last = chunk(other, 1)
    with pytest.raises(ValueError, match=f"frame 26 of {re.escape(os.path.realpath(other))}, but this node's "
                                         f"earlier chunks were of {re.escape(os.path.realpath(a))}"):
        _upscale(nodes, model, images, "21", start_frame=start, last_chunk=last)
    # a sequence that a whole-clip run left (another workflow, same node id) is no earlier chunk either
    _upscale(nodes, model, everything[:26], "21", last_chunk=False)
    with pytest.raises(ValueError, match=r"frame 26 of a\.mp4, but this node's last run upscaled frames that were "
                                         r"no chunk of it"):
        _upscale(nodes, model, images, "21", start_frame=start, last_chunk=last)


def test_video_file_node_with_flashvsr_and_settings(comfy, tmp_path):
    pytest.importorskip("av")
    from test_video import decode, make_clip

    _, nodes = comfy
    model = _load(nodes)
    clip = tmp_path / "in.mp4"
    make_clip(clip, n=3, w=32, h=24)
    (settings,) = _run(nodes["StreamVSRFlashVSRSettings"], scale=2, sparse_ratio=1.5, local_range=9, kv_ratio=2.0,
                       color_fix="none")
    assert settings == {"scale": 2, "sparse_ratio": 1.5, "local_range": 9, "kv_ratio": 2.0, "color_fix": "none"}
    node = nodes["StreamVSRVideoUpscale"]
    out = node.execute(model=model, video=FileVideo(clip), seed=1, steps=4, codec="h264", scene_cut_threshold=0.0,
                       filename_prefix="flashvsr/test", flashvsr_settings=settings)
    kind, path = out.values[0]
    assert kind == "VideoFromFile" and path.endswith("test_00001_.mp4")
    frames = decode(path)
    assert len(frames) == 3 and frames[0].shape == (48, 64, 3)
    # without settings: the official defaults (x4); Stream-DiffVSR without a flow model is refused clearly
    out = node.execute(model=model, video=FileVideo(clip), seed=1, steps=4, codec="h264", scene_cut_threshold=0.0,
                       filename_prefix="flashvsr/default")
    assert decode(out.values[0][1])[0].shape == (96, 128, 3)
    # resumable writing and scene cuts work with FlashVSR's chunked engine too
    out = node.execute(model=model, video=FileVideo(clip), seed=1, steps=4, codec="h264", scene_cut_threshold=0.3,
                       filename_prefix="flashvsr/resumable", resume=True)
    assert len(decode(out.values[0][1])) == 3 and not list((tmp_path / "models" / "output" / "flashvsr").glob(
        "*.streamvsr-*"))
    with pytest.raises(ValueError, match="flow model"):
        node.execute(model=fake_comfy.ModelPatcher(torch.nn.Linear(1, 1), "cpu", "cpu"), video=FileVideo(clip),
                     seed=1, steps=4, codec="h264", scene_cut_threshold=0.0, filename_prefix="x")
    # FlashVSR settings on a Stream-DiffVSR model would be ignored (scale 2 quietly becoming x4): refused
    with pytest.raises(ValueError, match="only apply to FlashVSR"):
        node.execute(model=fake_comfy.ModelPatcher(torch.nn.Linear(1, 1), "cpu", "cpu"), video=FileVideo(clip),
                     seed=1, steps=4, codec="h264", scene_cut_threshold=0.0, filename_prefix="x", flow_model=object(),
                     flashvsr_settings=settings)


def test_download_messages(monkeypatch, tmp_path):
    """Offline: the hub files and the GitHub prompt file fail with what to download by hand and where."""
    import huggingface_hub

    from streamvsr.models.flashvsr import hub
    from streamvsr.models.shared.errors import DownloadError

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(DownloadError, match="JunhaoZhuang/FlashVSR-v1.1.*posi_prompt.pth.*OpenImagingLab"):
        hub.download_flashvsr("v1.1", tmp_path)
    dest = tmp_path / "p"
    dest.mkdir()
    with pytest.raises(DownloadError, match=f"posi_prompt.pth.*by hand.*{dest}"):
        hub.download_prompt(dest, url="http://127.0.0.1:9/posi_prompt.pth", timeout=2)
    fake = tmp_path / "fake_prompt.pth"
    fake.write_bytes(b"not the prompt")
    with pytest.raises(DownloadError, match="not the official file"):
        hub.download_prompt(dest, url=fake.as_uri())
    assert not (dest / "posi_prompt.pth").exists() and not list(dest.iterdir())
    # the git blob id is git's: sha1 of "blob <size>\\0" + content
    assert hub.git_blob_id(fake) == __import__("hashlib").sha1(b"blob 14\0not the prompt").hexdigest()


def test_workflows_reference_known_nodes_and_widgets(comfy):
    """Every workflow's nodes exist in this pack or in core, its links agree with its node records, and each of
    this pack's nodes has a value for every widget of its schema, in the schema's order (a node saved before a
    widget was added loads with that widget's default, which the file then does not show)."""
    import pathlib

    _, nodes = comfy
    widget_types = {"INT", "FLOAT", "BOOLEAN", "COMBO", "STRING"}

    root = pathlib.Path(__file__).resolve().parents[1] / "workflows"
    core = {"LoadVideo", "GetVideoComponents", "CreateVideo", "SaveVideo", "SaveImage", "VAELoader", "VAEDecode",
            "Note"}
    names = sorted(p.name for p in root.glob("*.json"))
    assert {"flashvsr_video_file.json", "flashvsr_long_video_chunks.json", "flashvsr_wan_vae_decode.json"} <= \
        set(names)
    for name in names:
        w = json.loads((root / name).read_text())
        ids = {n["id"]: n for n in w["nodes"]}
        for n in w["nodes"]:
            assert n["type"].startswith("StreamVSR") or n["type"] in core, (name, n["type"])
            if n["type"] in nodes:
                widgets = [i for i in nodes[n["type"]].define_schema().inputs
                           if i.io_type in widget_types and not i.kwargs.get("force_input")]
                assert [i["name"] for i in n["inputs"] if "widget" in i] == [i.id for i in widgets], \
                    (name, n["type"])
                # control_after_generate adds its own widget (increment, randomize, …) after its input's
                controls = sum(bool(i.kwargs.get("control_after_generate")) for i in widgets)
                assert len(n.get("widgets_values", [])) == len(widgets) + controls, (name, n["type"])
        for link_id, src, src_slot, dst, dst_slot, kind in w["links"]:
            assert link_id in ids[src]["outputs"][src_slot]["links"], (name, link_id)
            assert ids[dst]["inputs"][dst_slot]["link"] == link_id, (name, link_id)
    video = json.loads((root / "streamvsr_video_upscale.json").read_text())
    create = next(n for n in video["nodes"] if n["type"] == "CreateVideo")
    linked = {i["name"] for i in create["inputs"] if i.get("link") is not None}
    assert {"fps", "audio", "images"} <= linked  # frame rate and audio from the source


@pytest.mark.parametrize("fmt, suffix, codec, gop", [("mpegts", "ts", "libx264", 10), ("mpeg", "mpg", "mpeg1video", 12),
                                                   ("mpegts", "m2ts", "mpeg2video", 12)])
def test_range_reader_is_exact_where_seeking_lands_elsewhere(tmp_path, fmt, suffix, codec, gop):
    """MPEG program and transport streams land a seek on the keyframe after the timestamp asked for, or on a frame
    labelled with another one's timestamp: every range must still be the frames a decode from the start gives
    (before: a wrong or missing frame, or an empty last chunk)."""
    pytest.importorskip("av")
    from test_video import noise_video

    from streamvsr.video.range import frame_index, read_range
    from streamvsr.video.reader import FrameReader

    path = noise_video(tmp_path / f"clip.{suffix}", 60, fmt, codec, {"g": str(gop), "bf": "2"})
    ref = torch.stack([f for _, f, _ in FrameReader(str(path))])
    assert frame_index(str(path)).count == len(ref) == 60
    wrong = [start for start in range(60)
             if not torch.equal(read_range(str(path), start, 4, to_end=start + 4 >= 60), ref[start:start + 4]
                                if start + 4 < 60 else ref[start:])]
    assert wrong == []
    # a chunk far longer than what is left takes memory for what is left only
    tail = read_range(str(path), 58, 100_000)
    assert torch.equal(tail, ref[58:]) and tail.untyped_storage().nbytes() == ref[58:].numel() * 4


def test_range_reader_decodes_a_damaged_file_as_the_reader_does(tmp_path):
    """Frame-threaded decoding conceals damage differently from the reader's (no frame threads): chunks of a file
    with damaged bytes must still be the frames the video-file node would upscale."""
    pytest.importorskip("av")
    from test_video import noise_video

    from streamvsr.video.range import read_range
    from streamvsr.video.reader import FrameReader

    path = noise_video(tmp_path / "clip.ts", 40, "mpegts")
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 400] = b"\xff" * 400
    path.write_bytes(bytes(data))
    ref = torch.stack([f for _, f, _ in FrameReader(str(path))])
    got = torch.cat([read_range(str(path), s, 10, to_end=s + 10 >= len(ref)) for s in range(0, len(ref), 10)])
    assert got.shape == ref.shape and torch.equal(got, ref)



def test_range_reader_reports_a_decoding_error_in_one_line(tmp_path, monkeypatch):
    av = pytest.importorskip("av")
    from test_video import make_clip

    from streamvsr.models.shared.errors import InputDamagedError
    from streamvsr.video import range as video_range

    clip = make_clip(tmp_path / "clip.mp4", n=6, w=32, h=24, audio=None)
    video_range.frame_index(str(clip))
    real = video_range.VideoFrames

    def failing(container, stream):
        for i, frame in enumerate(real(container, stream)):
            if i == 3:
                raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")
            yield frame

    monkeypatch.setattr(video_range, "VideoFrames", failing)
    with pytest.raises(InputDamagedError, match=r"clip.mp4 is damaged: decoding stopped at frame 3 \(Invalid data"):
        video_range.read_range(str(clip), 0, 6)


def test_range_reader_equals_decoding_from_the_start(tmp_path):
    """video/range.py: any range, read by seeking, is what FrameReader decodes from the start (keyframes every 10
    frames with B-frames, variable frame timing, a phone video's rotation), and the last range reads to the end."""
    av = pytest.importorskip("av")
    import numpy as np
    from test_video import make_clip

    from streamvsr.video.range import frame_index, read_range
    from streamvsr.video.reader import FrameReader

    def everything(path):
        return torch.stack([f for _, f, _ in FrameReader(str(path))])

    gop = tmp_path / "gop.mp4"
    with av.open(str(gop), "w") as c:
        v = c.add_stream("libx264", rate=24, options={"crf": "18", "g": "10", "bf": "3"})
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        for i in range(37):
            pixels = (np.random.default_rng(i).random((48, 64, 3)) * 255).astype(np.uint8)
            for packet in v.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                c.mux(packet)
        for packet in v.encode():
            c.mux(packet)
    ref = everything(gop)
    assert frame_index(str(gop)).count == len(ref) == 37
    for start, count in ((0, 10), (13, 7), (30, 20), (36, 1), (9, 28)):
        assert torch.equal(read_range(str(gop), start, count), ref[start:start + count]), (start, count)
    assert torch.equal(read_range(str(gop), 33, 2, to_end=True), ref[33:])
    assert read_range(str(gop), 37, 3).shape == (0, 3, 48, 64)
    assert torch.equal(read_range(str(gop), 5, 3, channels_last=True), ref[5:8].permute(0, 2, 3, 1))

    vfr = tmp_path / "vfr.mp4"
    make_clip(vfr, n=9, pts=[0, 1, 3, 4, 8, 9, 10, 15, 16])
    ref = everything(vfr)
    for start in range(9):
        assert torch.equal(read_range(str(vfr), start, 3), ref[start:start + 3]), start

    if hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        from test_faults_video import noise_clip

        phone = tmp_path / "phone.mkv"
        noise_clip(phone, n=4, w=16, h=8, codec="ffv1", rotation=90, hflip=False)
        ref = everything(phone)
        assert ref.shape[-2:] == (16, 8)  # shown upright
        assert torch.equal(read_range(str(phone), 1, 2), ref[1:3])


def test_a_chunk_after_a_last_chunk_run_without_last_chunk_says_frames_are_held(comfy, whole30, caplog):
    """The video's last chunk run with last_chunk off keeps its look-ahead frames: queued again from an earlier
    chunk, the error says so and how to have them (it said only that the video had ended)."""
    from streamvsr.nodes.streams import ChunkStart

    _, nodes = comfy
    model = _load(nodes)
    for a in (0, 10, 20):
        caplog.clear()
        _upscale(nodes, model, whole30[a:a + 10], "60", start_frame=ChunkStart(a, None, 10, 30), last_chunk=False)
    # said at once, by the last chunk itself
    assert "the video's last chunk ran with last_chunk off, so its last 9 frames are still held back" in caplog.text
    with pytest.raises(ValueError, match="reached the end of the video \\(frame 30\\) with its last chunk \\(its last "
                                         "[0-9]+ frames are still held back for look-ahead, as last_chunk was off: "
                                         "connect Load Video Chunk's last_chunk output"):
        _upscale(nodes, model, whole30[10:20], "60", start_frame=ChunkStart(10, None, 10, 30), last_chunk=False)
