"""Node classes on CPU with tiny weights, with stand-ins for the ComfyUI modules (tests/fake_comfy.py).

Expected values come from the engine driven directly (StreamEngine over the whole sequence) and from RAFT
called directly, never from earlier node output.
"""

import asyncio
import io
import math
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

import fake_comfy
from fake_comfy import FileVideo
from helpers import make_tiny_checkpoint, make_tiny_raft

pytest.importorskip("diffusers")
pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("nodes")
    ckpt = make_tiny_checkpoint(root / "ckpt")
    raft = make_tiny_raft(root / "raft_small_test.pth")
    return ckpt, raft


def _install(monkeypatch, tmp_path, assets, **kwargs):
    ckpt, raft = assets
    models = tmp_path / "models"
    shutil.copytree(ckpt, models / "streamvsr" / "tiny")
    (models / "streamvsr" / "raft").mkdir(parents=True)
    shutil.copy(raft, models / "streamvsr" / "raft" / raft.name)
    mm = fake_comfy.install(monkeypatch, models, **kwargs)
    import streamvsr

    ext = asyncio.run(streamvsr.comfy_entrypoint())
    nodes = {n.define_schema().node_id: n for n in asyncio.run(ext.get_node_list())}
    return mm, nodes


@pytest.fixture
def comfy(monkeypatch, tmp_path, assets):
    return _install(monkeypatch, tmp_path, assets)


def _run(node, unique_id="7", **inputs):
    node.hidden = fake_comfy.types.SimpleNamespace(unique_id=unique_id)
    return node.execute(**inputs).values


def _frames(n, h=33, w=45, seed=0, channels=3):
    """A pattern drifting right and down: consecutive frames are related, as in a video."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(h + n, w + 2 * n, channels, generator=g)
    return torch.stack([base[i: i + h, 2 * i: 2 * i + w] for i in range(n)])


def _models(nodes, correlation="auto"):
    (model,) = _run(nodes["StreamVSRLoadModel"], model="tiny", precision="auto")
    (flow,) = _run(nodes["StreamVSRLoadFlowModel"], model="raft_small_test.pth", correlation=correlation,
                   resolution="full", iterations=4)
    return model, flow


def _upscale(nodes, model, flow, images, unique_id="7", seed=5, steps=4, continue_sequence=False, **kw):
    return _run(nodes["StreamVSRUpscale"], unique_id, model=model, flow_model=flow, images=images, seed=seed,
                steps=steps, continue_sequence=continue_sequence, **kw)


def _reference(model, flow, images, seed, steps=4):
    """The engine driven directly over the whole sequence, frames as (3, h, w)."""
    from streamvsr.models.stream_diffvsr.engine import StreamEngine

    engine = StreamEngine(model.model, flow.model, steps=steps)
    state = engine.new_state(seed)
    out = []
    for frame in images[..., :3]:
        hr, state = engine.step(frame.permute(2, 0, 1), state)
        out.append(hr[0].permute(1, 2, 0))
    return torch.stack(out)


def test_registration_schemas_are_namespaced_and_documented(comfy):
    _, nodes = comfy
    assert len(nodes) >= 6
    assert {"StreamVSRLoadModel", "StreamVSRUpscale", "StreamVSRLoadFlowModel", "StreamVSREstimateFlow",
            "StreamVSRFlowToImage"} <= nodes.keys()
    for node_id, node in nodes.items():
        schema = node.define_schema()
        assert node_id.startswith("StreamVSR") and schema.node_id == node_id
        assert schema.kwargs.get("description") and schema.kwargs.get("display_name")
        for inp in schema.inputs:
            assert inp.kwargs.get("tooltip"), f"{node_id}.{inp.id} has no tooltip"
            if inp.io_type in ("INT", "FLOAT"):
                assert "min" in inp.kwargs and "max" in inp.kwargs, f"{node_id}.{inp.id} is unbounded"
        for t in [i.io_type for i in schema.inputs] + [o.io_type for o in schema.outputs]:
            assert t in ("INT", "FLOAT", "BOOLEAN", "COMBO", "IMAGE", "VIDEO", "STRING", "LATENT") or \
                t.startswith("STREAMVSR_")
    steps = next(i for i in nodes["StreamVSRUpscale"].define_schema().inputs if i.id == "steps")
    assert steps.kwargs["default"] == 4


def _readme_node_rows() -> dict[str, tuple[str, str, str]]:
    """The README's node reference: node id -> (title, inputs cell, outputs cell)."""
    import re

    text = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Nodes\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        found = re.fullmatch(r"\| \*\*(.+?)\*\* \(`(\w+)`\) \| (.*) \| (.*) \|", line)
        if found:
            title, node_id, inputs, outputs = found.groups()
            assert node_id not in rows, f"{node_id} has two rows"
            rows[node_id] = title, inputs, outputs
    return rows


def test_the_readme_node_reference_matches_the_nodes(comfy):
    """Every node has its row in the README's node reference, under its display name, naming each input and output
    as the node does, with the node's defaults and ranges where the row gives numbers: "`steps` (4, 1–8)"."""
    import re

    _, nodes = comfy
    rows = _readme_node_rows()
    assert set(rows) == set(nodes), "README rows without a node, or nodes without a row"
    for node_id, node in nodes.items():
        schema = node.define_schema()
        title, inputs, outputs = rows[node_id]
        assert title == schema.kwargs["display_name"], node_id
        for inp in schema.inputs:
            assert f"`{inp.id}`" in inputs, f"{node_id}: the README leaves out the input {inp.id}"
            numbers = re.search(rf"`{inp.id}` \((-?[\d.]+)(?:, (?:odd )?(-?[\d.]+)–(-?[\d.]+))?[,)]", inputs)
            if numbers is None:
                continue
            default, low, high = (None if v is None else float(v) for v in numbers.groups())
            assert default == inp.kwargs["default"], f"{node_id}.{inp.id}: README says {default}"
            if low is not None:
                assert (low, high) == (inp.kwargs["min"], inp.kwargs["max"]), f"{node_id}.{inp.id}: {low}–{high}"
        for out in schema.outputs:
            assert f"`{out.display_name}`" in outputs, f"{node_id}: the README leaves out the output {out.display_name}"
    # (the check reads numbers: the rows give some)
    assert "`steps` (4, 1–8)" in rows["StreamVSRUpscale"][1]


