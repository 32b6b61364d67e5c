"""ComfyUI-StreamVSR: streaming diffusion video super-resolution nodes (Stream-DiffVSR, FlashVSR).

ComfyUI imports this folder as a package and calls ``comfy_entrypoint``; nothing else happens at import time.
The engines under ``models/`` are plain PyTorch and can be used without ComfyUI (see ``cli/``).
"""

__version__ = "0.1.0"

# Served by ComfyUI to its frontend (web/streamvsr.js: the video node shows its finished video, not the last preview).
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    # Imported lazily so that importing the package (tests, the command line) never touches ComfyUI.
    from .nodes import make_extension

    return make_extension()
