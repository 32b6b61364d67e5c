"""Finding, checking and loading FlashVSR's weight files, and converting them to one file.

The official release (Hugging Face ``JunhaoZhuang/FlashVSR`` = v1, ``JunhaoZhuang/FlashVSR-v1.1``) is a folder of
``diffusion_pytorch_model_streaming_dmd.safetensors`` (the DiT, original Wan2.1 keys), ``LQ_proj_in.ckpt`` (LQ
projection, pickled state dict), ``TCDecoder.ckpt`` (tiny conditional decoder, ``decoder.N`` keys plus unused
entries) and ``posi_prompt.pth`` (a pickled (1, L, 4096) prompt embedding, shipped in the GitHub repository under
``examples/WanVSR/prompt_tensor/``). Repackagings accepted in the same way: kijai's
``Wan2_1-T2V-1_3B_FlashVSR_fp32.safetensors`` / ``Wan2_1_FlashVSR_LQ_proj_model_bf16.safetensors`` (keys
``LQ_proj_in.*``) / ``Wan2_1_FlashVSR_TCDecoder_fp32.safetensors``, 1038lab's ``FlashVSR1_1.safetensors`` /
``LQ_proj_in.safetensors`` / ``TCDecoder.safetensors`` / ``Prompt.safetensors``, and DiT files with the LQ
projection merged in under ``LQ_proj_in.``. ``convert_flashvsr`` writes our own single ``.safetensors``
(``dit.*``, ``lq_proj.*``, ``tc_decoder.*``, ``prompt``; metadata ``format``, ``version``, ``dtype``).

v1 and v1.1 files have the same keys and shapes but need different LQ-projection arithmetic. With no version given,
``stated_version`` takes it from a repackaged DiT's name, the sha256 of the published v1.1 LQ file or a folder named
for v1.1 or v1; against an explicit choice they only produce a warning. Pickles are opened with ``weights_only=True``
only.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..shared.errors import UserInputError, WeightsError, cannot_read, first_line
from ..shared.hub import set_aside_note
from ..shared.runtime import check_torch_version
from ..shared.weights import (check_weights_file, key_mismatches, load_into, load_reason, read_state_dict,
                              save_safetensors, sha256_of, summary)
from .lq_proj import VERSIONS, LQProjection, check_version, lq_config_from_state_dict
from .tc_decoder import TCDecoder, tc_config_from_state_dict

log = logging.getLogger(__name__)

FORMAT = "streamvsr/flashvsr"
DIT_FILES = ("diffusion_pytorch_model_streaming_dmd.safetensors", "FlashVSR1_1.safetensors",
             "Wan2_1-T2V-1.1_3B_FlashVSR_fp32.safetensors", "Wan2_1-T2V-1_3B_FlashVSR_fp32.safetensors")
# the DiT file names that say which release they hold (the official name is the same for both)
DIT_VERSIONS = {"FlashVSR1_1.safetensors": "v1.1", "Wan2_1-T2V-1.1_3B_FlashVSR_fp32.safetensors": "v1.1",
                "Wan2_1-T2V-1_3B_FlashVSR_fp32.safetensors": "v1"}
LQ_FILES = ("LQ_proj_in.ckpt", "LQ_proj_in.safetensors", "Wan2_1_FlashVSR_LQ_proj_model_bf16.safetensors")
TC_FILES = ("TCDecoder.ckpt", "TCDecoder.safetensors", "Wan2_1_FlashVSR_TCDecoder_fp32.safetensors")
# The last one is the official checkout's layout: the release folder is cloned into examples/WanVSR/, beside the
# prompt's folder.
PROMPT_FILES = ("posi_prompt.pth", "Prompt.safetensors", "prompt_tensor/posi_prompt.pth",
                "../prompt_tensor/posi_prompt.pth")
LQ_PREFIX = "LQ_proj_in."
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# Key names a single-tensor prompt .safetensors may use (1038lab's loader takes whatever single tensor it holds).
PROMPT_KEYS = ("prompt", "context", "posi_prompt", "prompt_emb", "embeds")

# sha256 prefixes of published LQ projection files -> version (v1.1 at HF revision 27561b1; no v1 digest known).
LQ_SHA256 = {"d6d011cdaaba6a52": "v1.1"}
# "v1.1", "FlashVSR1_1", not the "2.1-1.3B" or "2_1_1_3b" of Wan's names
FOLDER_V11 = re.compile(r"(?<![0-9._])v?1[._-]1(?![0-9]|[._-][0-9])", re.IGNORECASE)
# "FlashVSR-v1", "flashvsr_V1", not "v1.1" or "dev1"; and "FlashVSR" as written, the v1 repository's name and the
# folder that the v1 download makes (ComfyUI's own models/flashvsr folder may hold a model's files too)
FOLDER_V1 = re.compile(r"^FlashVSR$|(?i:(?<![0-9a-z])v1(?![0-9]|[._-][1-9]))")

HINT = ("FlashVSR weights: https://huggingface.co/JunhaoZhuang/FlashVSR-v1.1 (v1.1) or "
        "https://huggingface.co/JunhaoZhuang/FlashVSR (v1) - diffusion_pytorch_model_streaming_dmd.safetensors, "
        "LQ_proj_in.ckpt, TCDecoder.ckpt - plus posi_prompt.pth from "
        "https://github.com/OpenImagingLab/FlashVSR/tree/main/examples/WanVSR/prompt_tensor")


@dataclass
class FlashVSRFiles:
    """Where each component comes from; ``single`` is a file made by ``convert_flashvsr`` (then the rest are it)."""

    dit: Path
    lq_proj: Path | None
    tc_decoder: Path | None
    prompt: Path | None
    single: bool = False


@dataclass
class FlashVSRWeights:
    """Checked state dicts (no prefixes), the prompt embedding (1, L, text_dim), the version in use, and facts:
    ``files`` (component -> path), ``dtypes`` (component -> dtype name), ``version_hints`` ([(source, version)]),
    ``lq_sha256`` (when computed), ``dit`` / ``lq_proj`` / ``tc_decoder`` configs, ``ignored`` (component ->
    unused keys)."""

    dit: dict
    lq_proj: dict
    tc_decoder: dict | None
    prompt: torch.Tensor
    version: str
    facts: dict = field(default_factory=dict)


@dataclass
class FlashVSRModel:
    """Modules ready to run. ``dit`` is the DiT module (``dit_state_dict`` is then empty), or None when it was
    not built; then ``dit_state_dict`` holds its weights."""

    dit: nn.Module | None
    dit_state_dict: dict
    lq_proj: LQProjection
    tc_decoder: TCDecoder | None
    prompt: torch.Tensor
    version: str
    facts: dict


def _read(path: Path) -> dict:
    return read_state_dict(path, HINT)


def _read_prompt(path: Path) -> torch.Tensor:
    if path.suffix.lower() == ".safetensors":
        tensors = _read(path)
        key = next((k for k in PROMPT_KEYS if k in tensors), None) or (next(iter(tensors)) if len(tensors) == 1
                                                                       else None)
        if key is None:
            raise WeightsError(f"{path} holds {len(tensors)} tensors ({summary(tensors)}) and none is the prompt "
                               f"(expected a single tensor or one named {' / '.join(PROMPT_KEYS)}). {HINT}")
        prompt = tensors[key]
    else:
        check_weights_file(path, HINT)
        try:
            prompt = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle raises assorted types for damaged or hostile files
            raise WeightsError(f"cannot read {path} ({path.stat().st_size:,} bytes): {load_reason(e)}. The file is "
                               "truncated, not a prompt embedding, or holds code rather than tensors; download it "
                               f"again. {HINT}") from None
        if isinstance(prompt, dict) and len(prompt) == 1:
            prompt = next(iter(prompt.values()))
    if not torch.is_tensor(prompt) or not prompt.is_floating_point() or prompt.ndim not in (2, 3) or (
            prompt.ndim == 3 and prompt.shape[0] != 1):
        what = tuple(prompt.shape) if torch.is_tensor(prompt) else type(prompt).__name__
        raise WeightsError(f"{path} is not a prompt embedding: expected a float tensor (1, L, text_dim), got {what}")
    return prompt if prompt.ndim == 3 else prompt[None]


def _safetensors_header(path: Path) -> tuple[dict, list]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}, list(f.keys())


def _is_converted(path: Path) -> bool:
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    try:
        return _safetensors_header(path)[0].get("format") == FORMAT
    except Exception:
        return False


def _first(folder: Path, names) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def find_files(path, version: str | None = None) -> FlashVSRFiles:
    """The files of a FlashVSR model given as a folder, as one of its DiT files, or as a converted file. In a
    folder with the DiT of both releases under their names (1038lab's), ``version`` picks which."""
    path = Path(path).expanduser()
    if path.is_file():
        if _is_converted(path):
            return FlashVSRFiles(path, path, path, path, single=True)
        if _is_component(path):
            return find_files(path.parent, version)  # another component of the folder was picked
        folder = path.parent
        dit = path
    elif path.is_dir():
        folder = path
        named = [n for n in DIT_FILES if DIT_VERSIONS.get(n) == version]
        dit = _first(folder, named + [n for n in DIT_FILES if n not in named])
        converted = sorted(p for p in folder.glob("*.safetensors") if _is_converted(p))
        if dit is None and len(converted) == 1:
            return FlashVSRFiles(converted[0], converted[0], converted[0], converted[0], single=True)
        if dit is None and converted:
            raise UserInputError(f"{folder} holds {len(converted)} converted FlashVSR files "
                                 f"({', '.join(p.name for p in converted)}): give one of them")
        if dit is None:
            raise WeightsError(f"no FlashVSR DiT in {folder} (looked for {', '.join(DIT_FILES)}). {HINT}")
    else:
        raise WeightsError(f"{path} does not exist. {HINT}")
    return FlashVSRFiles(dit, _first(folder, LQ_FILES), _first(folder, TC_FILES), _first(folder, PROMPT_FILES))


def _is_component(path: Path) -> bool:
    return path.name in LQ_FILES + TC_FILES + tuple(Path(p).name for p in PROMPT_FILES)


def stated_version(files: FlashVSRFiles) -> str | None:
    """The version the files themselves say, or None where they are silent (the official file names are the same
    for both): a repackaged DiT's name, else the hash of the published v1.1 LQ projection, else a folder named for
    v1.1 or v1, the weakest sign (a user names folders)."""
    if files.dit.name in DIT_VERSIONS:
        return DIT_VERSIONS[files.dit.name]
    sha = _official_lq_sha256(files) or ""
    known = [v for prefix, v in LQ_SHA256.items() if sha.startswith(prefix)]
    if known:
        return known[0]
    if not files.single:
        name = _folder_name(files)
        if FOLDER_V11.search(name):
            return "v1.1"
        if FOLDER_V1.search(name):
            return "v1"
    return None


def _folder_name(files: FlashVSRFiles) -> str:
    """The name of the folder that holds the DiT, also where it was given as "." (run from inside it)."""
    return files.dit.absolute().parent.name


def _official_lq_sha256(files: FlashVSRFiles) -> str | None:
    """The sha256 of an official ``LQ_proj_in.ckpt`` among ``files``; None for other files, or where it cannot be
    read (said by ``read_flashvsr``, in its words)."""
    if files.lq_proj is None or files.lq_proj.suffix != ".ckpt" or cannot_read(files.lq_proj):
        return None
    return sha256_of(files.lq_proj)


def unpublished_lq(files: FlashVSRFiles) -> bool:
    """Whether ``files`` hold an official ``LQ_proj_in.ckpt`` that is not the published v1.1 file: the v1 one
    (whose hash is not published) or another. Loaded as v1.1 by default, v1's gives ghosting."""
    sha = _official_lq_sha256(files)
    return sha is not None and not any(sha.startswith(prefix) for prefix, v in LQ_SHA256.items() if v == "v1.1")


def _strip(state_dict: dict, prefixes) -> dict:
    for prefix in prefixes:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _check(module: nn.Module, state_dict: dict, what: str, source) -> None:
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    problems = key_mismatches(expected, state_dict)
    if problems:
        raise WeightsError("; ".join([f"{what} weights in {source} do not match FlashVSR's {what}"] + problems)
                           + f". {HINT}")


def _dit_module(state_dict: dict, source, operations=nn, device="meta", dtype=None) -> nn.Module:
    from .dit import WanDiT, dit_config_from_state_dict

    try:
        config = dit_config_from_state_dict(state_dict)
    except WeightsError as e:
        raise WeightsError(f"{source}: {e}") from None
    return WanDiT(config, operations=operations, device=device, dtype=dtype)


def _dtypes(state_dict: dict) -> str:
    names = sorted({str(v.dtype).replace("torch.", "") for v in state_dict.values() if v.is_floating_point()})
    return "+".join(names) or "none"


def _version_hints(files: FlashVSRFiles, lq_sha256: str | None) -> list[tuple[str, str]]:
    hints = []
    if files.dit.name in DIT_VERSIONS:
        hints.append((f"file name {files.dit.name}", DIT_VERSIONS[files.dit.name]))
    if not files.single and FOLDER_V11.search(_folder_name(files)):
        hints.append((f"folder name {_folder_name(files)}", "v1.1"))
    if lq_sha256:
        for prefix, version in LQ_SHA256.items():
            if lq_sha256.startswith(prefix):
                hints.append((f"sha256 of {files.lq_proj.name} ({prefix}...)", version))
    return hints


def _split_converted(path: Path) -> tuple[dict, dict, dict, torch.Tensor, dict]:
    meta, _ = _safetensors_header(path)
    tensors = _read(path)
    parts = {"dit.": {}, "lq_proj.": {}, "tc_decoder.": {}}
    prompt, stray = None, []
    for k, v in tensors.items():
        prefix = next((p for p in parts if k.startswith(p)), None)
        if prefix:
            parts[prefix][k[len(prefix):]] = v
        elif k == "prompt":
            prompt = v
        else:
            stray.append(k)
    if stray or prompt is None or not parts["dit."] or not parts["lq_proj."]:
        missing = [n for n, ok in (("prompt", prompt is not None), ("dit.*", parts["dit."]),
                                   ("lq_proj.*", parts["lq_proj."])) if not ok]
        raise WeightsError(f"{path} is damaged: " + "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown keys {summary(stray)}"] if stray
                                                                      else [])) + ". Convert it again.")
    return parts["dit."], parts["lq_proj."], parts["tc_decoder."], prompt, meta


