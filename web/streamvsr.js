// ComfyUI-StreamVSR frontend glue (loaded by ComfyUI from WEB_DIRECTORY).
//
// Load Video Chunk's chunk_index asks for a control-after-generate widget, which the frontend starts at
// "randomize" (the server's schema can only say yes or no to that widget in ComfyUI 0.3.64). Random chunks are never
// what that node is for, so a node added by hand starts at "increment"; a saved workflow's value is restored over
// it when the workflow loads.
//
// Stream Upscale Video File sends an upscaled frame as a progress preview now and then while it runs. The frontend
// keeps a node's last progress preview in front of its results, so after the run the node went on showing that
// frame instead of the finished video. When the node's result arrives, its preview is dropped and the video shows.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const RESULT_REPLACES_PREVIEW = new Set(["StreamVSRVideoUpscale"]);
// The frontend's widgets that draw a node's images (ComfyUI frontend 1.27).
const PREVIEW_WIDGETS = ["$$canvas-image-preview", "$$comfy_animation_preview"];

const CHUNK_CONTROL = { node: "StreamVSRLoadVideoChunk", widget: "control_after_generate", value: "increment" };

app.registerExtension({
  name: "StreamVSR.ChunkIndexIncrements",
  nodeCreated(node) {
    if (node.comfyClass !== CHUNK_CONTROL.node) return;
    const control = node.widgets?.find((w) => w.name === CHUNK_CONTROL.widget);
    if (control) control.value = CHUNK_CONTROL.value;
  },
});

// The nodes an execution id names, outermost first, each with the key the frontend files its previews under: "10:5"
// is node 5 inside the subgraph of the root graph's node 10 (key "<that subgraph's id>:5").
function nodesOnPath(executionId) {
  const path = [];
  let graph = app.graph;
  for (const part of String(executionId).split(":")) {
    const node = graph?.getNodeById?.(Number(part));
    if (!node) return [];
    path.push({ node, key: graph.isRootGraph === false ? `${graph.id}:${part}` : part });
    graph = node.subgraph;
  }
  return path;
}

// The preview frames a node drew (as images on the canvas) go; a video widget, where the node has one, shows.
function dropPreviewImages(node) {
  node.imgs = undefined;
  node.imageIndex = null;
  for (let i = (node.widgets?.length ?? 0) - 1; i >= 0; i--) {
    const widget = node.widgets[i];
    if (PREVIEW_WIDGETS.includes(widget.name)) {
      widget.onRemove?.();
      node.widgets.splice(i, 1);
    }
  }
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "StreamVSR.ResultReplacesPreview",
  setup() {
    api.addEventListener("executed", ({ detail }) => {
      const id = detail?.display_node ?? detail?.node;
      if (id === undefined || id === null) return;
      const path = nodesOnPath(id);
      const target = path.at(-1);
      if (!target || !RESULT_REPLACES_PREVIEW.has(target.node.type)) return;
      const urls = new Set(app.nodePreviewImages?.[target.key] ?? []);
      if (!urls.size) return;
      for (const url of urls) URL.revokeObjectURL(url);
      // A preview from inside a subgraph is shown on the subgraph nodes around it too, while it is their latest.
      for (const { node, key } of path) {
        if (!app.nodePreviewImages[key]?.some((url) => urls.has(url))) continue;
        delete app.nodePreviewImages[key];
        dropPreviewImages(node);
      }
    });
  },
});
