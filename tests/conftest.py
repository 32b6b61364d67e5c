"""Make the repository importable as the package ``streamvsr`` without installing it.

The repository root is a ComfyUI custom-node folder whose code uses relative imports, so it has to be
imported as a package. ``pip install -e .`` maps it to ``streamvsr``; this does the same for a plain checkout.
"""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

if "streamvsr" not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        "streamvsr", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["streamvsr"] = module
    spec.loader.exec_module(module)


import pytest  # noqa: E402  (after the package is importable)


@pytest.fixture(autouse=True)
def _hub_client_as_installed(monkeypatch):
    """Each test starts from the hub client's defaults: HF_HUB_OFFLINE or HF_ENDPOINT in the environment of the
    test run (an offline CI sets the first) changed what the download tests see, and, since huggingface_hub reads
    them once when first imported, only where a test before had imported it."""
    for name in ("HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False, raising=False)
        monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co", raising=False)