def _holds_lq_proj(dit: Path) -> bool | None:
    """Whether the DiT file carries the LQ projection (some ports merge it in), from its header alone; None where
    that cannot be told without reading the file."""
    if dit.suffix.lower() != ".safetensors":
        return None
    try:
        keys = _safetensors_header(dit)[1]
    except Exception:  # noqa: BLE001 - damaged: reading it says so, with the advice for that
        return None
    return any(k.startswith(LQ_PREFIX) or any(k.startswith(p + LQ_PREFIX) for p in DIT_PREFIXES) for k in keys)


def _check_complete(files: FlashVSRFiles, need_decoder: bool) -> None:
    """Raise naming every component file missing beside the DiT, all in one error (a download that stopped
    half-way lacks several): one run tells the user all there is to fetch."""
    missing = []
    if files.prompt is None:
        missing.append(("prompt embedding", PROMPT_FILES))
    if need_decoder and files.tc_decoder is None:
        missing.append(("TC decoder", TC_FILES))
    if files.lq_proj is None and _holds_lq_proj(files.dit) is False:
        missing.append(("LQ projection", LQ_FILES))
    if missing:
        stopped = " A download that stopped: the ComfyUI loader's '(download) …' entry finishes it."
        raise WeightsError(f"no {' and no '.join(what for what, _ in missing)} next to {files.dit} (looked for "
                           f"{'; '.join(', '.join(names) for _, names in missing)})."
                           f"{set_aside_note(files.dit.parent) or stopped} {HINT}")