def test_model_folders_merge_extra_model_paths_and_list_models(monkeypatch, tmp_path, assets):
    import sys

    ckpt, _ = assets
    yaml_dir = tmp_path / "elsewhere"
    shutil.copytree(ckpt, yaml_dir / "from_yaml")
    (yaml_dir / "raft").mkdir()
    (yaml_dir / "raft" / "not_a_model.safetensors").write_bytes(b"")
    (yaml_dir / "single.safetensors").write_bytes(b"")
    (yaml_dir / "notes.txt").write_text("not a model")
    # a conversion's work files next to its result (stopped, or running): not models to pick
    for name in ("single.streamvsr-tmp.safetensors", "single.streamvsr-partial.safetensors",
                 "single.streamvsr-partial-2.safetensors", "single.safetensors.streamvsr-lock"):
        (yaml_dir / name).write_bytes(b"")
    # FlashVSR's models put in the wrong folder are not listed: its official folder, its converted file
    from safetensors.torch import save_file

    (yaml_dir / "FlashVSR-v1.1").mkdir()
    dit = yaml_dir / "FlashVSR-v1.1" / "diffusion_pytorch_model_streaming_dmd.safetensors"
    save_file({"x": torch.zeros(1)}, str(dit))
    save_file({"x": torch.zeros(1)}, str(yaml_dir / "flashvsr.safetensors"), metadata={"format": "streamvsr/flashvsr"})
    fake_comfy.install(monkeypatch, tmp_path / "models")
    # what extra_model_paths.yaml registers before any custom node is imported
    sys.modules["folder_paths"].folder_names_and_paths["streamvsr"] = ([str(yaml_dir)], set())
    import streamvsr

    nodes = {n.define_schema().node_id: n
             for n in asyncio.run(asyncio.run(streamvsr.comfy_entrypoint()).get_node_list())}
    paths, exts = sys.modules["folder_paths"].folder_names_and_paths["streamvsr"]
    assert paths == [str(yaml_dir), str(tmp_path / "models" / "streamvsr")]
    assert ".safetensors" in exts
    options = next(i for i in nodes["StreamVSRLoadModel"].define_schema().inputs if i.id == "model").kwargs["options"]
    # the official folder by name, single files; not the component files nor anything in the RAFT folder
    assert options == ["from_yaml", "single.safetensors", "(download) Jamichsu/Stream-DiffVSR"]
    # one picked anyway (a workflow from elsewhere) is refused by name, before its size is looked at
    from streamvsr.models.shared.errors import UserInputError

    with pytest.raises(UserInputError, match="flashvsr.safetensors is a FlashVSR model: load it with Load FlashVSR "
                                             "Model$"):
        nodes["StreamVSRLoadModel"].execute(model="flashvsr.safetensors", precision="auto")
    flow_options = next(i for i in nodes["StreamVSRLoadFlowModel"].define_schema().inputs
                        if i.id == "model").kwargs["options"]
    assert flow_options == ["(download) raft_large", "(download) raft_small"]


def test_a_download_in_a_loader_shows_progress_and_stops_on_cancel(comfy, monkeypatch, tmp_path):
    from streamvsr.models.stream_diffvsr import hub
    from streamvsr.nodes import stream_diffvsr as node

    mm, _ = comfy
    fake_comfy.ProgressBar.updates.clear()

    def download(dest, progress):
        progress(0, 3)
        progress(1, 3)
        mm.interrupt_current_processing()  # Cancel pressed while the second file downloads
        progress(2, 3)  # before the third: stops here
        pytest.fail("the download went on after Cancel")

    monkeypatch.setattr(hub, "download_stream_diffvsr", download)
    with pytest.raises(fake_comfy.Interrupted):
        node.resolve_model_path(node.DOWNLOAD_MODEL)
    assert fake_comfy.ProgressBar.updates == [(0, 3, False), (1, 3, False)]


def test_a_download_entry_and_the_folder_it_made_are_one_model_for_a_sequence(comfy, monkeypatch, tmp_path):
    """The list names the same weights twice once downloaded: "(download) …" and the folder. A sequence started
    with one continues with the other (it was refused as another model, or restarted with a seam)."""
    from streamvsr.models.stream_diffvsr import hub
    from streamvsr.nodes import stream_diffvsr as node

    _, nodes = comfy
    folder = tmp_path / "models" / "streamvsr" / "tiny"
    monkeypatch.setattr(hub, "download_stream_diffvsr", lambda dest, progress=None: folder)  # all there already
    (by_entry,) = _run(nodes["StreamVSRLoadModel"], model=node.DOWNLOAD_MODEL, precision="auto")
    by_folder, flow = _models(nodes)
    images = _frames(4)
    first, _ = _upscale(nodes, by_entry, flow, images[:2], "31", start_frame=0)
    second, _ = _upscale(nodes, by_folder, flow, images[2:], "31", start_frame=2)
    whole, _ = _upscale(nodes, by_folder, flow, images, "32")
    assert torch.equal(torch.cat([first, second]), whole)


def test_the_flow_loaders_download_shows_progress_and_a_cancel_leaves_no_file(comfy, monkeypatch, tmp_path):
    import hashlib

    import folder_paths

    from streamvsr.models.raft.weights import RAFT_WEIGHTS
    from streamvsr.nodes import raft as node
    from streamvsr.nodes.common import FLOW_FOLDER

    mm, _ = comfy
    src = tmp_path / "published.pth"
    src.write_bytes(torch.randint(0, 256, (3 << 20,), dtype=torch.uint8).numpy().tobytes())  # 3 blocks of 1 MB
    prefix = hashlib.sha256(src.read_bytes()).hexdigest()[:8]
    monkeypatch.setitem(RAFT_WEIGHTS, "raft_large", (src.as_uri(), f"raft_large-{prefix}.pth", prefix))
    dest = Path(folder_paths.get_folder_paths(FLOW_FOLDER)[0])
    fake_comfy.ProgressBar.updates.clear()
    mm.interrupt_current_processing()  # Cancel pressed as the download starts
    with pytest.raises(fake_comfy.Interrupted):
        node.resolve_flow_path("(download) raft_large")
    assert not dest.exists() or not list(dest.glob("raft_large*"))
    mm.interrupt_current_processing(False)
    path = Path(node.resolve_flow_path("(download) raft_large"))
    assert path.read_bytes() == src.read_bytes()
    assert [done for done, _, _ in fake_comfy.ProgressBar.updates] == [1 << 20, 2 << 20, 3 << 20]


def test_a_model_that_is_not_there_is_a_one_line_error_that_offers_the_download(comfy, tmp_path):
    """Deleted since the list was made, or named by a workflow from elsewhere (the shipped ones name what the
    download entries make, which a new install does not have yet): the loaders say which entry fetches it."""
    from streamvsr.models.shared.errors import UserInputError

    _, nodes = comfy
    shutil.rmtree(tmp_path / "models" / "streamvsr" / "tiny")
    with pytest.raises(UserInputError, match=r"^tiny is not in any streamvsr model folder \(.*\): pick '\(download\) "
                                             "Jamichsu/Stream-DiffVSR' in the list to fetch the official weights, or "
                                             "put it there and press r to refresh the list$"):
        _run(nodes["StreamVSRLoadModel"], model="tiny", precision="auto")
    for name, entry in (("raft_large_C_T_SKHT_V2-ff5fadd5.pth", "raft_large"), ("raft_small_v2.pth", "raft_small")):
        with pytest.raises(UserInputError, match=rf"^{name} is not in any streamvsr_flow model folder \(.*raft\): "
                                                 rf"pick '\(download\) {entry}' in the list"):
            _run(nodes["StreamVSRLoadFlowModel"], model=name, correlation="auto", resolution="full", iterations=12)
    # a name from the API, outside the model folders: read inside them, as ComfyUI's own loaders do
    raft = tmp_path / "models" / "streamvsr" / "raft" / "raft_small_test.pth"
    shutil.copy(raft, tmp_path / "outside.pth")
    for name in ("../../../outside.pth", str(tmp_path / "outside.pth")):
        with pytest.raises(UserInputError, match="is not in any streamvsr_flow model folder"):
            _run(nodes["StreamVSRLoadFlowModel"], model=name, correlation="auto", resolution="full", iterations=12)
    (flow,) = _run(nodes["StreamVSRLoadFlowModel"], model="../raft_small_test.pth", correlation="auto",
                   resolution="full", iterations=12)  # (inside: ../ from the top of the folder stays at its top)
    assert flow.model.raft is not None


