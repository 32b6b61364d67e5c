"""Opt-in: the pack inside a real ComfyUI server, driven through its HTTP API.

Set STREAMVSR_COMFYUI=/path/to/ComfyUI (0.3.64 or newer) and, if ComfyUI has its own environment,
STREAMVSR_COMFYUI_PYTHON=/path/to/its/python. The test makes a temporary --base-directory holding this pack
(linked into custom_nodes/), a tiny random checkpoint and RAFT, and a short input video; it then checks
/object_info, executes every workflow in workflows/, and checks that two chunked queue runs equal one run.
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
         "StreamVSREstimateFlow", "StreamVSRFlowToImage"}
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("diffusers")
    from helpers import make_tiny_checkpoint, make_tiny_raft
    from test_video import make_clip

    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "ComfyUI-StreamVSR").symlink_to(ROOT, target_is_directory=True)
    make_tiny_checkpoint(base / "models" / "streamvsr" / "Stream-DiffVSR")
    (base / "models" / "streamvsr" / "raft").mkdir(parents=True)
    make_tiny_raft(base / "models" / "streamvsr" / "raft" / "raft_large_C_T_SKHT_V2-ff5fadd5.pth", small=False)
    (base / "input").mkdir()
    make_clip(base / "input" / "input.mp4", n=4, w=32, h=24)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    python = os.environ.get("STREAMVSR_COMFYUI_PYTHON", sys.executable)
    log = open(base / "server.log", "w")
    proc = subprocess.Popen([python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--base-directory", str(base), "--disable-auto-launch"],
                            cwd=COMFY, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"ComfyUI exited:\n{(base / 'server.log').read_text()[-4000:]}")
        try:
            _get(url, "/system_stats")
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        raise AssertionError("ComfyUI did not start within 180 s")
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
            assert node["type"] in ("Note", "MarkdownNote"), f"missing node type {node['type']}"
            continue
        order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
        spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        linked = {i["name"]: [str(links[i["link"]][1]), links[i["link"]][2]]
                  for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs = {}
        for name in order:
            kind = spec[name][0]
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                value = values.pop(0) if values else None
                if name not in linked and value is not None:
                    inputs[name] = value
            if name in linked:
                inputs[name] = linked[name]
        inputs.update((overrides or {}).get(node["id"], {}))
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def run_prompt(url, prompt, timeout=600):
    prompt_id = _post(url, "/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = _get(url, f"/history/{prompt_id}")
        if prompt_id in history:
            entry = history[prompt_id]
            status = entry.get("status", {})
            if status.get("completed") or status.get("status_str") == "error":
                assert status.get("status_str") == "success", json.dumps(status.get("messages"), indent=1)[-3000:]
                return entry["outputs"]
        time.sleep(0.5)
    raise AssertionError("prompt did not finish in time")


def load_workflow(name):
    return json.loads((ROOT / "workflows" / name).read_text())


def test_object_info_lists_every_node(server):
    url, _ = server
    info = _get(url, "/object_info")
    assert NODES <= info.keys()
    for name in NODES:
        assert info[name]["input"]["required"], name
        for spec in info[name]["input"]["required"].values():
            assert spec[1].get("tooltip")
    assert "Stream-DiffVSR" in info["StreamVSRLoadModel"]["input"]["required"]["model"][1]["options"]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "workflows").glob("*.json")))
def test_workflow_runs(server, name):
    url, base = server
    info = _get(url, "/object_info")
    overrides = {}
    if name == "streamvsr_long_video_chunks.json":
        overrides = {5: {"batch_index": 0, "length": 2}}
    outputs = run_prompt(url, to_api(load_workflow(name), info, overrides))
    files = [f for out in outputs.values() for key in ("images", "gifs", "videos") for f in out.get(key, [])]
    assert files, f"{name} produced no output"
    for f in files:
        assert (base / "output" / f.get("subfolder", "") / f["filename"]).exists()


def _saved_frames(base, outputs):
    from PIL import Image

    files = [f for out in outputs.values() for f in out.get("images", [])]
    return [np.asarray(Image.open(base / "output" / f["subfolder"] / f["filename"])) for f in files]


def test_two_queue_runs_equal_one(server):
    url, base = server
    info = _get(url, "/object_info")
    workflow = load_workflow("streamvsr_long_video_chunks.json")
    # node 5: Image From Batch, node 6: Stream Upscale (continue_sequence is its third widget)
    first = run_prompt(url, to_api(workflow, info, {5: {"batch_index": 0, "length": 2},
                                                    6: {"continue_sequence": False}}))
    second = run_prompt(url, to_api(workflow, info, {5: {"batch_index": 2, "length": 2},
                                                     6: {"continue_sequence": True}}))
    whole = run_prompt(url, to_api(workflow, info, {5: {"batch_index": 0, "length": 4},
                                                    6: {"continue_sequence": False}}))
    chunks = _saved_frames(base, first) + _saved_frames(base, second)
    single = _saved_frames(base, whole)
    assert len(chunks) == len(single) == 4
    for a, b in zip(chunks, single):
        assert a.shape == (96, 128, 3)
        assert np.array_equal(a, b)