def _version_needed(path) -> UserInputError:
    return UserInputError(f"say which FlashVSR version {path} holds ({' or '.join(VERSIONS)}): v1 and v1.1 "
                          f"files have the same keys but need different LQ-projection arithmetic")


def read_flashvsr(path, version: str | None = None, *, need_decoder: bool = True,
                  verify_version: bool = True) -> FlashVSRWeights:
    """Read and check every component of the FlashVSR model at ``path`` (folder, DiT file or converted file).

    ``version`` ("v1" / "v1.1") is required unless ``path`` is a converted file, which records it. With
    ``verify_version`` the LQ projection file is hashed (about a second) to spot the published v1.1 file.
    Raises WeightsError naming the file and the offending keys when something does not match.
    """
    if version is not None:
        check_version(version)
    files = find_files(path, version)
    facts: dict = {"files": {}, "ignored": {}}
    if files.single:
        dit, lq, tc, prompt, meta = _split_converted(files.dit)
        recorded = meta.get("version")
        if recorded and recorded not in VERSIONS:
            raise WeightsError(f"{files.dit} records the FlashVSR version {recorded!r}, which is not one of "
                               f"{', '.join(VERSIONS)}: convert the model again with `streamvsr convert`")
        if version is None:
            version = recorded
        elif recorded and recorded != version:
            log.warning("FlashVSR: %s was converted as %s but is being loaded as %s", files.dit, recorded, version)
        facts["files"] = {name: files.dit for name in ("dit", "lq_proj", "tc_decoder", "prompt")}
        lq_sha256 = meta.get("lq_sha256") or None
        lq_source = meta.get("lq_source")
        tc = tc or None
    else:
        # A missing file or version is reported before the DiT (gigabytes) is read
        _check_complete(files, need_decoder)
        if version is None:
            raise _version_needed(path)
        for found in (files.dit, files.lq_proj, files.tc_decoder, files.prompt):
            if found is not None:  # a damaged small file is found before the DiT is read
                check_weights_file(found, HINT)
        facts["files"]["dit"] = files.dit
        dit = _strip(_read(files.dit), DIT_PREFIXES)
        merged = {k[len(LQ_PREFIX):]: v for k, v in dit.items() if k.startswith(LQ_PREFIX)}
        if merged:
            dit = {k: v for k, v in dit.items() if not k.startswith(LQ_PREFIX)}
            lq, lq_sha256, lq_source = merged, None, None
            facts["files"]["lq_proj"] = files.dit
        else:
            if files.lq_proj is None:
                raise WeightsError(f"no LQ projection next to {files.dit} (looked for {', '.join(LQ_FILES)}). {HINT}")
            lq = _strip(_read(files.lq_proj), (LQ_PREFIX,))
            facts["files"]["lq_proj"] = files.lq_proj
            lq_sha256 = sha256_of(files.lq_proj) if verify_version else None
            lq_source = files.lq_proj.name
        tc = None
        if files.tc_decoder is not None:
            tc = _read(files.tc_decoder)
            facts["files"]["tc_decoder"] = files.tc_decoder
            extra = sorted(k for k in tc if not k.startswith("decoder."))
            if extra:
                # The official TCDecoder.ckpt carries ~7.7 MB of entries the decoder does not use (the official
                # loader is non-strict); anything outside decoder.* is such an entry.
                log.info("FlashVSR TC decoder: ignoring %d unused entries in %s (%s)", len(extra), files.tc_decoder,
                         summary(extra, 4))
                facts["ignored"]["tc_decoder"] = extra
                tc = {k: v for k, v in tc.items() if k.startswith("decoder.")}
        prompt = _read_prompt(files.prompt)
        facts["files"]["prompt"] = files.prompt
    if need_decoder and tc is None:  # (a converted file without one; a folder's missing file is found above)
        raise WeightsError(f"{files.dit} holds no TC decoder (tc_decoder.* tensors); convert the model again "
                           f"from a folder that has TCDecoder.ckpt")
    if version is None:
        raise _version_needed(path)
    check_version(version)

    # Shapes are checked against modules built on the meta device (no memory).
    dit_module = _dit_module(dit, facts["files"]["dit"])
    _check(dit_module, dit, "DiT", facts["files"]["dit"])
    try:
        lq_config = lq_config_from_state_dict(lq)
        lq_module = LQProjection(version, **lq_config, device="meta")
    except ValueError as e:
        raise WeightsError(f"{facts['files']['lq_proj']}: {e}; it holds {summary(lq)}. {HINT}") from None
    _check(lq_module, lq, "LQ projection", facts["files"]["lq_proj"])
    if lq_config["out_dim"] != dit_module.dim:
        raise WeightsError(f"the LQ projection in {facts['files']['lq_proj']} makes {lq_config['out_dim']}-wide "
                           f"tokens but the DiT in {facts['files']['dit']} is {dit_module.dim} wide")
    tc_config = None
    if tc is not None:
        try:
            tc_config = tc_config_from_state_dict(tc)
            tc_module = TCDecoder(**tc_config, device="meta")
        except ValueError as e:
            held = summary(tc or facts["ignored"].get("tc_decoder", ()))  # (what was left out above, if all)
            raise WeightsError(f"{facts['files']['tc_decoder']}: {e}; it holds {held}. {HINT}") from None
        _check(tc_module, tc, "TC decoder", facts["files"]["tc_decoder"])
        if tc_config["latent_channels"] != dit_module.out_dim:
            raise WeightsError(f"the TC decoder in {facts['files']['tc_decoder']} decodes "
                               f"{tc_config['latent_channels']}-channel latents, the DiT makes {dit_module.out_dim}")
    if prompt.shape[-1] != dit_module.config["text_dim"]:
        raise WeightsError(f"the prompt embedding in {facts['files']['prompt']} is {tuple(prompt.shape)}, the DiT "
                           f"expects {dit_module.config['text_dim']}-wide text features")

    hints = _version_hints(files, lq_sha256)
    for source, hinted in hints:
        if hinted != version:
            log.warning("FlashVSR: loading %s as %s, but its %s says %s; v1 and v1.1 weights with the wrong "
                        "LQ-projection arithmetic give ghosting", path, version, source, hinted)
    # (only the official file's hash is known; a converted file records its source's name and hash)
    if version == "v1.1" and lq_sha256 and lq_source == "LQ_proj_in.ckpt" and not any(
            lq_sha256.startswith(p) for p, v in LQ_SHA256.items() if v == "v1.1"):
        log.warning("FlashVSR: the LQ projection of %s is not the published v1.1 file (sha256 %s...); if it is "
                    "the v1 file, give version v1", path, lq_sha256[:16])
    facts.update(version_hints=hints, lq_sha256=lq_sha256, lq_source=lq_source, dit=dict(dit_module.config),
                 lq_proj=lq_config, tc_decoder=tc_config,
                 dtypes={"dit": _dtypes(dit), "lq_proj": _dtypes(lq), "tc_decoder": _dtypes(tc) if tc else None,
                         "prompt": str(prompt.dtype).replace("torch.", "")})
    return FlashVSRWeights(dit=dit, lq_proj=lq, tc_decoder=tc, prompt=prompt, version=version, facts=facts)


