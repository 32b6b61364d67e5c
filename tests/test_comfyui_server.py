"""Opt-in: the pack inside a real ComfyUI server, driven through its HTTP API.

Set STREAMVSR_COMFYUI=/path/to/ComfyUI (0.3.64 or newer) and, if ComfyUI has its own environment,
STREAMVSR_COMFYUI_PYTHON=/path/to/its/python. The test makes a temporary --base-directory holding this pack
(linked into custom_nodes/), tiny random checkpoints (Stream-DiffVSR, RAFT, FlashVSR in the official file layout,
and a Wan 2.1 VAE made by ComfyUI's own class, for VAE Decode) and short input videos; it then checks
/object_info, executes every workflow in workflows/, and checks that two chunked queue runs equal one run for both
models. ``prepare_base`` is also what a person uses to try the workflows in the browser against the same files.
Traffic stays on 127.0.0.1.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import numpy as np
import pytest

COMFY = os.environ.get("STREAMVSR_COMFYUI")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFY, reason="set STREAMVSR_COMFYUI=/path/to/ComfyUI to run against a "
                                                   "real ComfyUI server")]
ROOT = pathlib.Path(__file__).resolve().parents[1]
NODES = {"StreamVSRLoadModel", "StreamVSRUpscale", "StreamVSRVideoUpscale", "StreamVSRLoadFlowModel",
         "StreamVSREstimateFlow", "StreamVSRFlowToImage", "StreamVSRLoadFlashVSR", "StreamVSRFlashVSRUpscale",
         "StreamVSRFlashVSRSettings", "StreamVSRFlashVSRTrimDecoded", "StreamVSRLoadVideoChunk"}
# Frontend-only node types (not in /object_info).
VIRTUAL = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")
LONG_FRAMES = 30  # long.mp4: FlashVSR's first 21 frames come out once 25 are in, so chunks of 26 + 4 both emit
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _get(base, path):
    with urllib.request.urlopen(base + path, timeout=30) as r:
        return json.loads(r.read())


def _post(base, path, payload):
    req = urllib.request.Request(base + path, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{path} refused the prompt: {e.read().decode()}") from None


WAN_VAE_SCRIPT = """
import sys, torch
from comfy.cli_args import args
args.cpu = True
import comfy.ldm.wan.vae
from safetensors.torch import save_file
torch.manual_seed(0)
vae = comfy.ldm.wan.vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                               temperal_downsample=[False, True, True], dropout=0.0)
# decoder half only (ComfyUI loads VAEs non-strictly; decoding never touches the encoder), in fp16
save_file({k: v.half().contiguous() for k, v in vae.state_dict().items() if k.startswith(("decoder.", "conv2."))},
          sys.argv[1])
"""


def write_tiny_wan_vae(path, comfy=COMFY, python=None):
    """A random Wan 2.1 VAE (ComfyUI's own class, which fixes its size: about 150 MB in fp16) that core Load VAE
    recognises, written by ComfyUI's Python."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([python or os.environ.get("STREAMVSR_COMFYUI_PYTHON", sys.executable), "-c", WAN_VAE_SCRIPT,
                    str(path)], cwd=comfy, check=True)
    return path


def prepare_base(base, comfy=COMFY, python=None):
    """A ComfyUI --base-directory with this pack linked in, tiny checkpoints where the workflows expect the real
    ones, and input videos: input.mp4 (4 frames) and long.mp4 (LONG_FRAMES frames), both 32x24 with audio."""
    from flashvsr_helpers import write_official_folder
    from helpers import make_tiny_checkpoint, make_tiny_raft
    from test_video import make_clip

    base = pathlib.Path(base)
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "ComfyUI-StreamVSR"
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    make_tiny_checkpoint(base / "models" / "streamvsr" / "Stream-DiffVSR")
    (base / "models" / "streamvsr" / "raft").mkdir(parents=True, exist_ok=True)
    make_tiny_raft(base / "models" / "streamvsr" / "raft" / "raft_large_C_T_SKHT_V2-ff5fadd5.pth", small=False)
    write_official_folder(base / "models" / "flashvsr" / "FlashVSR-v1.1", seed=3)
    write_tiny_wan_vae(base / "models" / "vae" / "wan_2.1_vae.safetensors", comfy, python)
    (base / "input").mkdir(exist_ok=True)
    make_clip(base / "input" / "input.mp4", n=4, w=32, h=24)
    make_clip(base / "input" / "long.mp4", n=LONG_FRAMES, w=32, h=24)
    return base


