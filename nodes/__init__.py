"""ComfyUI glue (V3 node API). Only imported by ComfyUI, through ``comfy_entrypoint`` in the package root."""

from comfy_api.latest import ComfyExtension

from .common import register_folders


class StreamVSRExtension(ComfyExtension):
    async def get_node_list(self):
        from .flow import StreamVSREstimateFlow, StreamVSRFlowToImage, StreamVSRLoadFlowModel
        from .vsr import StreamVSRLoadModel, StreamVSRUpscale

        nodes = [StreamVSRLoadModel, StreamVSRUpscale, StreamVSRLoadFlowModel, StreamVSREstimateFlow,
                 StreamVSRFlowToImage]
        try:
            from .video import VIDEO_NODES
        except ImportError:
            VIDEO_NODES = []
        return nodes + list(VIDEO_NODES)


def make_extension() -> StreamVSRExtension:
    register_folders()
    return StreamVSRExtension()