def load_flashvsr(path, version: str | None = None, device="cpu", dtype=torch.bfloat16, operations=None,
                  decoder_dtype=None, build_dit: bool = True, need_decoder: bool = True,
                  verify_version: bool = True) -> FlashVSRModel:
    """Load FlashVSR's modules from ``path`` (see ``read_flashvsr``) in ``dtype`` on ``device``.

    The LQ projection, the TC decoder (in ``decoder_dtype``, default ``dtype``) and, with ``build_dit``, the DiT
    are built on the meta device from ``operations`` (default ``torch.nn``) and filled strictly. The prompt is
    returned as stored.
    """
    check_torch_version()
    weights = read_flashvsr(path, version, need_decoder=need_decoder, verify_version=verify_version)
    ops = operations or nn
    files = weights.facts["files"]
    lq = load_into(LQProjection(weights.version, **weights.facts["lq_proj"], operations=ops, device="meta"),
                   weights.lq_proj, "FlashVSR LQ projection", files["lq_proj"], device=device, dtype=dtype, hint=HINT)
    tc = None
    if weights.tc_decoder is not None:
        tc = load_into(TCDecoder(**weights.facts["tc_decoder"], operations=ops, device="meta"), weights.tc_decoder,
                       "FlashVSR TC decoder", files["tc_decoder"], device=device, dtype=decoder_dtype or dtype,
                       hint=HINT)
    dit, dit_state = None, weights.dit
    if build_dit:
        dit = load_into(_dit_module(weights.dit, files["dit"], operations=ops), weights.dit, "FlashVSR DiT",
                        files["dit"], device=device, dtype=dtype, hint=HINT)
        dit_state = {}
    return FlashVSRModel(dit=dit, dit_state_dict=dit_state, lq_proj=lq, tc_decoder=tc, prompt=weights.prompt,
                         version=weights.version, facts=weights.facts)