def test_loader_names_a_git_lfs_pointer_among_the_weights(comfy, tmp_path):
    """A clone without `git lfs pull`: the loader says so, instead of a bare MemoryError from reading "version " as
    a header length, and where to download the weights (the first look at the files, their sizes for ComfyUI's
    choice of precision, said only the first part)."""
    _, nodes = comfy
    unet = tmp_path / "models" / "streamvsr" / "tiny" / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(ValueError, match="unet.diffusion_pytorch_model.safetensors is a Git LFS pointer .* `git "
                                         "lfs pull`.* Jamichsu/Stream-DiffVSR"):
        _run(nodes["StreamVSRLoadModel"], model="tiny", precision="auto")


def test_the_size_for_the_precision_choice_counts_the_weights_the_loader_takes(comfy, tmp_path):
    """A component folder may hold more weight files than the loader reads (an fp16 variant, a .bin copy, as a
    whole download of a repository brings): each was counted, overstating the model's size to ComfyUI."""
    from streamvsr.models.shared.weights import safetensors_numel
    from streamvsr.nodes.stream_diffvsr import weights_params

    folder = tmp_path / "models" / "streamvsr" / "tiny"
    expected = sum(safetensors_numel(folder / sub / "diffusion_pytorch_model.safetensors")
                   for sub in ("unet", "controlnet", "vae"))
    assert weights_params(str(folder)) == expected > 0
    unet = folder / "unet"
    shutil.copy(unet / "diffusion_pytorch_model.safetensors", unet / "diffusion_pytorch_model.fp16.safetensors")
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"\0" * 4096)
    assert weights_params(str(folder)) == expected


def test_loader_wraps_in_model_patcher_with_comfy_devices_and_precision(comfy):
    from streamvsr.nodes.common import pick_precision

    mm, nodes = comfy
    model, flow = _models(nodes)
    assert isinstance(model, fake_comfy.ModelPatcher) and isinstance(flow, fake_comfy.ModelPatcher)
    assert model.load_device == torch.device("cpu") and model.offload_device == torch.device("cpu")
    assert model.model.dtype == torch.float32  # auto on the CPU
    assert not hasattr(model.model, "text_encoder")  # only the prompt embedding is kept
    assert model.model.prompt_embeds.shape[:2] == (1, 77)
    # On the CPU a precision chosen on the node is used (it was turned into fp32, said only in the console), and
    # auto asks ComfyUI there too: --bf16-unet stores bf16 weights, computed in fp32 as ComfyUI does on a CPU
    cpu = torch.device("cpu")
    assert pick_precision("bf16", cpu) == (torch.bfloat16, torch.bfloat16)
    # fp16 is refused there: it computes hundreds of times slower, which would look like a hang
    with pytest.raises(ValueError, match="fp16 on the CPU computes hundreds of times slower.*choose bf16"):
        pick_precision("fp16", cpu)
    mm.unet_flag = torch.bfloat16
    assert pick_precision("auto", cpu) == (torch.bfloat16, torch.float32)
    mm.unet_flag = None
    (bf16,) = _run(nodes["StreamVSRLoadModel"], model="tiny", precision="bf16")
    assert bf16.model.dtype == torch.bfloat16
    out, _ = _upscale(nodes, bf16, flow, _frames(2), seed=42)
    assert torch.isfinite(out).all()
    from streamvsr.nodes.stream_diffvsr import oom_ladder

    # out-of-memory advice names only what this model does not do already (no CPU layers in bf16, bf16 itself)
    advice = oom_ladder(bf16, 45, 33)
    assert "cpu_layers" not in advice and "bf16" not in advice and "resolution to 'half'" in advice
    assert "turn cpu_layers off" in oom_ladder(model, 45, 33) and "precision bf16" in oom_ladder(model, 45, 33)
    # On a GPU, auto is ComfyUI's choice among bf16/fp16/fp32, and the compute dtype its manual-cast choice.
    gpu = torch.device("cuda")
    assert pick_precision("auto", gpu) == (torch.bfloat16, torch.bfloat16)
    mm.unet_manual_cast = lambda weight, device, supported=(): torch.float32
    assert pick_precision("auto", gpu) == (torch.bfloat16, torch.float32)
    assert pick_precision("fp16", gpu) == (torch.float16, torch.float16)


def test_upscale_shapes_state_progress_and_model_management(comfy):
    mm, nodes = comfy
    model, flow = _models(nodes)
    images = _frames(3)
    before = images.clone()
    out, state = _upscale(nodes, model, flow, images, seed=42)
    assert out.shape == (3, 132, 180, 3) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert 0 <= out.min() and out.max() <= 1
    assert torch.equal(images, before)  # inputs are never modified
    assert torch.allclose(out, _reference(model, flow, images, 42), atol=1e-5)
    assert state.frame_index == 3 and state.lr_size == (33, 45)
    assert state.prev_output.device.type == "cpu"
    # the denoiser with an activation estimate, then the flow model whole
    loads = mm.calls["load_models_gpu"]
    assert loads[0][0] == [model] and loads[0][1] > 0
    assert loads[1][0] == [flow] and loads[1][2].get("force_full_load") is True
    # what the denoiser's load leaves free (ComfyUI 0.3.64: the larger of its minimum for inference and what was
    # asked, with its reserve) covers what loading the flow model then frees (1.1 times its size, plus the same for
    # what that load asks), or that load would push part of the denoiser off the device
    least, reserve = mm.minimum_inference_memory(), mm.extra_reserved_memory()
    assert max(least, loads[0][1] + reserve) >= 1.1 * flow.model_size() + max(least, loads[1][1] + reserve)
    assert mm.calls["interrupt_checks"] >= 3
    assert [u[:2] for u in fake_comfy.ProgressBar.updates] == [(1, 3), (2, 3), (3, 3)]
    assert all(u[2] for u in fake_comfy.ProgressBar.updates)  # each with a preview


def test_flow_model_is_loaded_whole_under_novram(comfy):
    mm, nodes = comfy
    model, flow = _models(nodes)
    loads = mm.load_models_gpu

    def novram_load(models, memory_required=0, **kwargs):
        loads(models, memory_required, **kwargs)
        for m in models:  # --novram: load_models_gpu leaves every layer on the CPU, whatever force_full_load says
            m.model.model_lowvram = True

    mm.load_models_gpu = novram_load
    _upscale(nodes, model, flow, _frames(1))
    assert flow.partial_loads and flow.partial_loads[-1][1] >= flow.model_size()
    assert not model.partial_loads  # the denoiser stays partially loaded (comfy.ops casts it layer by layer)


def test_chunked_runs_equal_one_run(comfy):
    _, nodes = comfy
    model, flow = _models(nodes)
    images = _frames(5)
    whole, _ = _upscale(nodes, model, flow, images, "1")
    # Three queue runs of the same node: each continues from the stored stream.
    a, _ = _upscale(nodes, model, flow, images[:1], "2")
    b, _ = _upscale(nodes, model, flow, images[1:3], "2", continue_sequence=True)
    c, _ = _upscale(nodes, model, flow, images[3:], "2", continue_sequence=True)
    assert torch.equal(whole, torch.cat([a, b, c]))
    # The STATE output wired into another node gives the same continuation.
    d, state = _upscale(nodes, model, flow, images[:2], "3")
    e, _ = _upscale(nodes, model, flow, images[2:], "4", state=state)
    assert torch.equal(whole, torch.cat([d, e]))
    # restart gives the first chunk again, not a continuation
    f, _ = _upscale(nodes, model, flow, images[:1], "2")
    assert torch.equal(f, a)


