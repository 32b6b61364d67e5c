"""Load Video Chunk: one chunk of a long video per queue run, for either upscale node.

Only the chunk is decoded (the file is seeked, see ``video/range.py``). The chunk index advances by itself on each
queue run (control after generate: increment), and the node tells the upscale node where the chunk starts
(``start_frame``) and whether it is the video's last (``last_chunk``), so queueing the workflow as many times as
the node says upscales the whole video, chunk after chunk, with the same result as one run.
"""

from __future__ import annotations

import logging

from comfy_api.latest import io

import comfy.model_management as mm

from ..models.shared.errors import UserInputError
from ..video.range import frame_index, read_range, video_identity
from .common import CATEGORY, check_not_cropped, show_text, whole_file
from .streams import ChunkStart

log = logging.getLogger(__name__)

READS = "reads the chunks of whole video files"  # (for its refusal of a trimmed or cropped VIDEO)


class StreamVSRLoadVideoChunk(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StreamVSRLoadVideoChunk",
            display_name="Load Video Chunk (StreamVSR)",
            category=CATEGORY,
            description="Loads frames chunk_index * chunk_frames ... of a video file, seeking instead of decoding "
                        "the whole file. With chunk_index set to increment, each queue run takes the next chunk; "
                        "wire start_frame (and, for FlashVSR, last_chunk) into the upscale node so the chunks "
                        "join up exactly. The node shows how many chunks the video has.",
            inputs=[
                io.Video.Input("video", tooltip="From the core Load Video node; only this chunk's frames are "
                                                "decoded from its file."),
                io.Int.Input("chunk_index", default=0, min=0, max=1_000_000, control_after_generate=True,
                             tooltip="Which chunk to load; 0 is the first. With 'control after generate' at "
                                     "increment (a new node's setting) every queue run loads the next chunk. Queue "
                                     "as many runs as the node reports chunks (a run past the end stops with a "
                                     "message); set it back to 0 to start the video again."),
                io.Int.Input("chunk_frames", default=64, min=1, max=100_000,
                             tooltip="Frames per chunk. Memory grows with it (the chunk and its upscaled frames "
                                     "are IMAGE batches in RAM: about 25 MB per 1080p frame, 100 MB per 4K "
                                     "frame); it does not change the result. FlashVSR returns its first frames "
                                     "once 25 have come in, so use 32 or more with it."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="The chunk's frames."),
                     io.Int.Output(display_name="start_frame",
                                   tooltip="The chunk's first frame: into the upscale node's start_frame (it "
                                           "also tells that node which video the chunk is of)."),
                     io.Boolean.Output(display_name="last_chunk",
                                       tooltip="True for the video's last chunk: into FlashVSR Upscale's "
                                               "last_chunk."),
                     io.Float.Output(display_name="fps", tooltip="The video's average frame rate."),
                     io.Int.Output(display_name="chunk_count", tooltip="How many chunks the video has."),
                     io.Int.Output(display_name="total_frames", tooltip="Frames in the video.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, video, chunk_index, chunk_frames) -> io.NodeOutput:
        source = whole_file(video, "Load Video Chunk", READS)
        index = frame_index(source)
        total = index.count
        if total == 0:
            raise UserInputError("the video has no frames")
        chunks = -(-total // chunk_frames)
        if chunk_index >= chunks:
            raise UserInputError(
                f"chunk_index {chunk_index} is past the end: the video has {total} frames, i.e. {chunks} chunks of "
                f"{chunk_frames} (indices 0 to {chunks - 1}), so every chunk has been queued. Set chunk_index "
                "back to 0 to upscale the video again, or, where a run was cancelled or failed on the way, to the "
                "first chunk that did not finish (the upscale node's error named it).")
        start = chunk_index * chunk_frames
        last = chunk_index == chunks - 1
        mm.throw_exception_if_processing_interrupted()
        # The last chunk reads to the end of the file, so no frame is lost if the index counted too few.
        images = read_range(source, start, chunk_frames, channels_last=True, to_end=last)
        if images.shape[0] == 0:
            raise UserInputError(f"could not decode frames from {start} on (the video reports {total} frames)")
        check_not_cropped(video, images.shape[2], images.shape[1], "Load Video Chunk", READS)
        if not last and images.shape[0] < chunk_frames:
            raise UserInputError(f"the video ended at frame {start + images.shape[0]} although its index lists "
                                 f"{total} frames; the file may be damaged")
        text = (f"loaded chunk {chunk_index + 1} of {chunks}: frames {start}-{start + images.shape[0] - 1} of "
                f"{total}" + (" (last)" if last else ""))
        if index.problem:  # the frames there are can still be upscaled; the user must know some are missing
            log.warning("StreamVSR: %s; the chunks cover the %d frames it has", index.problem, total)
            text += f"\nwarning: {index.problem}; the chunks cover the {total} frames it has"
        show_text(cls.hidden.unique_id, text)
        # (start_frame names the video too, so that an upscale node never continues another video's chunks)
        start_frame = ChunkStart(start, video_identity(source), chunk_frames, total)
        return io.NodeOutput(images.to(mm.intermediate_device()), start_frame, last, float(index.rate), chunks,
                             total)
