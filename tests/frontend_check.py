"""Build the workflows in workflows/ with the real ComfyUI frontend, and check each one there as a person would.

Not a test (needs a running ComfyUI, Chromium and playwright); run by hand after changing a node's inputs or a
workflow:

    python main.py --cpu --listen 127.0.0.1 --port 8199 --base-directory BASE   # BASE from
        # test_comfyui_server.prepare_base: this pack linked in, tiny checkpoints, input.mp4 and long.mp4
    python tests/frontend_check.py build  --url http://127.0.0.1:8199     # rewrite workflows/*.json
    python tests/frontend_check.py check  --url http://127.0.0.1:8199 --shots SHOTS_DIR [--queue N]

``build`` creates every node of each spec below in the frontend (so sizes, widget values, widget inputs and link
records are the frontend's own), lays the nodes out in columns without overlaps and saves ``app.graph.serialize()``.
``check`` drags each workflow in (``app.loadGraphData``), fails on node types the frontend does not know, queues it
(``--queue`` times, as the Queue button with a batch count does: control-after-generate widgets advance between
runs), waits for the server, and takes a screenshot before and after (PNG files in --shots).
Chromium: Debian's /usr/bin/chromium (``--chromium`` to change), no browser download.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"

SD_MODEL = {"key": "model", "type": "StreamVSRLoadModel", "col": 0,
            "widgets": {"model": "Stream-DiffVSR", "precision": "auto"}}
RAFT = {"key": "flow", "type": "StreamVSRLoadFlowModel", "col": 0,
        "widgets": {"model": "raft_large_C_T_SKHT_V2-ff5fadd5.pth"}}
FLASH = {"key": "model", "type": "StreamVSRLoadFlashVSR", "col": 0,
         "widgets": {"model": "FlashVSR-v1.1", "version": "v1.1", "precision": "auto", "attention": "auto"}}
VIDEO = {"key": "video", "type": "LoadVideo", "col": 1, "widgets": {"file": "input.mp4"}, "size": [320, 420]}
CHUNKS = {"key": "chunk", "type": "StreamVSRLoadVideoChunk", "col": 2,
          "widgets": {"chunk_index": 0, "control_after_generate": "increment", "chunk_frames": 64}}


def note(text, col=0, width=420, height=None):
    return {"key": "note", "type": "Note", "col": col, "widgets": {"text": text}, "size": [width, height or 150],
            "first": True}


SPECS = {
    "streamvsr_video_upscale.json": {
        "nodes": [note("Video file -> Stream Upscale (Stream-DiffVSR) -> video file with the core video nodes; frame "
                       "rate and audio come from the source. Put the official Stream-DiffVSR folder in "
                       "models/streamvsr/Stream-DiffVSR (or pick '(download) ...') and RAFT-large in "
                       "models/streamvsr/raft. Load Video decodes the whole clip into memory: for long videos use "
                       "streamvsr_video_file.json or streamvsr_long_video_chunks.json."),
                  SD_MODEL, RAFT, VIDEO,
                  {"key": "parts", "type": "GetVideoComponents", "col": 2},
                  {"key": "up", "type": "StreamVSRUpscale", "col": 3, "widgets": {"seed": 42, "steps": 4}},
                  {"key": "create", "type": "CreateVideo", "col": 4},
                  {"key": "save", "type": "SaveVideo", "col": 5, "widgets": {"filename_prefix": "streamvsr/upscaled"},
                   "size": [360, 420]}],
        "links": [("model", "model", "up", "model"), ("flow", "flow_model", "up", "flow_model"),
                  ("video", "VIDEO", "parts", "video"), ("parts", "images", "up", "images"),
                  ("up", "images", "create", "images"), ("parts", "audio", "create", "audio"),
                  ("parts", "fps", "create", "fps"), ("create", "VIDEO", "save", "video")],
    },
    "streamvsr_video_file.json": {
        "nodes": [note("Streams the video file frame by frame into output/streamvsr/: memory does not grow with the "
                       "length of the video. Audio, frame rate and timestamps are kept. Set scene_cut_threshold "
                       "to about 0.3 for footage with hard cuts; turn resume on for very long videos."),
                  SD_MODEL, RAFT, VIDEO,
                  {"key": "up", "type": "StreamVSRVideoUpscale", "col": 2, "size": [360, 520],
                   "widgets": {"seed": 42, "steps": 4, "filename_prefix": "streamvsr/upscaled"}}],
        "links": [("model", "model", "up", "model"), ("flow", "flow_model", "up", "flow_model"),
                  ("video", "VIDEO", "up", "video")],
    },
    "streamvsr_long_video_chunks.json": {
        "nodes": [note("Long video in chunks (Stream-DiffVSR): Load Video Chunk loads chunk_frames frames per queue "
                       "run and its chunk_index increments by itself. Queue the workflow as many times as the "
                       "chunk node reports chunks (Queue with a batch count does it in one go); start_frame "
                       "makes each run continue the previous one exactly, as if the video were upscaled in one "
                       "go. Frames are saved as one numbered PNG sequence in output/streamvsr/chunks/. To start "
                       "again, set chunk_index to 0.", height=190),
                  SD_MODEL, RAFT, VIDEO, CHUNKS,
                  {"key": "up", "type": "StreamVSRUpscale", "col": 3, "widgets": {"seed": 42, "steps": 4}},
                  {"key": "save", "type": "SaveImage", "col": 4,
                   "widgets": {"filename_prefix": "streamvsr/chunks/frame"},
                   "size": [360, 420]}],
        "links": [("model", "model", "up", "model"), ("flow", "flow_model", "up", "flow_model"),
                  ("video", "VIDEO", "chunk", "video"), ("chunk", "images", "up", "images"),
                  ("chunk", "start_frame", "up", "start_frame"), ("up", "images", "save", "images")],
    },
    "streamvsr_optical_flow.json": {
        "nodes": [note("Optical flow of consecutive frames (RAFT), shown as colours: hue is the direction, "
                       "saturation the magnitude."),
                  RAFT, VIDEO,
                  {"key": "parts", "type": "GetVideoComponents", "col": 2},
                  {"key": "flow_est", "type": "StreamVSREstimateFlow", "col": 3},
                  {"key": "vis", "type": "StreamVSRFlowToImage", "col": 4},
                  {"key": "save", "type": "SaveImage", "col": 5, "widgets": {"filename_prefix": "streamvsr/flow"},
                   "size": [360, 420]}],
        "links": [("flow", "flow_model", "flow_est", "flow_model"), ("video", "VIDEO", "parts", "video"),
                  ("parts", "images", "flow_est", "images"), ("flow_est", "flow", "vis", "flow"),
                  ("vis", "image", "save", "images")],
    },
    "flashvsr_video_file.json": {
        "nodes": [note("FlashVSR, video file to video file: streamed chunk by chunk into output/flashvsr/, so memory "
                       "does not grow with the length of the video; audio, frame rate and timestamps are kept. "
                       "Put the official FlashVSR-v1.1 folder (DiT, LQ_proj_in.ckpt, TCDecoder.ckpt, "
                       "posi_prompt.pth) in models/flashvsr/, or pick '(download) ...'. FlashVSR Settings trades "
                       "speed and memory for quality (see the tooltips); without it the official defaults apply.",
                       height=190),
                  FLASH,
                  {"key": "settings", "type": "StreamVSRFlashVSRSettings", "col": 0},
                  VIDEO,
                  {"key": "up", "type": "StreamVSRVideoUpscale", "col": 2, "size": [360, 520],
                   "widgets": {"seed": 42, "filename_prefix": "flashvsr/upscaled"}}],
        "links": [("model", "model", "up", "model"), ("settings", "flashvsr_settings", "up", "flashvsr_settings"),
                  ("video", "VIDEO", "up", "video")],
    },
    "flashvsr_long_video_chunks.json": {
        "nodes": [note("Long video in chunks (FlashVSR): each queue run loads the next chunk (chunk_index "
                       "increments by itself); queue as many runs as Load Video Chunk reports chunks, e.g. with "
                       "the Queue button's batch count. start_frame and last_chunk link the runs into one "
                       "sequence: FlashVSR holds the last few frames of a chunk back for look-ahead and returns "
                       "them with the next run, so frame counts per run vary but every frame is saved once, in "
                       "order, in output/flashvsr/chunks/, exactly as one run over the whole video. To start "
                       "again, set chunk_index to 0.", height=210),
                  FLASH, VIDEO, CHUNKS,
                  {"key": "up", "type": "StreamVSRFlashVSRUpscale", "col": 3, "widgets": {"seed": 42}},
                  {"key": "save", "type": "SaveImage", "col": 4,
                   "widgets": {"filename_prefix": "flashvsr/chunks/frame"},
                   "size": [360, 420]}],
        "links": [("model", "model", "up", "model"), ("video", "VIDEO", "chunk", "video"),
                  ("chunk", "images", "up", "images"), ("chunk", "start_frame", "up", "start_frame"),
                  ("chunk", "last_chunk", "up", "last_chunk"), ("up", "images", "save", "images")],
    },
    "flashvsr_wan_vae_decode.json": {
        "nodes": [note("FlashVSR with the full Wan 2.1 VAE decoder instead of its fast TC decoder: FlashVSR "
                       "Upscale's latent goes through the core Load VAE + VAE Decode (Wan 2.1 VAE, e.g. "
                       "wan_2.1_vae.safetensors in models/vae), then Trim Wan VAE Decode cuts the padding off. "
                       "Slower and needs more memory than the TC decoder; for a clip upscaled in one run (whole "
                       "clip in memory).", height=190),
                  FLASH,
                  {"key": "vae", "type": "VAELoader", "col": 0, "widgets": {"vae_name": "wan_2.1_vae.safetensors"}},
                  VIDEO,
                  {"key": "parts", "type": "GetVideoComponents", "col": 2},
                  {"key": "up", "type": "StreamVSRFlashVSRUpscale", "col": 3, "widgets": {"seed": 42}},
                  {"key": "decode", "type": "VAEDecode", "col": 4},
                  {"key": "trim", "type": "StreamVSRFlashVSRTrimDecoded", "col": 4, "size": [300, 80]},
                  {"key": "create", "type": "CreateVideo", "col": 5},
                  {"key": "save", "type": "SaveVideo", "col": 6, "widgets": {"filename_prefix": "flashvsr/wan_vae"},
                   "size": [360, 420]}],
        "links": [("model", "model", "up", "model"), ("video", "VIDEO", "parts", "video"),
                  ("parts", "images", "up", "images"), ("up", "latent", "decode", "samples"),
                  ("vae", "VAE", "decode", "vae"), ("decode", "IMAGE", "trim", "images"),
                  ("up", "latent", "trim", "latent"), ("trim", "images", "create", "images"),
                  ("parts", "audio", "create", "audio"), ("parts", "fps", "create", "fps"),
                  ("create", "VIDEO", "save", "video")],
    },
}

BUILD_JS = """(spec) => {
  app.graph.clear();
  const nodes = {};
  for (const n of spec.nodes) {
    const node = LiteGraph.createNode(n.type);
    if (!node) throw new Error('unknown node type ' + n.type);
    app.graph.add(node);
    for (const [name, value] of Object.entries(n.widgets || {})) {
      const w = (node.widgets || []).find(w => w.name === name);
      if (!w) throw new Error(n.type + ' has no widget ' + name);
      w.value = value;
    }
    if (n.size) node.size = [Math.max(node.size[0], n.size[0]), Math.max(node.size[1], n.size[1])];
    nodes[n.key] = node;
  }
  for (const [src, out, dst, inp] of spec.links) {
    const s = nodes[src], d = nodes[dst];
    const o = s.outputs.findIndex(x => x.name === out), i = d.inputs.findIndex(x => x.name === inp);
    if (o < 0 || i < 0) throw new Error('no slot ' + src + '.' + out + ' -> ' + dst + '.' + inp);
    if (!s.connect(o, d, i)) throw new Error('link refused ' + src + '.' + out + ' -> ' + dst + '.' + inp);
  }
  // columns left to right, nodes top to bottom in spec order; notes span the top of their column
  const TITLE = LiteGraph.NODE_TITLE_HEIGHT, GAP = 40;
  let x = 40;
  const cols = [...new Set(spec.nodes.map(n => n.col))].sort((a, b) => a - b);
  for (const c of cols) {
    let y = 40 + TITLE, width = 0;
    for (const n of spec.nodes.filter(n => n.col === c)) {
      const node = nodes[n.key];
      node.pos = [x, y];
      y += node.size[1] + TITLE + GAP;
      width = Math.max(width, node.size[0]);
    }
    x += width + GAP;
  }
  app.graph.setDirtyCanvas(true, true);
  return JSON.stringify(app.graph.serialize());  // as the frontend saves it: no undefined-turned-null fields
}"""

MISSING_JS = """() => app.graph._nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type)"""
# Load Video Chunk's control-after-generate setting: on a node added by hand (web/streamvsr.js sets "increment"),
# and after loading a workflow that saved another value (the saved one must win).
CHUNK_CONTROL_JS = """async () => {
  const control = (node) => node?.widgets?.find((w) => w.name === "control_after_generate")?.value ?? null;
  const fresh = LiteGraph.createNode("StreamVSRLoadVideoChunk");
  app.graph.add(fresh);
  const added = control(fresh);
  const saved = app.graph.serialize();
  const mine = saved.nodes.find((n) => n.id === fresh.id);
  mine.widgets_values[1] = "fixed";
  await app.loadGraphData(saved);
  const reloaded = control(app.graph.getNodeById(fresh.id));
  app.graph.clear();
  return { added, reloaded };
}"""


def _get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


async def _open(p, url, chromium):
    browser = await p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
    page = await browser.new_page(viewport={"width": 1920, "height": 1080})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(url, wait_until="networkidle")
    await page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=120000)
    return browser, page, errors


async def build(url, chromium, names=None):
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser, page, _ = await _open(p, url, chromium)
        for name, spec in SPECS.items():
            if names and name not in names:
                continue
            workflow = json.loads(await page.evaluate(BUILD_JS, spec))
            workflow.pop("id", None)
            (WORKFLOWS / name).write_text(json.dumps(workflow, indent=1) + "\n")
            print("wrote", WORKFLOWS / name)
        await browser.close()


async def _wait_idle(url, timeout=900):
    deadline = time.time() + timeout
    await asyncio.sleep(1.0)
    while time.time() < deadline:
        q = _get(url + "/queue")
        if not q["queue_running"] and not q["queue_pending"]:
            return
        await asyncio.sleep(1.0)
    raise TimeoutError("the queue did not empty")


async def check(url, chromium, shots, queue=1, names=None, files=None, chunk_frames=None):
    from playwright.async_api import async_playwright

    shots = pathlib.Path(shots)
    shots.mkdir(parents=True, exist_ok=True)
    results = {}
    async with async_playwright() as p:
        browser, page, errors = await _open(p, url, chromium)
        errors.clear()  # the frontend's own, while it loads (a settings handler of 1.27.10 raises one)
        chunk_control = await page.evaluate(CHUNK_CONTROL_JS)
        print("Load Video Chunk's control after generate:", chunk_control, flush=True)
        results["chunk control"] = {"missing": [], "runs": [], "page_errors": list(errors),
                                    "wrong": chunk_control != {"added": "increment", "reloaded": "fixed"}}
        errors.clear()
        for path in sorted(WORKFLOWS.glob("*.json")):
            if names and path.name not in names:
                continue
            workflow = json.loads(path.read_text())
            for node in workflow["nodes"]:  # e.g. a longer input video and short chunks for chunked workflows
                if files and node["type"] == "LoadVideo":
                    node["widgets_values"][0] = files.get(path.name, node["widgets_values"][0])
                if chunk_frames and node["type"] == "StreamVSRLoadVideoChunk":
                    node["widgets_values"][2] = chunk_frames
            before = len(_get(url + "/history"))
            await page.evaluate("(w) => app.loadGraphData(w)", workflow)
            await page.wait_for_timeout(1500)
            missing = await page.evaluate(MISSING_JS)
            await page.evaluate("() => app.canvas.ds && (app.canvas.ds.offset = [0, 0], app.canvas.ds.scale = 0.8, "
                                "app.canvas.setDirty(true, true))")
            await page.wait_for_timeout(500)
            stem = path.stem
            await page.screenshot(path=str(shots / f"{stem}_loaded.png"))
            # as the Run button with a batch count: control-after-generate widgets advance between the runs
            await page.evaluate("(n) => app.queuePrompt(0, n)", queue)
            await _wait_idle(url)
            await page.wait_for_timeout(2500)
            await page.screenshot(path=str(shots / f"{stem}_done.png"))
            history = _get(url + "/history")
            new = list(history.values())[before:]
            statuses = [h["status"]["status_str"] for h in new]
            results[path.name] = {"missing": missing, "runs": statuses, "page_errors": list(errors)}
            errors.clear()
            print(path.name, results[path.name], flush=True)
            if any(s != "success" for s in statuses):
                for h in new:
                    for kind, payload in h["status"].get("messages", []):
                        if kind == "execution_error":
                            print("  ", payload.get("node_type"), payload.get("exception_message"))
        await browser.close()
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["build", "check"])
    ap.add_argument("--url", default="http://127.0.0.1:8199")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--shots", default="frontend_shots")
    ap.add_argument("--queue", type=int, default=1, help="queue each workflow this many times (batch count)")
    ap.add_argument("--chunk-frames", type=int, help="override Load Video Chunk's chunk_frames")
    ap.add_argument("--only", nargs="*", help="workflow file names")
    ap.add_argument("--video", action="append", default=[], metavar="WORKFLOW=FILE",
                    help="use this input file in a workflow's Load Video (e.g. long.mp4 for the chunked ones)")
    args = ap.parse_args()
    files = dict(v.split("=", 1) for v in args.video)
    if args.what == "build":
        asyncio.run(build(args.url, args.chromium, args.only))
    else:
        results = asyncio.run(check(args.url, args.chromium, args.shots, args.queue, args.only, files,
                                    args.chunk_frames))
        bad = {k: v for k, v in results.items()
               if v["missing"] or v.get("wrong") or any(s != "success" for s in v["runs"])}
        raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