def test_fingerprint_never_serves_a_stale_result(comfy):
    from streamvsr.nodes import stream_diffvsr as vsr

    _, nodes = comfy
    model, flow = _models(nodes)
    upscale = nodes["StreamVSRUpscale"]
    fp = upscale.fingerprint_inputs
    assert math.isnan(fp(continue_sequence=True))  # a continuation always runs
    # and so does a node whose continue_sequence comes through a link (ComfyUI hands it over as None, unknown)
    assert math.isnan(fp(continue_sequence=None)) and math.isnan(fp())  # (and where it is not handed over at all)
    images = _frames(3)
    restart_key = fp(continue_sequence=False)
    _upscale(nodes, model, flow, images[:1], "40")
    assert fp(continue_sequence=False) == restart_key  # re-queueing the same restart run may be cached
    _upscale(nodes, model, flow, images[1:], "40", continue_sequence=True)
    # The store moved on: a cached result of the restart run would leave it at the end of the continuation.
    assert fp(continue_sequence=False) != restart_key
    key = fp(continue_sequence=False)
    _upscale(nodes, model, flow, images[:1], "40")
    assert fp(continue_sequence=False) == key
    _upscale(nodes, model, flow, images[1:2], "40")  # another restart run replaces it
    assert fp(continue_sequence=False) != key
    assert vsr.STREAMS.get("40").state.frame_index == 1


def test_a_node_walking_through_chunks_leaves_cached_results_valid(comfy):
    """Once a node's chunks continue one another, its next chunk moves no cache version on: the same chunk queued
    again is served from ComfyUI's cache (not upscaled and saved a second time), and so are the workflow's other
    upscale nodes (they used to run again on every queue run). The first chunk after a restart's stream does."""
    from streamvsr.nodes import stream_diffvsr as vsr

    _, nodes = comfy
    model, flow = _models(nodes)
    fp = nodes["StreamVSRUpscale"].fingerprint_inputs
    images = _frames(6)
    _upscale(nodes, model, flow, images[:2], "75")  # another node, a restart run
    _upscale(nodes, model, flow, images[:2], "76", start_frame=0)
    first = fp(continue_sequence=False)
    _upscale(nodes, model, flow, images[2:4], "76", start_frame=2)
    key = fp(continue_sequence=False)
    assert key != first  # a cached result of the first chunk stands for a stream no longer stored
    _upscale(nodes, model, flow, images[4:], "76", start_frame=4)
    assert fp(continue_sequence=False) == key
    assert vsr.STREAMS.get("76").state.frame_index == 6


def test_a_chunk_out_of_order_is_told_which_chunk_index_to_queue(comfy):
    """Load Video Chunk's start_frame says its chunk length: the error names the index to set, or, where chunk_frames
    changed since the earlier chunks so that no chunk starts where the sequence ended, says so (it used to ask for
    a chunk that could not be queued)."""
    from streamvsr.nodes.streams import ChunkStart

    _, nodes = comfy
    model, flow = _models(nodes)
    images = _frames(3)
    _upscale(nodes, model, flow, images[:2], "77", start_frame=ChunkStart(0, None, 2))
    with pytest.raises(ValueError, match="sequence ended at frame 2: queue chunk index 1 \\(the chunk that starts at "
                                         "frame 2\\) next"):
        _upscale(nodes, model, flow, images[:2], "77", start_frame=ChunkStart(4, None, 2))
    with pytest.raises(ValueError, match="queue the chunk that starts at frame 2, where no chunk of 3 frames starts "
                                         "\\(chunk_frames changed since the earlier chunks: set it back\\) next"):
        _upscale(nodes, model, flow, images[:3], "77", start_frame=ChunkStart(3, None, 3))
    # past the video's last chunk (frames 0-1, 2-3, 4 of 5), an earlier chunk again: the video has ended
    images = _frames(5)
    for start in (0, 2, 4):
        _upscale(nodes, model, flow, images[start:start + 2], "78", start_frame=ChunkStart(start, None, 2, 5))
    with pytest.raises(ValueError, match="this chunk starts at frame 2, but this node's sequence reached the end of "
                                         r"the video \(frame 5\) with its last chunk: set the chunk index to 0"):
        _upscale(nodes, model, flow, images[2:4], "78", start_frame=ChunkStart(2, None, 2, 5))


def test_a_restart_of_reordered_mirrored_or_channel_swapped_frames_is_another_run(comfy):
    """ComfyUI's LRU/RAM caches keep earlier results: a restart run of frames that only sums alike (reversed,
    mirrored, R and B swapped) must count as another run, or a cached result would stand for the wrong stream."""
    from streamvsr.nodes.streams import batch_origin

    images = _frames(3, h=64, w=64)
    origin = batch_origin("k", images)
    assert batch_origin("k", images.clone()) == origin
    for changed in (images.flip(0), images[[1, 0, 2]], images.flip(2), images.flip(1), images.flip(3),
                    images.to(torch.float64)):
        assert batch_origin("k", changed) != origin
    assert batch_origin("k", images.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)) == origin  # layout


def test_a_chunk_start_is_an_int_that_survives_what_comfyui_does_with_input_values(comfy):
    """ComfyUI deep-copies a failed node's input values into its history and sends them as JSON: Load Video
    Chunk's start_frame must come through both as the int it is, still naming its video (a failed deepcopy kills
    ComfyUI's prompt worker, as a real server showed)."""
    import copy
    import json
    import pickle

    from streamvsr.nodes.streams import ChunkStart, chunk_video

    start = ChunkStart(26, ("/v/a.mp4|10|5", "a.mp4"), 13, 40)
    assert start == 26 and start + 1 == 27 and json.dumps({"start_frame": [start]}) == '{"start_frame": [26]}'
    for again in (copy.deepcopy([start])[0], copy.copy(start), pickle.loads(pickle.dumps(start))):
        assert again == 26 and chunk_video(again) == ("/v/a.mp4|10|5", "a.mp4") and again.chunk_frames == 13
        assert again.total == 40
    assert chunk_video(26) is None and chunk_video(None) is None


def test_a_dropped_stream_invalidates_cached_restart_results(comfy, caplog):
    from streamvsr.nodes.streams import StoredStream, StreamStore

    class State:
        lr_size, frame_index = (4, 4), 1

    store = StreamStore("Test", State, capacity=2)
    for node in ("1", "2"):
        store.put(node, StoredStream("key", State(), origin=("o", node)))
    version = store.version
    with caplog.at_level("WARNING"):
        store.put("3", StoredStream("key", State(), origin=("o", "3")))
    assert store.get("1") is None and store.version != version
    assert "dropped the stored sequence of node 1" in caplog.text


def test_the_compute_precision_is_part_of_the_sequence(comfy):
    """ComfyUI may compute in another dtype than the weights': chunks computed in two precisions are not spliced."""
    from streamvsr.nodes.stream_diffvsr import model_key

    _, nodes = comfy
    model, flow = _models(nodes)
    key = model_key(model, flow, 1, 4)
    model.model.streamvsr_compute_dtype = torch.bfloat16
    assert model_key(model, flow, 1, 4) != key


