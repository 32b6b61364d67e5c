"""Which model family a file or folder holds, recognised from its files (as spandrel recognises architectures by
their keys), so one ``--model PATH`` serves every family."""

from __future__ import annotations

import importlib
from pathlib import Path

from .contract import Family
from .shared.errors import UserInputError
from .shared.weights import check_weights_file

# Packages under models/ that define FAMILY; looked up in this order.
FAMILY_PACKAGES = ("stream_diffvsr", "flashvsr")


def families() -> list[Family]:
    found = []
    for name in FAMILY_PACKAGES:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{name}":
                raise
            continue
        family = getattr(module, "FAMILY", None)
        if family is not None:
            found.append(family)
    return found


def family_by_name(name: str) -> Family:
    for family in families():
        if family.name == name:
            return family
    raise UserInputError(f"unknown model family {name!r} (known: {', '.join(f.name for f in families())})")


def detect_family(path) -> Family:
    """The family of the weights at ``path``; a one-line error when there are none or they are not recognised."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserInputError(f"model {path} does not exist")
    found = [family for family in families() if family.detect(path)]
    if len(found) > 1:
        raise UserInputError(f"{path} holds the files of {' and '.join(f.title for f in found)}: give the folder "
                             "or file of one model")
    if found:
        return found[0]
    if path.is_file():  # a damaged download is told as such, not as an unknown model
        check_weights_file(path)
    known = "; ".join(f"{f.title}" for f in families())
    raise UserInputError(f"{path} holds no model this pack knows ({known}). Give the official model folder or a "
                         "single file written by `streamvsr convert`.")