def convert_flashvsr(folder, out_path, dtype=None, version: str | None = None, verify_version: bool = True) -> Path:
    """Check the FlashVSR model at ``folder`` and write it as one ``.safetensors`` at ``out_path``.

    Floating tensors are cast to ``dtype`` (None keeps each file's own); the folder must have every component,
    the TC decoder included (no node runs without it). The file is written under a temporary name and renamed into
    place, so an interrupted conversion leaves no partial output.
    """
    weights = read_flashvsr(folder, version, verify_version=verify_version)
    out_path = Path(out_path).expanduser()
    if out_path.suffix != ".safetensors":
        raise UserInputError(f"the converted FlashVSR file must end in .safetensors, got {out_path}")

    def cast(t):
        return (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()

    # Popped one by one so that a cast DiT does not sit in memory twice.
    tensors = {f"dit.{k}": cast(weights.dit.pop(k)) for k in list(weights.dit)}
    # Pickled files may hold views of one storage, which safetensors refuses to write: the smaller components
    # are copied.
    tensors.update({f"lq_proj.{k}": cast(v).clone() for k, v in weights.lq_proj.items()})
    tensors.update({f"tc_decoder.{k}": cast(v).clone() for k, v in weights.tc_decoder.items()})
    tensors["prompt"] = cast(weights.prompt).clone()
    meta = {"format": FORMAT, "version": weights.version,
            "dtype": str(dtype).replace("torch.", "") if dtype is not None else "as-source"}
    for key in ("lq_sha256", "lq_source"):
        if weights.facts.get(key):
            meta[key] = weights.facts[key]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # One name per output, not per process: a conversion killed half-way leaves GBs that the next one replaces.
    tmp = out_path.with_name(out_path.name + ".part")
    try:
        save_safetensors(tensors, tmp, metadata=meta)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def detect(path) -> bool:
    """Whether ``path`` holds FlashVSR weights: a folder with a FlashVSR DiT or LQ projection file, a converted
    file, a known DiT file name, another component of such a folder, or a DiT ``.safetensors`` with the LQ
    projection merged in. Reads names and safetensors headers only; never raises."""
    try:
        path = Path(path).expanduser()
        if path.is_dir():
            return _first(path, DIT_FILES + LQ_FILES) is not None or any(
                _is_converted(p) for p in path.glob("*.safetensors"))
        if not path.is_file():
            return False
        if path.name in DIT_FILES:
            return True
        if _is_component(path):
            return detect(path.parent)
        if path.suffix.lower() != ".safetensors":
            return False
        meta, keys = _safetensors_header(path)
        if meta.get("format") == FORMAT:
            return True
        names = set(keys)
        return f"{LQ_PREFIX}conv1.weight" in names and "blocks.0.self_attn.q.weight" in names
    except Exception:
        return False
