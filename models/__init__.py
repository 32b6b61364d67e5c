"""Plain-PyTorch model code. Nothing in this package imports ComfyUI."""
