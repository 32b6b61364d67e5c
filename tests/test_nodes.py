"""Node classes on CPU with tiny weights, with stand-ins for the ComfyUI modules (tests/fake_comfy.py)."""

import asyncio
import shutil

import pytest
import torch

import fake_comfy
from helpers import make_tiny_checkpoint, make_tiny_raft

pytest.importorskip("diffusers")
pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("nodes")
    ckpt = make_tiny_checkpoint(root / "ckpt")
    raft = make_tiny_raft(root / "raft_small_test.pth")
    return ckpt, raft


@pytest.fixture
def comfy(monkeypatch, tmp_path, assets):
    ckpt, raft = assets
    models = tmp_path / "models"
    shutil.copytree(ckpt, models / "streamvsr" / "tiny")
    (models / "streamvsr" / "raft").mkdir(parents=True)
    shutil.copy(raft, models / "streamvsr" / "raft" / raft.name)
    mm = fake_comfy.install(monkeypatch, models)
    import streamvsr

    ext = asyncio.run(streamvsr.comfy_entrypoint())
    nodes = {n.define_schema().node_id: n for n in asyncio.run(ext.get_node_list())}
    return mm, nodes


def _run(node, unique_id="7", **inputs):
    node.hidden = fake_comfy.types.SimpleNamespace(unique_id=unique_id)
    return node.execute(**inputs).values


def _frames(n, h=33, w=45, seed=0, channels=3):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(h + n, w + 2 * n, channels, generator=g)
    return torch.stack([base[i: i + h, 2 * i: 2 * i + w] for i in range(n)])


def _models(nodes):
    (model,) = _run(nodes["StreamVSRLoadModel"], model="tiny", precision="auto")
    (flow,) = _run(nodes["StreamVSRLoadFlowModel"], model="raft_small_test.pth", correlation="auto",
                   resolution="full", iterations=4)
    return model, flow


def test_schemas_are_namespaced_and_documented(comfy):
    _, nodes = comfy
    assert len(nodes) >= 5
    for node_id, node in nodes.items():
        schema = node.define_schema()
        assert node_id.startswith("StreamVSR")
        for inp in schema.inputs:
            assert inp.kwargs.get("tooltip"), f"{node_id}.{inp.id} has no tooltip"
        for t in [i.io_type for i in schema.inputs] + [o.io_type for o in schema.outputs]:
            assert t in ("INT", "FLOAT", "BOOLEAN", "COMBO", "IMAGE", "VIDEO", "STRING") or t.startswith("STREAMVSR_")
    options = next(i for i in nodes["StreamVSRLoadModel"].define_schema().inputs if i.id == "model").kwargs["options"]
    assert "tiny" in options and any(o.startswith("(download)") for o in options)


def test_upscale_shapes_state_and_model_management(comfy):
    mm, nodes = comfy
    model, flow = _models(nodes)
    images = _frames(3)
    before = images.clone()
    out, state = _run(nodes["StreamVSRUpscale"], model=model, flow_model=flow, images=images, seed=42, steps=4,
                      continue_sequence=False)
    assert out.shape == (3, 132, 180, 3) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert 0 <= out.min() and out.max() <= 1
    assert torch.equal(images, before)
    assert state.frame_index == 3 and state.lr_size == (33, 45)
    assert any(m[0] == [model] and m[1] > 0 for m in mm.calls["load_models_gpu"])
    assert mm.calls["interrupt_checks"] >= 3
    assert fake_comfy.ProgressBar.updates[-1] == (3, 3, True)


def test_chunked_runs_equal_one_run(comfy):
    _, nodes = comfy
    model, flow = _models(nodes)
    images = _frames(4)
    upscale = nodes["StreamVSRUpscale"]
    whole, _ = _run(upscale, "1", model=model, flow_model=flow, images=images, seed=5, steps=4,
                    continue_sequence=False)
    # Two queue runs of the same node: the second continues from the stored stream.
    a, _ = _run(upscale, "2", model=model, flow_model=flow, images=images[:1], seed=5, steps=4,
                continue_sequence=False)
    b, _ = _run(upscale, "2", model=model, flow_model=flow, images=images[1:], seed=5, steps=4,
                continue_sequence=True)
    assert torch.equal(whole, torch.cat([a, b]))
    # The STATE output wired into another node gives the same continuation.
    c, state = _run(upscale, "3", model=model, flow_model=flow, images=images[:2], seed=5, steps=4,
                    continue_sequence=False)
    d, _ = _run(upscale, "4", model=model, flow_model=flow, images=images[2:], seed=5, steps=4,
                continue_sequence=False, state=state)
    assert torch.equal(whole, torch.cat([c, d]))
    # restart gives the first chunk again, not a continuation
    e, _ = _run(upscale, "2", model=model, flow_model=flow, images=images[:1], seed=5, steps=4,
                continue_sequence=False)
    assert torch.equal(e, a)
    assert upscale.fingerprint_inputs(continue_sequence=True) != upscale.fingerprint_inputs(continue_sequence=True)