def _started(proc, url: str, log: pathlib.Path, last: bool) -> bool:
    """Whether ComfyUI ``proc`` answers at ``url`` within 180 s; False where it exited because its port was taken
    meanwhile (and ``last`` is False); otherwise a failure, with the end of its log."""
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            said = log.read_text()
            if not last and "address already in use" in said.lower():
                return False
            raise AssertionError(f"ComfyUI exited:\n{said[-4000:]}")
        try:
            _get(url, "/system_stats")
            return True
        except OSError:
            time.sleep(1)
    proc.kill()
    raise AssertionError("ComfyUI did not start within 180 s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("diffusers")
    base = prepare_base(tmp_path_factory.mktemp("comfy_base"))

    python = os.environ.get("STREAMVSR_COMFYUI_PYTHON", sys.executable)
    log = open(base / "server.log", "w")
    for attempt in range(3):
        # a free port, as the system gives one; another program may take it before ComfyUI binds it: then again
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log.seek(0)
        log.truncate()
        proc = subprocess.Popen([python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                 "--base-directory", str(base), "--disable-auto-launch"],
                                cwd=COMFY, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        if _started(proc, url, base / "server.log", last=attempt == 2):
            break
    yield url, base
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def to_api(workflow, object_info, overrides=None):
    """UI-format workflow -> API prompt, using /object_info for the order of widget values."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        info = object_info.get(node["type"])
        if info is None:
            assert node["type"] in VIRTUAL, f"missing node type {node['type']}"
            continue
        if node.get("mode", 0) in (2, 4):  # muted or bypassed
            continue
        order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
        spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        linked = {i["name"]: [str(links[i["link"]][1]), links[i["link"]][2]]
                  for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs = {}
        for name in order:
            kind = spec[name][0]
            options = spec[name][1] if len(spec[name]) > 1 else {}
            if (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput"):
                value = values.pop(0) if values else None
                if name not in linked and value is not None:
                    inputs[name] = value
                if options.get("control_after_generate") or (kind == "INT" and name in ("seed", "noise_seed")
                                                              and options.get("control_after_generate") is None):
                    values.pop(0)  # the frontend's "control after generate" value
                elif options.get("video_upload") or options.get("image_upload"):
                    values.pop(0) if values and values[0] in ("image", "video") else None
            if name in linked:
                inputs[name] = linked[name]
        inputs.update((overrides or {}).get(node["id"], {}))
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def queue_prompt(url, prompt, timeout=600) -> dict:
    """Queues ``prompt`` and waits for it to end: its history entry (its outputs and status)."""
    prompt_id = _post(url, "/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = _get(url, f"/history/{prompt_id}")
        status = history.get(prompt_id, {}).get("status", {})
        if status.get("completed") or status.get("status_str") == "error":
            return history[prompt_id]
        time.sleep(0.5)
    raise AssertionError("prompt did not finish in time")


def run_prompt(url, prompt, timeout=600):
    status = (entry := queue_prompt(url, prompt, timeout))["status"]
    errors = [f"{m.get('node_type')}: {m.get('exception_type')}: {m.get('exception_message')}\n"
              + "".join(m.get("traceback", []))[-2000:]
              for kind, m in status.get("messages", []) if kind == "execution_error"]
    assert status.get("status_str") == "success", "\n".join(errors) or status
    return entry["outputs"]


def load_workflow(name):
    return json.loads((ROOT / "workflows" / name).read_text())


def _in_browser(server, use):
    """``await use(page)`` in the real frontend (Chromium + playwright, skipped without them): its result, and the
    page errors after the frontend has loaded (a settings handler of 1.27.10 raises one while it loads)."""
    playwright = pytest.importorskip("playwright.async_api", reason="needs playwright (and /usr/bin/chromium)")
    chromium = os.environ.get("STREAMVSR_CHROMIUM", "/usr/bin/chromium")
    if not os.path.exists(chromium):
        pytest.skip(f"no Chromium at {chromium} (set STREAMVSR_CHROMIUM)")
    import asyncio

    from frontend_check import _open

    async def run():
        async with playwright.async_playwright() as p:
            browser, page, errors = await _open(p, server[0], chromium)
            errors.clear()
            try:
                return await use(page), errors
            finally:
                await browser.close()

    return asyncio.run(run())


def test_a_new_chunk_node_increments_in_the_frontend(server):
    """A Load Video Chunk node added by hand advances chunk by chunk (the frontend's own default for such a widget
    is "randomize"), and a workflow that saved another setting keeps it."""
    from frontend_check import CHUNK_CONTROL_JS

    control, errors = _in_browser(server, lambda page: page.evaluate(CHUNK_CONTROL_JS))
    assert control == {"added": "increment", "reloaded": "fixed"} and not errors, (control, errors)


# Queues streamvsr_video_file.json (the upscale node moved into a subgraph of its own when asked) with a seed of its
# own, so that the node runs; the run's ids of the node's previews and of executed nodes.
QUEUE_VIDEO_FILE_JS = """async ([workflow, inSubgraph]) => {
  const api = window.comfyAPI.api.api;
  await app.loadGraphData(workflow);
  const node = app.graph._nodes.find((n) => n.type === "StreamVSRVideoUpscale");
  node.widgets.find((w) => w.name === "seed").value = 1000 + (Date.now() % 100000);
  if (inSubgraph) app.graph.convertToSubgraph(new Set([node]));
  window.seen = { previews: [], executed: [] };
  api.addEventListener("b_preview_with_metadata", ({ detail }) => window.seen.previews.push(detail.displayNodeId));
  api.addEventListener("executed", ({ detail }) => window.seen.executed.push(detail.display_node ?? detail.node));
  await app.queuePrompt(0, 1);
}"""
# After the run: the previews the frontend still keeps, and what each node on the way to the upscale node draws
# (the subgraph is opened first, as a person would to see the node inside it).
SHOWN_JS = """async () => {
  const outer = app.graph._nodes.find((n) => n.subgraph);
  if (outer) app.canvas.openSubgraph(outer.subgraph);
  await new Promise((done) => setTimeout(done, 1000));
  const drawn = (n) => ({ type: n.type, images: n.imgs?.length ?? 0, widgets: (n.widgets ?? []).map((w) => w.name) });
  const inner = outer?.subgraph._nodes.find((n) => n.type === "StreamVSRVideoUpscale");
  const node = inner ?? app.graph._nodes.find((n) => n.type === "StreamVSRVideoUpscale");
  return { kept: Object.keys(app.nodePreviewImages), node: drawn(node), outer: outer ? drawn(outer) : null };
}"""


@pytest.mark.parametrize("in_subgraph", [False, True], ids=["root", "subgraph"])
def test_the_finished_video_replaces_the_progress_preview(server, in_subgraph):
    """Stream Upscale Video File sends frames as progress previews; once it has run, the node shows its video, not
    the last preview frame, on its own and inside a subgraph (whose node showed the frame too)."""
    workflow = load_workflow("streamvsr_video_file.json")

    async def use(page):
        await page.evaluate(QUEUE_VIDEO_FILE_JS, [workflow, in_subgraph])
        await page.wait_for_function("window.seen.executed.length > 0", timeout=600_000, polling=500)
        seen = await page.evaluate("window.seen")
        return seen, await page.evaluate(SHOWN_JS)

    (seen, shown), errors = _in_browser(server, use)
    node_id = seen["executed"][0]
    assert (":" in node_id) == in_subgraph and seen["previews"] and set(seen["previews"]) == {node_id}, seen
    assert shown["kept"] == [], shown
    assert shown["node"]["images"] == 0 and shown["node"]["widgets"][-1] == "video-preview", shown
    if in_subgraph:
        assert shown["outer"] == {**shown["outer"], "images": 0, "widgets": []}, shown
    assert not errors, errors


def test_object_info_lists_every_node(server):
    url, _ = server
    info = _get(url, "/object_info")
    assert NODES <= info.keys()
    for name in NODES:
        assert info[name]["input"]["required"], name
        for spec in info[name]["input"]["required"].values():
            assert spec[1].get("tooltip")
    assert "Stream-DiffVSR" in info["StreamVSRLoadModel"]["input"]["required"]["model"][1]["options"]


def _node_id(workflow, node_type):
    return next(n["id"] for n in workflow["nodes"] if n["type"] == node_type)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "workflows").glob("*.json")))
def test_workflow_runs(server, name):
    """Every workflow as shipped (input.mp4: 4 frames of 32x24 with audio); videos keep frame count, rate, audio."""
    import av

    url, base = server
    info = _get(url, "/object_info")
    outputs = run_prompt(url, to_api(load_workflow(name), info))
    files = [f for out in outputs.values() for key in ("images", "gifs", "videos") for f in out.get(key, [])]
    assert files, f"{name} produced no output"
    for f in files:
        path = base / "output" / f.get("subfolder", "") / f["filename"]
        assert path.exists()
        if path.suffix == ".mp4":
            with av.open(str(path)) as c:
                stream = c.streams.video[0]
                frames = sum(1 for _ in c.decode(stream))
                assert (frames, stream.codec_context.width, stream.codec_context.height) == (4, 128, 96), name
                assert stream.average_rate == 24 and len(c.streams.audio) == 1, name


def _saved_frames(base, outputs):
    from PIL import Image

    files = [f for out in outputs.values() for f in out.get("images", [])]
    return [np.asarray(Image.open(base / "output" / f["subfolder"] / f["filename"])) for f in files]


def test_a_chunk_queued_again_unchanged_is_served_from_the_cache(server):
    """While a node walks through a video chunk by chunk, its runs after the first continuation move no cache
    version on: the same chunk queued again runs no node and saves no frame twice (it used to upscale the chunk
    again and save its frames a second time, and so did every other upscale node of the workflow)."""
    url, base = server
    info = _get(url, "/object_info")
    workflow = load_workflow("streamvsr_long_video_chunks.json")
    video, chunk = _node_id(workflow, "LoadVideo"), _node_id(workflow, "StreamVSRLoadVideoChunk")
    upscale = _node_id(workflow, "StreamVSRUpscale")

    def run(index):
        entry = queue_prompt(url, to_api(workflow, info, {video: {"file": "long.mp4"},
                                                           chunk: {"chunk_index": index, "chunk_frames": 8}}))
        assert entry["status"]["status_str"] == "success", entry["status"]
        return {n for kind, m in entry["status"]["messages"] if kind == "execution_cached" for n in m["nodes"]}

    for index in range(3):
        run(index)
    saved = sorted((base / "output").rglob("*.png"))
    assert str(upscale) in run(2)
    assert sorted((base / "output").rglob("*.png")) == saved


@pytest.mark.parametrize("name", ["streamvsr_long_video_chunks.json", "flashvsr_long_video_chunks.json"])
def test_two_queue_runs_equal_one(server, name):
    """The chunked workflow queued twice (chunk_index 0 then 1, as 'increment' does) equals one run over the whole
    video: the same frames, each once, in order."""
    url, base = server
    info = _get(url, "/object_info")
    workflow = load_workflow(name)
    video, chunk = _node_id(workflow, "LoadVideo"), _node_id(workflow, "StreamVSRLoadVideoChunk")

    def run(index, frames):
        return run_prompt(url, to_api(workflow, info, {video: {"file": "long.mp4"},
                                                        chunk: {"chunk_index": index, "chunk_frames": frames}}))

    first, second = run(0, 26), run(1, 26)
    whole = run(0, 64)
    chunks = [_saved_frames(base, first), _saved_frames(base, second)]
    single = _saved_frames(base, whole)
    if name.startswith("flashvsr"):
        assert [len(c) for c in chunks] == [21, 9]  # the look-ahead frames come out with the last chunk
    else:
        assert [len(c) for c in chunks] == [26, 4]
    assert len(single) == LONG_FRAMES
    for a, b in zip(chunks[0] + chunks[1], single):
        assert a.shape == (96, 128, 3)
        assert np.array_equal(a, b)
    if name.startswith("flashvsr"):
        # chunks smaller than its look-ahead: the runs that hold every frame back succeed and save nothing (an
        # empty batch failed Save Image with "index 0 is out of bounds"), and the frames come out later
        small = [_saved_frames(base, run(index, 10)) for index in range(3)]
        assert [len(c) for c in small] == [0, 0, LONG_FRAMES]
        assert all(np.array_equal(a, b) for a, b in zip(small[2], single))

    def refused(file, index, frames):
        prompt = to_api(workflow, info, {video: {"file": file}, chunk: {"chunk_index": index, "chunk_frames": frames}})
        status = queue_prompt(url, prompt)["status"]
        assert status["status_str"] == "error", status
        return json.dumps(status["messages"])

    # a third run is past the end of the video: refused with a message, nothing saved
    assert "past the end" in refused("long.mp4", 2, 26)
    # the node's sequence is now another video's (as when two workflows of one template are queued in turn): a
    # chunk of long.mp4 does not continue it (start_frame carries the video through ComfyUI's executor)
    run(0, 26)
    run_prompt(url, to_api(workflow, info, {video: {"file": "input.mp4"}, chunk: {"chunk_index": 0,
                                                                                   "chunk_frames": 26}}))
    assert "earlier chunks were of input.mp4" in refused("long.mp4", 1, 26)
