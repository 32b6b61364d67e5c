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