def test_changed_size_or_seed_restarts(comfy, caplog):
    _, nodes = comfy
    model, flow = _models(nodes)
    upscale = nodes["StreamVSRUpscale"]
    _run(upscale, "9", model=model, flow_model=flow, images=_frames(1), seed=1, steps=4, continue_sequence=False)
    small = _frames(1, h=20, w=24)
    fresh, _ = _run(upscale, "10", model=model, flow_model=flow, images=small, seed=1, steps=4,
                    continue_sequence=False)
    with caplog.at_level("INFO"):
        cont, _ = _run(upscale, "9", model=model, flow_model=flow, images=small, seed=1, steps=4,
                       continue_sequence=True)
    assert "frame size changed" in caplog.text
    assert torch.equal(cont, fresh)


def test_bad_inputs(comfy):
    _, nodes = comfy
    model, flow = _models(nodes)
    upscale = nodes["StreamVSRUpscale"]
    with pytest.raises(ValueError, match="empty"):
        _run(upscale, model=model, flow_model=flow, images=torch.zeros(0, 8, 8, 3), seed=0, steps=4,
             continue_sequence=False)
    nan = _frames(2)
    nan[1, 3, 3, 0] = float("nan")
    _run(upscale, "20", model=model, flow_model=flow, images=_frames(1), seed=0, steps=4, continue_sequence=False)
    from streamvsr.nodes import vsr

    stored = vsr._STREAMS["20"]
    with pytest.raises(ValueError, match="NaN"):
        _run(upscale, "20", model=model, flow_model=flow, images=nan, seed=0, steps=4, continue_sequence=True)
    assert vsr._STREAMS["20"] is stored  # a failed run leaves the stream as it was
    rgba, _ = _run(upscale, model=model, flow_model=flow, images=_frames(1, channels=4), seed=0, steps=4,
                   continue_sequence=False)
    assert rgba.shape == (1, 132, 180, 3)
    gray, _ = _run(upscale, model=model, flow_model=flow, images=_frames(1, channels=1), seed=0, steps=4,
                   continue_sequence=False)
    assert gray.shape == (1, 132, 180, 3)


def test_interrupt_keeps_stored_state(monkeypatch, tmp_path, assets):
    ckpt, raft = assets
    models = tmp_path / "models"
    shutil.copytree(ckpt, models / "streamvsr" / "tiny")
    (models / "streamvsr" / "raft").mkdir(parents=True)
    shutil.copy(raft, models / "streamvsr" / "raft" / raft.name)
    fake_comfy.install(monkeypatch, models, interrupt_after=2)
    import streamvsr

    nodes = {n.define_schema().node_id: n
             for n in asyncio.run(asyncio.run(streamvsr.comfy_entrypoint()).get_node_list())}
    model, flow = _models(nodes)
    from streamvsr.nodes import vsr

    vsr._STREAMS.pop("30", None)
    with pytest.raises(fake_comfy.Interrupted):
        _run(nodes["StreamVSRUpscale"], "30", model=model, flow_model=flow, images=_frames(4), seed=0, steps=4,
             continue_sequence=False)
    assert "30" not in vsr._STREAMS


def test_flow_nodes(comfy):
    _, nodes = comfy
    _, flow = _models(nodes)
    images = _frames(3)
    (field,) = _run(nodes["StreamVSREstimateFlow"], flow_model=flow, images=images)
    assert field.shape == (2, 33, 45, 2)
    frames = images.permute(0, 3, 1, 2) * 2 - 1
    expected = flow.model(frames[1:2], frames[0:1])[0].permute(1, 2, 0)
    assert torch.allclose(field[0], expected)
    (vis,) = _run(nodes["StreamVSRFlowToImage"], flow=field, max_magnitude=0.0)
    assert vis.shape == (2, 33, 45, 3) and 0 <= vis.min() and vis.max() <= 1
    with pytest.raises(ValueError, match="at least 2"):
        _run(nodes["StreamVSREstimateFlow"], flow_model=flow, images=images[:1])


def test_video_file_node(comfy, tmp_path):
    av = pytest.importorskip("av")
    from test_video import decode, make_clip

    _, nodes = comfy
    model, flow = _models(nodes)
    clip = make_clip(tmp_path / "in.mp4", n=3, w=32, h=24)

    class Video:  # what core LoadVideo hands over, reduced to what the node uses
        def get_dimensions(self):
            return 32, 24

        def get_stream_source(self):
            return str(clip)

    node = nodes["StreamVSRVideoUpscale"]
    out = node.execute(model=model, flow_model=flow, video=Video(), seed=1, steps=2, codec="h264",
                       scene_cut_threshold=0.0, filename_prefix="streamvsr/test")
    kind, path = out.values[0]
    assert kind == "VideoFromFile" and path.endswith("test_00001_.mp4")
    frames = decode(path)
    assert len(frames) == 3 and frames[0].shape == (96, 128, 3)
    assert av is not None