def test_changed_size_model_or_seed_restarts_and_logs(comfy, caplog):
    _, nodes = comfy
    model, flow = _models(nodes)
    _upscale(nodes, model, flow, _frames(2), "9", seed=1)
    small = _frames(1, h=20, w=24)
    with caplog.at_level("INFO"):
        cont, state = _upscale(nodes, model, flow, small, "9", seed=1, continue_sequence=True)
    assert "frame size changed" in caplog.text
    assert state.frame_index == 1
    assert torch.allclose(cont, _reference(model, flow, small, 1), atol=1e-5)
    caplog.clear()
    with caplog.at_level("INFO"):
        _, state = _upscale(nodes, model, flow, small, "9", seed=2, continue_sequence=True)
    assert "seed, steps, flow model or settings changed" in caplog.text and state.frame_index == 1
    (other,) = _run(nodes["StreamVSRLoadModel"], model="tiny", precision="fp32")
    other.model.streamvsr_source = "another"
    caplog.clear()
    with caplog.at_level("INFO"):
        _, state = _upscale(nodes, other, flow, small, "9", seed=2, continue_sequence=True)
    assert "model" in caplog.text and state.frame_index == 1
    # the flow model is part of the sequence too: other weights, or other options that change its numbers
    _upscale(nodes, other, flow, small, "9", seed=2)
    (fewer,) = _run(nodes["StreamVSRLoadFlowModel"], model="raft_small_test.pth", correlation="auto",
                    resolution="full", iterations=3)
    caplog.clear()
    with caplog.at_level("INFO"):
        _, state = _upscale(nodes, other, fewer, small, "9", seed=2, continue_sequence=True)
    assert "flow model or settings changed" in caplog.text and state.frame_index == 1
    (same,) = _run(nodes["StreamVSRLoadFlowModel"], model="raft_small_test.pth", correlation="on_demand",
                   resolution="full", iterations=3)  # the same numbers in less memory: continues
    _, state = _upscale(nodes, other, same, small, "9", seed=2, continue_sequence=True)
    assert state.frame_index == 2


@pytest.mark.parametrize("replaced", ["model", "vae", "decoder", "controlnet", "flow"])
def test_other_weights_put_at_the_same_path_start_a_new_sequence(comfy, tmp_path, caplog, replaced):
    """A model downloaded or converted again into the same place, then reloaded (ComfyUI's Free, or a restart of the
    loader): the sequence went on with the new weights as if they were the old ones, neither the old sequence nor
    a new one."""
    _, nodes = comfy
    model, flow = _models(nodes)
    frames = _frames(4)
    _upscale(nodes, model, flow, frames[:2], "9")
    models = tmp_path / "models" / "streamvsr"
    if replaced == "model":
        shutil.rmtree(models / "tiny")
        make_tiny_checkpoint(models / "tiny", seed=1)
    elif replaced in ("vae", "controlnet"):  # (another training stage of one part: the rest is the same)
        other = make_tiny_checkpoint(tmp_path / "other", seed=1)
        shutil.rmtree(models / "tiny" / replaced)
        shutil.copytree(other / replaced, models / "tiny" / replaced)
    elif replaced == "decoder":  # (the temporal decoder trained anew over the same, frozen encoder)
        from safetensors.torch import load_file, save_file

        path = models / "tiny" / "vae" / "diffusion_pytorch_model.safetensors"
        weights = load_file(str(path))
        save_file({k: v * 1.01 if k.startswith("decoder.") else v for k, v in weights.items()}, str(path))
    else:
        make_tiny_raft(models / "raft" / "raft_small_test.pth", seed=1)
    model, flow = _models(nodes)  # (loaded anew from the same paths)
    caplog.set_level("INFO")
    out, state = _upscale(nodes, model, flow, frames[2:], "9", continue_sequence=True)
    assert state.frame_index == 2 and ("model" in caplog.text or "flow" in caplog.text), caplog.text
    assert torch.allclose(out, _reference(model, flow, frames[2:], 5), atol=1e-5)  # a new sequence of these weights


def test_a_state_handed_to_another_node_leaves_the_cache_valid(comfy):
    """One node's state output wired into another's state input: re-queueing the unchanged workflow is served
    from ComfyUI's cache (the runs' results depend on their inputs alone), also for other nodes."""
    from streamvsr.nodes import stream_diffvsr as vsr

    _, nodes = comfy
    model, flow = _models(nodes)
    fp = nodes["StreamVSRUpscale"].fingerprint_inputs
    images = _frames(3)
    key = fp(continue_sequence=False)
    first, state = _upscale(nodes, model, flow, images[:2], "50")
    second, _ = _upscale(nodes, model, flow, images[2:], "51", state=state)
    assert fp(continue_sequence=False) == key
    again, _ = _upscale(nodes, model, flow, images[2:], "51", state=state)  # ComfyUI would not even run it
    assert torch.equal(again, second) and fp(continue_sequence=False) == key
    assert torch.equal(torch.cat([first, second]), _upscale(nodes, model, flow, images, "52")[0])
    # node 50 runs again on the same inputs (as it does after anything else moved the cache version on): its new
    # state object is the same state, so the workflow settles instead of running both nodes on every queue
    _, again_state = _upscale(nodes, model, flow, images[:2], "50")
    assert again_state is not state
    _upscale(nodes, model, flow, images[2:], "51", state=again_state)
    assert fp(continue_sequence=False) == key
    # node 51 continues another state now (other frames upstream): a cached result of the earlier run would leave
    # node 51's stored sequence at the end of the other one
    _, other = _upscale(nodes, model, flow, images[:2].flip(0), "50")
    moved = fp(continue_sequence=False)
    assert moved != key
    _upscale(nodes, model, flow, images[2:], "51", state=other)
    assert fp(continue_sequence=False) != moved
    assert vsr.STREAMS.get("51").state.frame_index == 3


def test_sequence_mistakes_are_reported_before_the_models_load(comfy):
    from streamvsr.models.flashvsr.engine import new_state as flashvsr_state

    mm, nodes = comfy
    model, flow = _models(nodes)
    loads = len(mm.calls["load_models_gpu"])
    with pytest.raises(ValueError, match="no earlier chunk.*chunk index to 0.*'Widget control mode' is 'before'"):
        _upscale(nodes, model, flow, _frames(2), "60", start_frame=8)
    with pytest.raises(ValueError, match="another kind of upscale node.*Stream Upscale"):
        _upscale(nodes, model, flow, _frames(2), "60", state=flashvsr_state(1))
    assert len(mm.calls["load_models_gpu"]) == loads
    # a state input and a start_frame that disagree: which one is meant cannot be guessed
    _, state = _upscale(nodes, model, flow, _frames(2), "61")
    loads = len(mm.calls["load_models_gpu"])
    with pytest.raises(ValueError, match="ended its sequence at frame 2, but start_frame says this chunk starts at "
                                         "frame 4: connect one of the two"):
        _upscale(nodes, model, flow, _frames(2), "62", state=state, start_frame=4)
    assert len(mm.calls["load_models_gpu"]) == loads
    out, _ = _upscale(nodes, model, flow, _frames(3)[2:], "62", state=state, start_frame=2)
    assert out.shape[0] == 1


def test_the_stateful_upscale_nodes_are_marked_not_idempotent(comfy):
    # Two alike upscale nodes each carry their own sequence, so they must not share a cached result: ComfyUI adds
    # the node id to the cache key of a not-idempotent node only (V3's unique_id does not). Only the flag is
    # checked here; the caching itself is ComfyUI's.
    _, nodes = comfy
    for node_id in ("StreamVSRUpscale", "StreamVSRFlashVSRUpscale"):
        assert nodes[node_id].define_schema().kwargs.get("not_idempotent") is True, node_id


