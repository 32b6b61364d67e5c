"""ComfyUI glue (V3 node API). Only imported by ComfyUI, through ``comfy_entrypoint`` in the package root."""

from comfy_api.latest import ComfyExtension, io

from .common import register_folders


class StreamVSRExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .raft import StreamVSREstimateFlow, StreamVSRFlowToImage, StreamVSRLoadFlowModel
        from .stream_diffvsr import StreamVSRLoadModel, StreamVSRUpscale
        from .video import StreamVSRVideoUpscale

        return [StreamVSRLoadModel, StreamVSRUpscale, StreamVSRVideoUpscale, StreamVSRLoadFlowModel,
                StreamVSREstimateFlow, StreamVSRFlowToImage]


def make_extension() -> StreamVSRExtension:
    register_folders()
    return StreamVSRExtension()
