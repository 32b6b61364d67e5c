"""ComfyUI glue (V3 node API). Only imported by ComfyUI, through ``comfy_entrypoint`` in the package root."""

from comfy_api.latest import ComfyExtension, io

from .common import register_folders


class StreamVSRExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .flow import StreamVSREstimateFlow, StreamVSRFlowToImage, StreamVSRLoadFlowModel
        from .vsr import StreamVSRLoadModel, StreamVSRUpscale

        nodes = [StreamVSRLoadModel, StreamVSRUpscale, StreamVSRLoadFlowModel, StreamVSREstimateFlow,
                 StreamVSRFlowToImage]
        try:
            from . import video
        except ImportError as e:  # the video-file nodes need PyAV; the others do not
            import logging

            logging.getLogger(__name__).warning("StreamVSR: video-file nodes unavailable (%s)", e)
        else:
            nodes += [obj for name, obj in sorted(vars(video).items())
                      if name.startswith("StreamVSRVideo") and isinstance(obj, type) and issubclass(obj, io.ComfyNode)]
        return nodes


def make_extension() -> StreamVSRExtension:
    register_folders()
    return StreamVSRExtension()