def test_cpu_layers_can_be_turned_off_for_memory(comfy):
    from streamvsr.models.shared.packed import PackedConv2d, PackedLinear

    _, nodes = comfy
    model, flow = _models(nodes)  # a CPU-only ComfyUI in fp32: the CPU layers by default
    (plain,) = _run(nodes["StreamVSRLoadModel"], model="tiny", precision="auto", cpu_layers=False)
    packed = (PackedConv2d, PackedLinear)
    assert any(isinstance(m, packed) for m in model.model.modules())
    assert not any(isinstance(m, packed) for m in plain.model.modules())
    # the copies that do not depend on the frame size were made by the loaders, before any frame
    assert all(m._packed is not None or m._halves is not None
               for m in model.model.modules() if isinstance(m, PackedLinear) and not m.single_use)
    # RAFT keeps its CPU layers; their Winograd kernels depend on the frame size: made by the first frame
    flow_convs = [m for m in flow.model.modules() if isinstance(m, PackedConv2d)]
    assert flow_convs and all(m._winograd is None for m in flow_convs)
    images = _frames(2)
    (fast_out, _), (plain_out, _) = (_upscale(nodes, m, flow, images, uid) for m, uid in ((model, "1"), (plain, "2")))
    assert any(m._winograd is not None for m in flow_convs)
    assert (fast_out - plain_out).abs().max() <= 1e-4  # the same output up to float rounding
    assert torch.allclose(plain_out, _reference(plain, flow, images, seed=5), atol=1e-6)


def test_bad_inputs(comfy):
    from streamvsr.nodes import stream_diffvsr as vsr

    _, nodes = comfy
    model, flow = _models(nodes)
    with pytest.raises(ValueError, match="empty"):
        _upscale(nodes, model, flow, torch.zeros(0, 8, 8, 3))
    with pytest.raises(ValueError, match="channels"):
        _upscale(nodes, model, flow, torch.zeros(1, 8, 8, 2))
    _upscale(nodes, model, flow, _frames(1), "20")
    stored = vsr.STREAMS.get("20")
    nan = _frames(2)
    nan[1, 3, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="frame 1 .*NaN"):
        _upscale(nodes, model, flow, nan, "20", continue_sequence=True)
    assert vsr.STREAMS.get("20") is stored  # a failed run leaves the stream as it was
    with pytest.raises(ValueError, match="reset|new sequence"):
        _upscale(nodes, model, flow, _frames(1, h=8, w=8), "21", state=stored.state)
    # RGBA: alpha dropped; grayscale: replicated; both equal the RGB result
    rgb = _frames(2)
    rgba = torch.cat([rgb, torch.rand(2, 33, 45, 1)], dim=-1)
    expected, _ = _upscale(nodes, model, flow, rgb)
    got, _ = _upscale(nodes, model, flow, rgba)
    assert torch.allclose(got, expected, atol=1e-5)
    gray, _ = _upscale(nodes, model, flow, rgb[..., :1])
    expected, _ = _upscale(nodes, model, flow, rgb[..., :1].expand(-1, -1, -1, 3).clone())
    assert torch.allclose(gray, expected, atol=1e-5)
    # a single tiny frame whose sides are not multiples of 4
    out, _ = _upscale(nodes, model, flow, _frames(2, h=5, w=7))
    assert out.shape == (2, 20, 28, 3)


def test_interrupt_keeps_stored_state(monkeypatch, tmp_path, assets):
    _, nodes = _install(monkeypatch, tmp_path, assets, interrupt_after=3)
    from streamvsr.nodes import stream_diffvsr as vsr

    model, flow = _models(nodes)
    _upscale(nodes, model, flow, _frames(2), "30")  # 3 interrupt checks: one per frame, one before storing
    stored = vsr.STREAMS.get("30")
    with pytest.raises(fake_comfy.Interrupted):
        _upscale(nodes, model, flow, _frames(4), "30", continue_sequence=True)
    assert vsr.STREAMS.get("30") is stored
    assert stored.state.frame_index == 2


def test_a_cancel_during_the_last_frame_does_not_move_the_sequence_on(monkeypatch, tmp_path, assets):
    """The nodes after this one would not run: a sequence moved past frames that reached no one could not give
    them again (a chunk re-queued would be refused)."""
    mm, nodes = _install(monkeypatch, tmp_path, assets, interrupt_after=3)
    from streamvsr.nodes import stream_diffvsr as vsr

    model, flow = _models(nodes)
    images = _frames(4)
    _upscale(nodes, model, flow, images[:2], "31", start_frame=0)  # checks 1-3
    stored = vsr.STREAMS.get("31")
    with pytest.raises(fake_comfy.Interrupted):  # check 4 passes the frames through, check 5 is the cancel...
        _upscale(nodes, model, flow, images[2:3], "31", start_frame=2)
    assert vsr.STREAMS.get("31") is stored
    # ...so the same chunk can be queued again, and gives what one run over the frames gives
    mm.calls["interrupt_checks"] = -1000
    (again, _) = _upscale(nodes, model, flow, images[2:3], "31", start_frame=2)
    want = _reference(model, flow, images[:3], seed=5)
    assert torch.equal(again[0], want[2])


def test_a_chunk_whose_frames_reached_no_node_is_redone_when_queued_again(comfy, caplog, monkeypatch):
    _, nodes = comfy
    shown = []  # the text under the node in the frontend
    server = types.ModuleType("server")
    server.PromptServer = types.SimpleNamespace(
        instance=types.SimpleNamespace(send_progress_text=lambda text, node_id: shown.append((node_id, text))))
    monkeypatch.setitem(sys.modules, "server", server)
    model, flow = _models(nodes)
    images = _frames(6)
    expected = _reference(model, flow, images, seed=5)
    _upscale(nodes, model, flow, images[:2], "36", start_frame=0)
    first, _ = _upscale(nodes, model, flow, images[2:4], "36", start_frame=2)
    assert shown == []
    # Its result went nowhere (a later node failed): queued again, it is upscaled again from where it started...
    with caplog.at_level("WARNING"):
        again, _ = _upscale(nodes, model, flow, images[2:4], "36", start_frame=2)
    assert "upscaling it again from the state it started from" in caplog.text
    # ...and the node says so, since a Save Image after it saves those frames a second time if it had saved them
    assert len(shown) == 1 and shown[0][0] == "36" and "Save Image now saves them a second time" in shown[0][1]
    assert torch.equal(again, first) and torch.equal(again, expected[2:4])
    # ...and the video goes on as if it had run once (and the redone chunk can be redone again)
    assert torch.equal(_upscale(nodes, model, flow, images[2:4], "36", start_frame=2)[0], first)
    last, _ = _upscale(nodes, model, flow, images[4:], "36", start_frame=4)
    assert torch.equal(last, expected[4:])


def test_a_chunk_upscaled_already_and_a_state_of_other_settings_are_one_line_errors(comfy, monkeypatch):
    from streamvsr.models.shared.errors import UserInputError
    from streamvsr.nodes import streams

    mm, nodes = comfy
    model, flow = _models(nodes)
    images = _frames(4)
    monkeypatch.setattr(streams, "REDO_MAX_BYTES", 1000)  # a state too large to keep a second copy of
    _upscale(nodes, model, flow, images[:2], "32", start_frame=0)
    _upscale(nodes, model, flow, images[2:], "32", start_frame=2)
    loads = len(mm.calls["load_models_gpu"])
    # Its result went nowhere (a later node failed): it cannot be redone from here, and the error says so.
    with pytest.raises(UserInputError, match="starts at frame 2, which this node's last run upscaled already.*"
                                             "too large to keep.*chunk index to 0.*starts at frame 4"):
        _upscale(nodes, model, flow, images[2:], "32", start_frame=2)
    # A state goes on only with the settings it was made with (here another seed, then other steps).
    _, state = _upscale(nodes, model, flow, images[:2], "33", seed=1)
    for other in ({"seed": 2}, {"seed": 1, "steps": 3}):
        with pytest.raises(UserInputError, match="state input was made with another model, precision, seed"):
            _upscale(nodes, model, flow, images[2:], "34", state=state, **other)
    assert len(mm.calls["load_models_gpu"]) == loads + 2  # only node 33's run loaded (the model and the flow)
    _upscale(nodes, model, flow, images[2:], "34", state=state, seed=1)


