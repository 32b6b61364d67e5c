"""FlashVSR nodes: load the model, upscale an IMAGE batch as one stream (continuing across queue runs), settings for
the video-file node, and trimming a Wan 2.1 VAE decode of FlashVSR's latents to the upscaled frames.

Chunk boundaries: FlashVSR finishes frames in bursts (21, then 8 at a time) and needs up to 4 frames of look-ahead,
so within a run it holds back the last few frames. ``last_chunk`` (on by default) finishes them: one run returns
exactly as many frames as it got. With ``last_chunk`` off (more chunks of the same video follow), the frames held
back stay in the sequence's state and come out at the start of the next run: every run returns the frames that are
final so far, and the runs of a video together return each frame exactly once, equal to one run over the whole
video.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import folder_paths
import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.utils
from comfy_execution.graph_utils import ExecutionBlocker

from ..models.flashvsr import DEFAULT_VERSION, load_pipeline
from ..models.flashvsr.attention import choose_attention
from ..models.flashvsr.color import color_fix
from ..models.flashvsr.engine import FlashVSREngine, FlashVSRState, held_back
from ..models.flashvsr.frames import condition_video, quantize_8bit
from ..models.flashvsr.weights import DIT_FILES, FOLDER_V1, FOLDER_V11, LQ_FILES, PROMPT_FILES, TC_FILES, find_files
from ..models.shared.errors import UserInputError
from .common import (CATEGORY, FLASHVSR_FOLDER, FlashVSRModelType, FlashVSRSettingsType, StreamStateType, as_rgb,
                     check_family, continuation_inputs, download_progress, find_in_model_folders, listed_models,
                     load_flow_patcher, memory_before, operations_for, out_of_memory_advice, params_in, pick_precision,
                     show_text, tensor_to_preview, wrap)
from .streams import StoredStream, StreamStore, batch_origin, chunk_video, redo_state

log = logging.getLogger(__name__)

DOWNLOAD = "(download) FlashVSR, the version below"
VERSIONS = ["auto", "v1.1", "v1"]
COLOR_FIXES = ["adain", "wavelet", "none"]
DEFAULT_SETTINGS = {"scale": 4, "sparse_ratio": 2.0, "local_range": 11, "kv_ratio": 3.0, "color_fix": "adain"}
FRAMES_PER_PUSH = 8  # one DiT chunk's worth: each push runs at most one chunk (interrupt and progress per chunk)
COLOR_FIX_BATCH = 8  # frames colour-corrected at a time after a Wan VAE decode (each needs its full-size reference)

# Sequences carried across queue runs (see streams.py), one per FlashVSR Upscale node.
STREAMS = StreamStore("FlashVSR Upscale", FlashVSRState, pending=held_back,
                      settings="model, precision, seed or FlashVSR settings")

# Tooltips shared by the upscale node and the settings node.
TIPS = {
    "scale": "Output size / input size. The model is trained for 4; 2 or 3 are faster but softer.",
    "sparse_ratio": "Attention budget: about sparse_ratio x 60 key blocks per query block. 2.0 is the official "
                    "setting; 1.5 is faster and a little less stable; more costs time and memory.",
    "local_range": "Side of the window of neighbouring blocks (of 128x128 output pixels) each block may attend "
                   "to. 11 (official) is more stable, 9 sharper; larger costs time.",
    "kv_ratio": "Attention memory in latent slices of 8 frames (whole numbers count). 3 (official) attends to the "
                "last 32 frames; 1 or 2 keep two slices: about a third less attention memory, less temporal "
                "context; more: more memory, more context.",
    "color_fix": "Colour correction of each output frame towards its input: adain (official) matches colour "
                 "statistics; wavelet keeps the input's low frequencies; none is the raw output.",
}


def settings_inputs() -> list:
    """The quality/speed inputs of the upscale node and the settings node, with the official defaults."""
    return [
        io.Int.Input("scale", default=4, min=1, max=8, tooltip=TIPS["scale"]),
        io.Float.Input("sparse_ratio", default=2.0, min=0.5, max=8.0, step=0.1, tooltip=TIPS["sparse_ratio"]),
        io.Int.Input("local_range", default=11, min=1, max=31, step=2, tooltip=TIPS["local_range"]),
        io.Float.Input("kv_ratio", default=3.0, min=1.0, max=8.0, step=1.0, tooltip=TIPS["kv_ratio"]),
        io.Combo.Input("color_fix", options=COLOR_FIXES, default="adain", tooltip=TIPS["color_fix"]),
    ]


@dataclass
class FlashVSRModel:
    """What Load FlashVSR Model hands on (type STREAMVSR_FLASHVSR_MODEL).

    core: ModelPatcher of the DiT and the LQ projection (comfy.ops layers: partial loading works); decoder:
    ModelPatcher of the TC decoder (always loaded whole); pipeline: the same modules as one FlashVSRPipeline for
    the engine. attention: "gather" or "flex"."""

    pipeline: object
    core: object
    decoder: object
    source: str
    compute_dtype: torch.dtype
    attention: str

    @property
    def load_device(self):
        return self.core.load_device


def model_choices() -> list[str]:
    """Folders holding a FlashVSR DiT (official or repackaged), DiT files at the top level, and other single
    .safetensors files (converted with `streamvsr convert`, or a DiT with the LQ projection merged in)."""
    names = listed_models(FLASHVSR_FOLDER, "flashvsr")
    components = set(LQ_FILES) | set(TC_FILES) | {p.split("/")[-1] for p in PROMPT_FILES}
    folders = {"/".join(n.split("/")[:-1]) for n in names if n.split("/")[-1] in DIT_FILES and "/" in n}
    choices = set(folders)
    for name in names:
        parts = name.split("/")
        folder = "/".join(parts[:-1])
        if folder in folders or not name.endswith(".safetensors"):
            continue
        if parts[-1] in components or "vae" in parts[-1].lower():
            continue
        choices.add(name)
    return sorted(choices) + [DOWNLOAD]


def resolve_model_path(choice: str, version: str) -> str:
    if choice == DOWNLOAD:
        from ..models.flashvsr.hub import download_flashvsr

        return str(download_flashvsr(version, folder_paths.get_folder_paths(FLASHVSR_FOLDER)[0], download_progress()))
    # (a name that says v1, as the v1 download's folder "FlashVSR" does, is not what auto or v1.1 would fetch, nor
    # one that says v1.1 what v1 would)
    name = re.split(r"[\\/]", choice.rstrip("/\\"))[-1]
    says = "v1.1" if FOLDER_V11.search(name) else "v1" if FOLDER_V1.search(name) else None
    setting = {("v1", "auto"): " with version v1", ("v1", "v1.1"): " with version v1",
               ("v1.1", "v1"): " with version v1.1 (or auto)"}.get((says, version), "")
    return find_in_model_folders(choice, FLASHVSR_FOLDER, DOWNLOAD, setting)


def settings_from(scale, sparse_ratio, local_range, kv_ratio, color_fix) -> dict:
    return {"scale": int(scale), "sparse_ratio": float(sparse_ratio), "local_range": int(local_range),
            "kv_ratio": float(kv_ratio), "color_fix": str(color_fix)}


def make_engine(model: FlashVSRModel, settings: dict | None, latent_sink=None) -> FlashVSREngine:
    """A FlashVSREngine with ``settings`` (DEFAULT_SETTINGS where missing); nothing is loaded yet."""
    if not isinstance(model, FlashVSRModel):
        raise UserInputError("this input needs a model from Load FlashVSR Model")
    options = {**DEFAULT_SETTINGS, **(settings or {})}
    return FlashVSREngine(model.pipeline, device=model.load_device, compute_dtype=model.compute_dtype,
                          attention=model.attention, latent_sink=latent_sink, **options)


def load_engine(engine: FlashVSREngine, model: FlashVSRModel, lr_size: tuple[int, int]) -> FlashVSREngine:
    """Both patchers loaded for ``engine`` on frames of ``lr_size``: ComfyUI frees room for the weights plus the
    activation and KV-cache estimate, offloading other models as needed. The DiT may be partially loaded
    (--lowvram/--novram); the TC decoder is loaded whole."""
    engine.check_size(*lr_size)
    activations = engine.estimate_memory(*lr_size)
    mm.load_models_gpu([model.core], memory_required=memory_before(activations, model.decoder))
    load_flow_patcher(model.decoder, activations)
    return engine


def oom_message(engine, h: int, w: int) -> str:
    """What to change: for the device ComfyUI runs on, only what the engine does not do already."""
    on_cpu = mm.is_device_cpu(mm.get_torch_device())
    steps = []
    if engine.kv_ratio > 2:
        steps.append(f"kv_ratio 2 instead of {engine.kv_ratio:g} (two latent slices of attention memory)")
    if engine.sparse_ratio > 1.5:
        steps.append(f"sparse_ratio 1.5 instead of {engine.sparse_ratio:g} (fewer key blocks per query)")
    if engine.compute_dtype == torch.float32:
        steps.append("precision bf16 on Load FlashVSR Model (half the weights and activations; fast on CPUs with "
                     "bf16 arithmetic)" if on_cpu else "precision bf16 or fp16 on Load FlashVSR Model (half the "
                     "weights and activations)")
    smaller = "upscale smaller frames or use a smaller scale (memory grows with the output size)"
    steps += [smaller, "close other programs"] if on_cpu else [
        "close other programs using the GPU", "start ComfyUI with --lowvram, then --novram (weights streamed layer "
        "by layer)", smaller, "as a last resort run on the CPU (--cpu, very slow)"]
    return (f"FlashVSR ran out of memory on {w}x{h} frames ({w * engine.scale}x{h * engine.scale} output). Try, in "
            f"this order: {'; '.join(steps)}.")


class StreamVSRLoadFlashVSR(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StreamVSRLoadFlashVSR",
            display_name="Load FlashVSR Model",
            category=CATEGORY,
            description="Loads FlashVSR (the official folder, kijai's or 1038lab's files, or a single file from "
                        "`streamvsr convert`) from models/flashvsr, or downloads the official release there.",
            inputs=[
                io.Combo.Input("model", options=model_choices(),
                               tooltip="A folder in models/flashvsr with the DiT, LQ projection, TC decoder and "
                                       "prompt files, or a single converted .safetensors. '(download) …' fetches "
                                       "the version chosen below (auto: v1.1) from Hugging Face (about 6.4 GB) into "
                                       "models/flashvsr/FlashVSR-v1.1 or models/flashvsr/FlashVSR."),
                io.Combo.Input("version", options=VERSIONS, default="auto",
                               tooltip="Which release the files are: v1 and v1.1 files look alike but need "
                                       "different arithmetic; the wrong choice gives ghosting. auto: what the "
                                       "files say (a repackaged DiT's file name such as kijai's v1 file, the "
                                       "published v1.1 LQ file's hash, a folder named for v1.1 or v1, FlashVSR "
                                       "counting as v1), else v1.1; official files that nothing names with an LQ "
                                       "file other than the published v1.1 one are refused: choose. A known "
                                       "file hash or name that contradicts a choice gives a warning in the log. A "
                                       "converted file uses the version recorded in it."),
                io.Combo.Input("precision", options=["auto", "fp32", "fp16", "bf16"], default="auto",
                               tooltip="Weight and compute precision. auto follows ComfyUI: bf16 on GPUs that "
                                       "support it, else fp16; fp32 on the CPU. A choice is used as made, on the "
                                       "CPU too (bf16 is fast on CPUs with bf16 arithmetic; fp16, hundreds of "
                                       "times slower there, is refused). fp32 needs twice the memory."),
                io.Combo.Input("attention", options=["auto", "gather", "flex"], default="auto",
                               tooltip="How the sparse attention is computed (same result): gather runs "
                                       "PyTorch attention on the selected blocks (any device); flex uses "
                                       "FlexAttention block masks compiled for CUDA (faster on NVIDIA GPUs, the "
                                       "first chunk waits for compilation; needs Triton). auto: flex where it "
                                       "can run, else gather."),
            ],
            outputs=[FlashVSRModelType.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, version, precision, attention="auto") -> io.NodeOutput:
        device = mm.get_torch_device()
        attention = choose_attention(attention, device)  # before a download of GBs
        chosen = None if version == "auto" else version
        path = resolve_model_path(model, chosen or DEFAULT_VERSION)
        check_family(path, "flashvsr")
        files = find_files(path, chosen)
        params = params_in(str(files.dit)) if files.dit.suffix.lower() == ".safetensors" else 0
        weight_dtype, compute_dtype = pick_precision(precision, device, params)
        # Weights go to the offload device; FlashVSR Upscale asks ComfyUI to move them (whole or layer by layer).
        pipe = load_pipeline(path, None if files.single else chosen, device=mm.unet_offload_device(),
                             dtype=weight_dtype, operations=operations_for(weight_dtype, compute_dtype, device))
        if files.single and chosen and pipe.version != chosen:
            log.warning("FlashVSR: %s was converted as %s; using %s (the version widget says %s)", model,
                        pipe.version, pipe.version, version)
        core = torch.nn.ModuleDict({"dit": pipe.dit, "lq_proj": pipe.lq_proj})
        result = FlashVSRModel(pipeline=pipe, core=wrap(core), decoder=wrap(pipe.tc_decoder),
                               source=os.path.realpath(path),  # (as Stream-DiffVSR's: the entry does not matter)
                               compute_dtype=compute_dtype, attention=attention)
        log.info("FlashVSR: loaded %s (%s, weights %s, compute %s, %s attention)", model, pipe.version,
                 weight_dtype, compute_dtype, attention)
        return io.NodeOutput(result)


class StreamVSRFlashVSRUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StreamVSRFlashVSRUpscale",
            display_name="FlashVSR Upscale",
            category=CATEGORY,
            description="Upscales a batch of consecutive video frames with FlashVSR (one frame out per frame in, "
                        "aligned). Long videos can be fed in chunks over several queue runs (continue_sequence "
                        "or a chunk loader's start_frame, and last_chunk): the chunks together give exactly the "
                        "frames of one run. The latent output feeds core VAE Decode with the Wan 2.1 VAE.",
            inputs=[
                FlashVSRModelType.Input("model", tooltip="From Load FlashVSR Model."),
                io.Image.Input("images", tooltip="Consecutive frames of one video, in order (any count >= 1)."),
                *settings_inputs(),
                io.Int.Input("seed", default=42, min=0, max=2**63 - 1, control_after_generate=False,
                             tooltip="Noise seed; latent frame j gets the j-th draw, so chunks continue it."),
                io.Boolean.Input("continue_sequence", default=False, label_on="continue", label_off="restart",
                                 tooltip="continue: these frames follow the frames of this node's last "
                                         "successful run (long videos in chunks); the node then always re-runs. "
                                         "restart: start a new sequence. Another model, setting, seed or frame "
                                         "size is an error while the last run holds frames back (last_chunk "
                                         "off), else restarts by itself and says so in the log."),
                io.Boolean.Input("last_chunk", default=True, label_on="last chunk: finish",
                                 label_off="more chunks follow",
                                 tooltip="On: finish the sequence with these frames, so every frame held back "
                                         "for look-ahead comes out now (a single run returns exactly as many "
                                         "frames as it got). Off: the last few frames (up to 24 before the first "
                                         "21 are done, then 4 to 11) stay in the state and come out at the "
                                         "start of the next chunk's run. No frame is lost or repeated."),
                *continuation_inputs("FlashVSR Upscale"),
            ],
            outputs=[io.Image.Output(display_name="images"),
                     StreamStateType.Output(display_name="state"),
                     io.Latent.Output(display_name="latent",
                                      tooltip="The same frames as Wan 2.1 latents, for the core VAE Decode with "
                                              "the Wan 2.1 VAE (full quality, slower); then Trim Wan VAE Decode. "
                                              "Only a whole clip in one run decodes correctly.")],
            hidden=[io.Hidden.unique_id],
            # Each node carries its own sequence: two alike must not share one cached result (ComfyUI keys the
            # cache by node id only for these; V3's unique_id does not make it do so).
            not_idempotent=True,
        )

    @classmethod
    def fingerprint_inputs(cls, continue_sequence=None, **kwargs):
        # A continuation depends on the previous run, not only on the inputs: never reuse a cached result.
        return STREAMS.fingerprint(continue_sequence)

    @classmethod
    def execute(cls, model, images, scale, sparse_ratio, local_range, kv_ratio, color_fix, seed, continue_sequence,
                last_chunk, state=None, start_frame=None) -> io.NodeOutput:
        frames = as_rgb(images, "FlashVSR Upscale")
        b, h, w, _ = frames.shape
        node_id = str(cls.hidden.unique_id)
        latents = []
        engine = make_engine(model, settings_from(scale, sparse_ratio, local_range, kv_ratio, color_fix),
                             latent_sink=lambda z: latents.append(z.detach().to("cpu", torch.float32)))
        # (not the attention choice: gather and FlexAttention compute the same, a sequence may switch)
        key = f"{model.source}|{engine.identity()}|seed={seed}"
        # A mistake in the sequence (a chunk out of order, a state of other frames) is reported before any loading.
        start = STREAMS.start_state(node_id, key, (h, w), lambda: engine.new_state(seed), continue_sequence, state,
                                    start_frame, pending=engine.pending, notify=lambda text: show_text(node_id, text))
        load_engine(engine, model, (h, w))
        # (last_chunk too: with it off, the stored stream holds frames back for the next run; on, it holds none)
        origin = batch_origin(f"{key}|last_chunk={bool(last_chunk)}", frames, state) \
            if state is not None or start.frame_index == 0 else None
        first = start.emitted  # the sequence's first frame this run returns
        held = engine.pending(start)

        H, W = h * engine.scale, w * engine.scale
        out = torch.empty(held + b, H, W, 3, dtype=torch.float32, device=mm.intermediate_device())
        done = 0
        bar = comfy.utils.ProgressBar(b + (1 if last_chunk else 0))
        current = start.to(model.load_device)

        def take(hr: torch.Tensor) -> None:
            nonlocal done
            if hr.shape[0]:
                out[done: done + hr.shape[0]] = hr.permute(0, 2, 3, 1).to(out.device)
                done += hr.shape[0]

        message = oom_message(engine, h, w)
        for i in range(0, b, FRAMES_PER_PUSH):
            mm.throw_exception_if_processing_interrupted()
            chunk = frames[i: i + FRAMES_PER_PUSH].permute(0, 3, 1, 2)
            with out_of_memory_advice(message):
                hr, current = engine.push(current, chunk, consume=True)  # ``start`` is a copy
            take(hr)
            preview = ("JPEG", tensor_to_preview(hr[-1:]), 512) if hr.shape[0] else None
            bar.update_absolute(min(i + FRAMES_PER_PUSH, b), None, preview)
        if last_chunk:
            mm.throw_exception_if_processing_interrupted()
            with out_of_memory_advice(message):
                hr, current = engine.flush(current, consume=True)
            take(hr)
            preview = ("JPEG", tensor_to_preview(hr[-1:]), 512) if hr.shape[0] else None
            bar.update_absolute(b + 1, None, preview)
        final = current.to("cpu")
        # Only a completed batch replaces the stored stream: an interrupted or failed run leaves it as it was. A
        # cancel during the last frame counts too: the nodes after this one would not run, and a stream moved on
        # past frames that reached no one could not give them again.
        mm.throw_exception_if_processing_interrupted()
        STREAMS.put(node_id, StoredStream(key, final, origin, start.frame_index,
                                          redo_state(start, state, start_frame), start.frame_index + b,
                                          chunk_video(start_frame)))
        if done < out.shape[0]:
            out = out[:done].clone()  # a view would keep the whole buffer alive in ComfyUI's cache
        # An empty IMAGE batch fails core nodes such as Save Image ("index 0 is out of bounds"): the nodes after this
        # one are skipped for this run instead, without an error, and the node says why
        blocked, kept = ExecutionBlocker(None) if done == 0 else None, engine.pending(final)
        total = getattr(start_frame, "total", None)
        if kept and total is not None and start.frame_index + b >= total:
            # the video's last chunk without last_chunk: no later run would give these frames
            log.warning("StreamVSR: node %s: the video's last chunk ran with last_chunk off, so its last %d frames are "
                        "still held back: connect Load Video Chunk's last_chunk output to this node's last_chunk and "
                        "queue this chunk again", node_id, kept)
            show_text(node_id, f"{done} frames out; the last {kept} are held back although this is the video's last "
                               "chunk: connect Load Video Chunk's last_chunk to last_chunk and queue it again")
        elif done == 0:
            show_text(node_id, f"FlashVSR holds all {b} frames of this run back (its look-ahead needs more "
                               "before the first come out): they come out with the next chunk, so the nodes after "
                               "this one have nothing to do this run")
        else:  # (also replaces the text above, which the frontend keeps under the node)
            show_text(node_id, f"{done} frames out" + (f"; {kept} held back for the next chunk" if kept else ""))
        # The LR frames (8 bits, as FlashVSR reads them) for the colour fix after a Wan VAE decode, which only a
        # whole clip in one run allows
        whole = start.frame_index == 0 and bool(last_chunk)
        lr = quantize_8bit(frames).cpu() if whole and engine.color_fix != "none" else None
        return io.NodeOutput(blocked or out, final, blocked or wan_latent(latents, first, done, H, W, bool(last_chunk),
                                                                          (engine.color_fix, engine.scale, lr)))


def wan_latent(latents: list, first_frame: int, frames: int, height: int, width: int, complete: bool,
               color: tuple = ("none", 4, None)) -> dict:
    """This run's latents as a ComfyUI LATENT in the Wan 2.1 format: {"samples": (1, 16, T, H/8, W/8)} in the VAE's
    own scale (the DiT's normalised latents x std + mean, what core VAE Decode expects), plus what Trim Wan VAE
    Decode needs: the run's first output frame, its frame count, the output size, and for the colour fix
    ``color`` = (method, scale, the LR frames as uint8 (n, h, w, 3), or None where the method is none)."""
    import comfy.latent_formats

    if latents:
        samples = comfy.latent_formats.Wan21().process_out(torch.cat(latents, dim=2))
    else:
        hp, wp = -(-height // 128) * 128, -(-width // 128) * 128
        samples = torch.zeros(1, 16, 0, hp // 8, wp // 8)
    return {"samples": samples.to(mm.intermediate_device()),
            "streamvsr_flashvsr": {"first_frame": int(first_frame), "frames": int(frames), "height": int(height),
                                   "width": int(width), "complete": complete, "color_fix": color[0],
                                   "scale": color[1], "lr_frames": color[2]}}


class StreamVSRFlashVSRSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StreamVSRFlashVSRSettings",
            display_name="FlashVSR Settings",
            category=CATEGORY,
            description="FlashVSR's quality/speed settings for Stream Upscale Video File (without it the "
                        "official defaults are used).",
            inputs=[
                *settings_inputs(),
            ],
            outputs=[FlashVSRSettingsType.Output(display_name="flashvsr_settings")],
        )

    @classmethod
    def execute(cls, scale, sparse_ratio, local_range, kv_ratio, color_fix) -> io.NodeOutput:
        # The widgets' limits keep the values in range; the engine checks them again when it is built.
        return io.NodeOutput(settings_from(scale, sparse_ratio, local_range, kv_ratio, color_fix))


class StreamVSRFlashVSRTrimDecoded(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StreamVSRFlashVSRTrimDecoded",
            display_name="Trim Wan VAE Decode (FlashVSR)",
            category=CATEGORY,
            description="Cuts core VAE Decode's output of FlashVSR Upscale's latent to the upscaled frames (FlashVSR "
                        "works on sizes padded to multiples of 128 and frame counts padded for look-ahead) and "
                        "applies the upscale node's colour fix against its input frames, as the official full "
                        "decode does.",
            inputs=[
                io.Image.Input("images", tooltip="From VAE Decode (Wan 2.1 VAE) of FlashVSR Upscale's latent."),
                io.Latent.Input("latent", tooltip="The latent that was decoded (FlashVSR Upscale's latent output)."),
            ],
            outputs=[io.Image.Output(display_name="images")],
        )

    @classmethod
    def execute(cls, images, latent) -> io.NodeOutput:
        info = latent.get("streamvsr_flashvsr") if isinstance(latent, dict) else None
        if info is None:
            raise UserInputError("Trim Wan VAE Decode needs the latent output of FlashVSR Upscale")
        if info["first_frame"] != 0 or not info["complete"]:
            raise UserInputError(
                "the Wan 2.1 VAE can only decode FlashVSR latents of a whole clip upscaled in one run (restart and "
                "last_chunk on): the latents of one chunk of a longer sequence do not decode on their own. Use "
                "FlashVSR Upscale's images output (TC decoder) for chunked videos")
        n, hh, ww = info["frames"], info["height"], info["width"]
        if images.ndim != 4 or images.shape[0] < n or images.shape[1] < hh or images.shape[2] < ww:
            raise UserInputError(f"expected the VAE decode of this latent (at least {n} frames of {ww}x{hh}), got "
                                 f"images of shape {tuple(images.shape)}")
        images = images[:n, :hh, :ww, :3]
        method = info.get("color_fix", "none")
        if method == "none":
            return io.NodeOutput(images)
        lr = info.get("lr_frames")
        if lr is None or lr.shape[0] != n:
            raise UserInputError("this latent lacks the input frames its colour fix needs, which only a run that "
                                 "upscales the whole clip at once keeps (this clip took several runs, or an older "
                                 "version made it): upscale it in one run (restart, last_chunk on), or set FlashVSR "
                                 "Upscale's color_fix to none")
        out = torch.empty_like(images, device=mm.intermediate_device())
        for i in range(0, n, COLOR_FIX_BATCH):  # one batch of full-size reference frames at a time
            mm.throw_exception_if_processing_interrupted()
            reference = condition_video(lr[i: i + COLOR_FIX_BATCH].float() / 255, info["scale"], channels_last=True)
            reference = reference[0, :, :, :hh, :ww].transpose(0, 1)  # (frames, 3, H, W), the padding cut off
            decoded = images[i: i + COLOR_FIX_BATCH].permute(0, 3, 1, 2).float().cpu() * 2 - 1
            fixed = color_fix(decoded, reference, method).clamp(-1, 1)
            out[i: i + fixed.shape[0]] = ((fixed + 1) / 2).permute(0, 2, 3, 1).to(out.device)
        return io.NodeOutput(out)
