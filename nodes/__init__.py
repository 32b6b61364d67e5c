"""ComfyUI glue (V3 node API). Only imported by ComfyUI, through ``comfy_entrypoint`` in the package root."""

from comfy_api.latest import ComfyExtension, io

from .common import register_folders


class StreamVSRExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .flashvsr import (StreamVSRFlashVSRSettings, StreamVSRFlashVSRTrimDecoded, StreamVSRFlashVSRUpscale,
                               StreamVSRLoadFlashVSR)
        from .raft import StreamVSREstimateFlow, StreamVSRFlowToImage, StreamVSRLoadFlowModel
        from .stream_diffvsr import StreamVSRLoadModel, StreamVSRUpscale
        from .video import StreamVSRVideoUpscale
        from .video_range import StreamVSRLoadVideoChunk

        return [StreamVSRLoadModel, StreamVSRUpscale, StreamVSRVideoUpscale, StreamVSRLoadFlowModel,
                StreamVSREstimateFlow, StreamVSRFlowToImage, StreamVSRLoadFlashVSR, StreamVSRFlashVSRUpscale,
                StreamVSRFlashVSRSettings, StreamVSRFlashVSRTrimDecoded, StreamVSRLoadVideoChunk]


def make_extension() -> StreamVSRExtension:
    register_folders()
    return StreamVSRExtension()