def test_the_cpu_running_out_of_memory_gets_the_advice_too(comfy):
    """ComfyUI knows CUDA's out-of-memory type only; PyTorch's CPU allocator raises a plain RuntimeError."""
    from streamvsr.nodes.common import out_of_memory_advice

    mm, _ = comfy
    with pytest.raises(RuntimeError, match="^use smaller frames$"):
        with out_of_memory_advice("use smaller frames"):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 8589934592 bytes. Error code 12")
    assert mm.calls["unload_all_models"] == 1
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):  # a bug stays a bug
        with out_of_memory_advice("use smaller frames"):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    assert mm.calls["unload_all_models"] == 1


def test_out_of_memory_retries_with_on_demand_correlation(comfy):
    mm, nodes = comfy
    model, flow = _models(nodes, correlation="all_pairs")
    raft = flow.model.raft
    real_forward = raft.forward
    calls = []

    def forward(image1, image2, num_flow_updates=12, corr="auto", **kw):
        calls.append(corr)
        if corr != "on_demand":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(image1, image2, num_flow_updates, corr=corr, **kw)

    raft.forward = forward
    images = _frames(3)
    out, _ = _upscale(nodes, model, flow, images)
    assert calls == ["all_pairs", "on_demand", "on_demand"]  # one failure, then on-demand for the rest
    assert flow.model.corr == "all_pairs"  # the shared flow model is not modified
    del raft.forward
    assert torch.allclose(out, _reference(model, flow, images, 5), atol=1e-4)

    def always_oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    raft.forward = always_oom
    with pytest.raises(RuntimeError, match="ran out of memory.*turn cpu_layers off") as e:
        _upscale(nodes, model, flow, images)
    assert "GPU" not in str(e.value) and "--cpu" not in str(e.value)  # (it runs on the CPU: its own advice)
    assert mm.calls["unload_all_models"] == 1  # as ComfyUI does after its own out-of-memory errors
    del raft.forward
    from streamvsr.nodes.stream_diffvsr import oom_ladder

    cpu = mm.get_torch_device
    mm.get_torch_device = lambda: torch.device("cuda")
    try:
        assert "--lowvram" in oom_ladder(model, 45, 33) and "cpu_layers" not in oom_ladder(model, 45, 33)
        # on a GPU too, only what is not set already: auto precision is half precision there, a flow already at
        # half resolution can go to a quarter
        half = types.SimpleNamespace(model=types.SimpleNamespace(streamvsr_compute_dtype=torch.float16))
        flow_at = {d: types.SimpleNamespace(model=types.SimpleNamespace(downscale=d)) for d in (1, 2, 4)}
        assert "precision fp16 or bf16" in oom_ladder(model, 45, 33, flow_patcher=flow_at[1])
        assert "precision" not in oom_ladder(half, 45, 33, flow_patcher=flow_at[1])
        assert "resolution to 'half'" in oom_ladder(half, 45, 33, flow_patcher=flow_at[1])
        assert "resolution to 'quarter'" in oom_ladder(half, 45, 33, flow_patcher=flow_at[2])
        assert "resolution" not in oom_ladder(half, 45, 33, flow_patcher=flow_at[4])
    finally:
        mm.get_torch_device = cpu


def test_flow_nodes(comfy):
    _, nodes = comfy
    _, flow = _models(nodes)
    images = _frames(3)
    (field,) = _run(nodes["StreamVSREstimateFlow"], flow_model=flow, images=images)
    assert field.shape == (2, 33, 45, 2) and field.dtype == torch.float32
    # entry i: RAFT(image1=frame i+1, image2=frame i), images in [-1, 1]
    frames = images.permute(0, 3, 1, 2) * 2 - 1
    for i in range(2):
        expected = flow.model(frames[i + 1: i + 2], frames[i: i + 1])[0].permute(1, 2, 0)
        assert torch.allclose(field[i], expected, atol=1e-5)
    (vis,) = _run(nodes["StreamVSRFlowToImage"], flow=field, max_magnitude=0.0)
    assert vis.shape == (2, 33, 45, 3) and 0 <= vis.min() and vis.max() <= 1
    # a known field: uniform motion to the right is one colour everywhere; zero motion is white
    right = torch.zeros(2, 4, 6, 2)
    right[0, ..., 0] = 3.0
    (vis,) = _run(nodes["StreamVSRFlowToImage"], flow=right, max_magnitude=3.0)
    assert torch.equal(vis[0], vis[0, :1, :1].expand_as(vis[0]))
    assert torch.allclose(vis[1], torch.ones_like(vis[1]))
    # the scale of a batch with a NaN somewhere is that of its finite motion
    damaged = right.clone()
    damaged[1, 0, 0, 0] = float("nan")
    (vis_nan,) = _run(nodes["StreamVSRFlowToImage"], flow=damaged, max_magnitude=0.0)
    assert torch.equal(vis_nan[0], vis[0])
    damaged[1, 0, 0, 0] = float("inf")  # (nor with an infinite one: every other pixel came out white)
    (vis_inf,) = _run(nodes["StreamVSRFlowToImage"], flow=damaged, max_magnitude=0.0)
    assert torch.equal(vis_inf[0], vis[0])
    # the batch's fastest pixel is drawn at full saturation, as torchvision draws it, not darkened as beyond the
    # scale (a float32 peak differed from flow_to_image's in its last bit)
    from torchvision.utils import flow_to_image as tv_flow_to_image

    fast = torch.zeros(2, 1, 2, 2)
    fast[0, 0, 0] = torch.tensor([-15.9377, -10.5794])
    (vis_fast,) = _run(nodes["StreamVSRFlowToImage"], flow=fast, max_magnitude=0.0)
    expected = tv_flow_to_image(fast[0].permute(2, 0, 1)).permute(1, 2, 0)
    assert (vis_fast[0] * 255).round().to(torch.uint8).tolist()[0][0] == expected[0, 0].tolist() == [0, 92, 255]
    with pytest.raises(ValueError, match="at least 2"):
        _run(nodes["StreamVSREstimateFlow"], flow_model=flow, images=images[:1])
    # out of memory even on demand: what is left to change, for the device ComfyUI runs on
    def always_oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    flow.model.raft.forward = always_oom
    with pytest.raises(RuntimeError, match="^RAFT ran out of memory even with on-demand correlation: set Load RAFT "
                                           "Flow Model's resolution to 'half' or 'quarter', use smaller frames, close "
                                           "other programs.$"):
        _run(nodes["StreamVSREstimateFlow"], flow_model=flow, images=images)
    (quarter,) = _run(nodes["StreamVSRLoadFlowModel"], model="raft_small_test.pth", correlation="auto",
                      resolution="quarter", iterations=12)
    quarter.model.raft.forward = always_oom
    with pytest.raises(RuntimeError, match="correlation: use smaller frames, close other programs.$"):
        _run(nodes["StreamVSREstimateFlow"], flow_model=quarter, images=images)
    for patched in (flow, quarter):
        vars(patched.model.raft).pop("forward", None)
    gray = images[..., :1]
    (g,) = _run(nodes["StreamVSREstimateFlow"], flow_model=flow, images=gray)
    (g3,) = _run(nodes["StreamVSREstimateFlow"], flow_model=flow, images=gray.expand(-1, -1, -1, 3).clone())
    assert torch.allclose(g, g3, atol=1e-5)
    # values outside [0, 1] (a bicubic upscale's overshoot) are clamped, as Stream Upscale clamps its frames
    overshoot = images * 1.6 - 0.3
    (over,) = _run(nodes["StreamVSREstimateFlow"], flow_model=flow, images=overshoot)
    (clamped,) = _run(nodes["StreamVSREstimateFlow"], flow_model=flow, images=overshoot.clamp(0, 1))
    assert torch.equal(over, clamped)


