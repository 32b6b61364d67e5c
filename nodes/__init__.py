"""ComfyUI glue (V3 node API). Only imported by ComfyUI through ``comfy_entrypoint``."""