def _refused_before_the_models_load(comfy, video, match):
    from streamvsr.models.shared.errors import UserInputError

    mm, nodes = comfy
    model, flow = _models(nodes)
    loads = len(mm.calls["load_models_gpu"])
    with pytest.raises(UserInputError, match=match):
        nodes["StreamVSRVideoUpscale"].execute(model=model, flow_model=flow, video=video, seed=1, steps=1,
                                               codec="h264", scene_cut_threshold=0.0, filename_prefix="a/b")
    assert len(mm.calls["load_models_gpu"]) == loads


def test_video_file_node(comfy, tmp_path):
    pytest.importorskip("av")
    from test_video import decode, make_clip

    _, nodes = comfy
    model, flow = _models(nodes)
    clip = make_clip(tmp_path / "in.mp4", n=3, w=32, h=24)
    node = nodes["StreamVSRVideoUpscale"]
    out = node.execute(model=model, flow_model=flow, video=FileVideo(clip), seed=1, steps=2, codec="h264",
                       scene_cut_threshold=0.0, filename_prefix="streamvsr/test")
    kind, path = out.values[0]
    assert kind == "VideoFromFile" and path.endswith("test_00001_.mp4")
    frames = decode(path)
    assert len(frames) == 3 and frames[0].shape == (96, 128, 3)

    class InMemory(FileVideo):  # a VIDEO that lives in memory (e.g. from another node), a file object read to its end
        def get_stream_source(self):
            data = io.BytesIO(self.path.read_bytes())
            data.seek(0, 2)
            return data

    out = node.execute(model=model, flow_model=flow, video=InMemory(clip), seed=1, steps=2, codec="h264",
                       scene_cut_threshold=0.0, filename_prefix="streamvsr/memory")
    again = decode(out.values[0][1])
    assert len(again) == 3 and all((a == b).all() for a, b in zip(again, frames))


def test_video_node_refuses_a_pyav_too_old_when_comfyui_validates_the_prompt(comfy, monkeypatch):
    """ComfyUI validates a prompt before any node runs: there, not after the model loaders upstream (minutes, or a
    download) ran, a PyAV older than the video paths need is said (the reader's own check comes later)."""
    import inspect

    import av

    _, nodes = comfy
    node = nodes["StreamVSRVideoUpscale"]
    # ComfyUI hands the function the inputs it names (it reports a failure per input named: one is needed)
    assert inspect.getfullargspec(node.validate_inputs).args == ["cls", "filename_prefix"]
    assert node.validate_inputs(filename_prefix="streamvsr/upscaled") is True
    monkeypatch.setattr(av, "__version__", "17.1.0")
    said = node.validate_inputs(filename_prefix="streamvsr/upscaled")
    assert said.startswith("video needs PyAV 18.1 or newer, and 17.1.0 is installed"), said


def test_video_node_finds_audio_it_cannot_write_before_loading_the_models(comfy, tmp_path):
    pytest.importorskip("av")
    from test_video import clip_with_16_channels

    _refused_before_the_models_load(comfy, FileVideo(clip_with_16_channels(tmp_path / "in.mkv")),
                                    "AAC cannot take it")


def test_video_node_finds_a_missing_encoder_before_loading_the_models(comfy, tmp_path, monkeypatch):
    """PyAV built on a system FFmpeg without x264: one line that names the way out, before any model loads."""
    pytest.importorskip("av")
    from test_video import make_clip

    from streamvsr.video import writer

    real = writer._has_encoder
    monkeypatch.setattr(writer, "_has_encoder", lambda name: name != "libx264" and real(name))
    _refused_before_the_models_load(comfy, FileVideo(make_clip(tmp_path / "in.mp4", n=2, audio=None)),
                                    "no libx264 encoder.*choose codec 'lossless'")


def test_video_node_finds_frames_too_wide_for_h264_before_loading_the_models(comfy, tmp_path):
    """x264 takes at most 16384 pixels a side: a 5K-wide input upscaled x4 failed with a raw FFmpeg error, after
    the models loaded and the first frame was upscaled."""
    pytest.importorskip("av")
    from test_video import make_clip

    wide = make_clip(tmp_path / "wide.mkv", n=1, w=4100, h=8, audio=None, vcodec="ffv1")
    _refused_before_the_models_load(comfy, FileVideo(wide), "h264 cannot encode the 16400x32 output frames "
                                                            r"\(libx264 takes at most 16384 pixels a side\): choose "
                                                            "the lossless codec")


def test_a_finished_outputs_leftover_resume_files_are_not_continued(comfy, tmp_path, caplog, monkeypatch):
    """A crash between publishing the result and removing its work files leaves both: continuing that job could
    only fail (its output exists), so a new file is started."""
    pytest.importorskip("av")
    from test_video import FakeEngine, make_clip

    from streamvsr.nodes.video import _unfinished_job
    from streamvsr.video import ResumeFiles, upscale_video

    clip = make_clip(tmp_path / "in.mp4", n=6, audio=None)
    out = tmp_path / "out_00001_.mp4"
    polls = []
    upscale_video(FakeEngine(), clip, out, resume=True, checkpoint_frames=1,
                  should_stop=lambda: polls.append(1) or len(polls) > 3)
    job = ResumeFiles(out).read_info()["fingerprint"]
    assert _unfinished_job(str(tmp_path), "out", ".mp4", job) == str(out)
    out.write_bytes(b"the finished result")
    with caplog.at_level("WARNING"):
        assert _unfinished_job(str(tmp_path), "out", ".mp4", job) is None
    assert "is finished but its resume files are still there" in caplog.text
    # a damaged checkpoint cannot be continued either: said without the command line's advice
    out.unlink()
    state = ResumeFiles(out).state
    state.write_bytes(state.read_bytes()[:40])
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert _unfinished_job(str(tmp_path), "out", ".mp4", job) is None
    assert f"the resume file {state} is damaged" in caplog.text and "a new file is started" in caplog.text
    assert "--overwrite" not in caplog.text
    # one that cannot be read (another user's, in a shared folder) is passed over too, not an error
    import streamvsr.video.resume as resume_module
    from streamvsr.models.shared.errors import UserInputError

    def refused(path):
        raise UserInputError(f"cannot read {path} (Permission denied)")

    monkeypatch.setattr(resume_module, "_check_readable", refused)
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert _unfinished_job(str(tmp_path), "out", ".mp4", job) is None
    assert f"cannot read {state} (Permission denied); a new file is started" in caplog.text


def test_compile_on_a_cpu_only_comfyui_is_flagged_at_load(comfy, caplog):
    """As the command line flags --compile on the CPU (minutes of compiling, little or no faster there)."""
    _, nodes = comfy
    for compile in (False, True):
        caplog.clear()
        with caplog.at_level("WARNING"):
            _run(nodes["StreamVSRLoadModel"], model="tiny", precision="auto", compile=compile)
        assert ("compile on the CPU: compiling takes minutes" in caplog.text) == compile
