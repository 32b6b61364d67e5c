"""The official-checkpoint download, with a stand-in for huggingface_hub (no network)."""

import errno
import hashlib
import os
import shutil
import sys
import types
from pathlib import Path

import pytest

from streamvsr.models.stream_diffvsr import hub


def fake_hub(monkeypatch, content=lambda name: name.encode(), fail=None):
    """Install a huggingface_hub whose hf_hub_download writes ``content(name)`` into local_dir."""
    calls = []

    def hf_hub_download(repo_id, filename, local_dir=None, **kwargs):
        calls.append((repo_id, filename))
        if fail is not None:
            raise fail
        path = __import__("pathlib").Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content(filename))
        return str(path)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))
    return calls


@pytest.fixture
def known_hashes(monkeypatch):
    # Stand-in hashes for the two files whose sha256 is pinned: those of the fake content.
    files = dict(hub.HUB_FILES)
    for name, sha in files.items():
        if sha is not None:
            files[name] = hashlib.sha256(name.encode()).hexdigest()
    monkeypatch.setattr(hub, "HUB_FILES", files)
    return files


def test_downloads_only_the_needed_files_once(monkeypatch, tmp_path, known_hashes):
    calls = fake_hub(monkeypatch)
    dest = hub.download_stream_diffvsr(tmp_path / "Stream-DiffVSR")
    names = [c[1] for c in calls]
    assert all(repo == "Jamichsu/Stream-DiffVSR" for repo, _ in calls)
    assert sorted(names) == sorted(known_hashes)
    for needed in ("unet/diffusion_pytorch_model.safetensors", "controlnet/config.json", "vae/config.json",
                   "text_encoder/model.safetensors", "tokenizer/vocab.json", "scheduler/scheduler_config.json",
                   "model_index.json"):
        assert needed in names and (dest / needed).is_file()
    assert not any(n.endswith((".bin", ".ckpt")) or n.startswith(("feature_extractor", "safety")) for n in names)
    # a second call finds everything in place: no network
    calls.clear()
    assert hub.download_stream_diffvsr(dest) == dest
    assert calls == []
    # an interrupted download resumes with what is missing
    (dest / "unet" / "config.json").unlink()
    hub.download_stream_diffvsr(dest)
    assert [c[1] for c in calls] == ["unet/config.json"]


def test_a_download_that_does_not_match_is_deleted(monkeypatch, tmp_path, known_hashes):
    fake_hub(monkeypatch, content=lambda name: b"truncated")
    with pytest.raises(RuntimeError, match="controlnet/diffusion_pytorch_model.safetensors as downloaded is not the "
                                           "published file .* Download it again; if it fails the same way, the file "
                                           "on the hub has changed: update ComfyUI-StreamVSR"):
        hub.download_stream_diffvsr(tmp_path)
    assert not (tmp_path / "controlnet" / "diffusion_pytorch_model.safetensors").exists()


def test_a_failed_download_leaves_no_folder_it_made(monkeypatch, tmp_path, known_hashes):
    """A download refused offline, or stopped before a file came, left the model folder it had made, empty (and a
    model list showed it); one that fails after files came keeps them, to resume."""
    hub_settings(monkeypatch, HF_HUB_OFFLINE=True, ENDPOINT="https://huggingface.co")
    fake_hub(monkeypatch, fail=AssertionError("no download expected"))
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set"):
        hub.download_stream_diffvsr(tmp_path / "models" / "Stream-DiffVSR")
    assert list(tmp_path.iterdir()) == []
    hub_settings(monkeypatch, HF_HUB_OFFLINE=False, ENDPOINT="https://huggingface.co")
    (tmp_path / "models").mkdir()  # the user's: stays
    fake_hub(monkeypatch, fail=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        hub.download_stream_diffvsr(tmp_path / "models" / "Stream-DiffVSR")
    assert list(tmp_path.rglob("*")) == [tmp_path / "models"]
    fake_hub(monkeypatch, content=lambda name: b"truncated" if name.startswith("vae/") else name.encode())
    with pytest.raises(RuntimeError, match="as downloaded is not the published file"):
        hub.download_stream_diffvsr(tmp_path / "models" / "Stream-DiffVSR")
    assert (tmp_path / "models" / "Stream-DiffVSR" / "controlnet" / "config.json").is_file()


def hub_settings(monkeypatch, **constants):
    """What huggingface_hub read from HF_ENDPOINT and HF_HUB_OFFLINE (its constants module)."""
    monkeypatch.setitem(sys.modules, "huggingface_hub.constants", types.SimpleNamespace(**constants))


def test_files_that_differ_are_all_named_and_kept_until_a_verified_download_replaces_them(monkeypatch, tmp_path,
                                                                                          known_hashes):
    """A file whose sha256 is not the published one may be the user's only copy: a download that fails, is
    refused (offline) or stopped leaves it as it was; every such file is named, by its path on disk, at once."""
    fake_hub(monkeypatch)
    hub.download_stream_diffvsr(tmp_path)
    mine = {tmp_path / name: f"mine {name}".encode() for name, sha in known_hashes.items() if sha is not None}
    assert len(mine) == 2
    for path, data in mine.items():
        path.write_bytes(data)

    def unchanged():
        assert {path: path.read_bytes() for path in mine} == mine
        assert not list(tmp_path.rglob("*.mismatch*"))

    calls = fake_hub(monkeypatch, fail=OSError("[Errno -3] Temporary failure in name resolution"))
    with pytest.raises(RuntimeError) as err:
        hub.download_stream_diffvsr(tmp_path)
    assert all(str(path) in str(err.value) for path in mine) and len(calls) == 1
    unchanged()
    hub_settings(monkeypatch, HF_HUB_OFFLINE=True, ENDPOINT="https://huggingface.co")
    calls = fake_hub(monkeypatch, fail=AssertionError("no download expected"))
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set: unset it to download") as err:
        hub.download_stream_diffvsr(tmp_path)
    assert all(str(path) in str(err.value) for path in mine) and calls == []
    unchanged()
    hub_settings(monkeypatch, HF_HUB_OFFLINE=False, ENDPOINT="https://huggingface.co")
    fake_hub(monkeypatch, content=lambda name: b"truncated")  # the replacement is no better
    with pytest.raises(RuntimeError, match="as downloaded is not the published file"):
        hub.download_stream_diffvsr(tmp_path)
    unchanged()
    fake_hub(monkeypatch, fail=KeyboardInterrupt())  # Cancel while it downloads
    with pytest.raises(KeyboardInterrupt):
        hub.download_stream_diffvsr(tmp_path)
    unchanged()
    # online: replaced by the verified files; a NAME.mismatch the user had is not touched
    older = next(iter(mine)).with_name(next(iter(mine)).name + ".mismatch")
    older.write_bytes(b"older")
    calls = fake_hub(monkeypatch)
    hub.download_stream_diffvsr(tmp_path)
    assert sorted(tmp_path / name for _, name in calls) == sorted(mine)
    assert all(path.read_bytes() == path.relative_to(tmp_path).as_posix().encode() for path in mine)
    assert list(tmp_path.rglob("*.mismatch*")) == [older] and older.read_bytes() == b"older"


def test_raft_file_that_differs_is_kept_until_a_verified_download_replaces_it(monkeypatch, tmp_path):
    from streamvsr.models.raft import weights as raft_weights

    published = tmp_path / "published.pth"
    published.write_bytes(b"raft weights")
    prefix = hashlib.sha256(b"raft weights").hexdigest()[:8]
    target = tmp_path / "raft" / f"raft_fake-{prefix}.pth"
    target.parent.mkdir()
    target.write_bytes(b"mine")
    nowhere = (tmp_path / "nowhere.pth").as_uri()  # fails like a dead network
    monkeypatch.setitem(raft_weights.RAFT_WEIGHTS, "raft_fake", (nowhere, target.name, prefix))
    with pytest.raises(RuntimeError) as err:
        raft_weights.download_raft("raft_fake", target.parent)
    assert f"{target} was kept as it was" in str(err.value) and target.read_bytes() == b"mine"
    monkeypatch.setitem(raft_weights.RAFT_WEIGHTS, "raft_fake", (published.as_uri(), target.name, prefix))
    assert raft_weights.download_raft("raft_fake", target.parent).read_bytes() == b"raft weights"


def test_a_checked_file_is_hashed_once_per_process_while_it_is_unchanged(monkeypatch, tmp_path):
    from streamvsr.models.shared import weights

    path = tmp_path / "w.bin"
    path.write_bytes(b"x" * 1000)
    reads = []
    real_open = open
    monkeypatch.setattr(weights, "open", lambda *a, **k: reads.append(a[0]) or real_open(*a, **k), raising=False)
    assert weights.sha256_of(path) == hashlib.sha256(b"x" * 1000).hexdigest()
    assert weights.sha256_of(path) == hashlib.sha256(b"x" * 1000).hexdigest() and len(reads) == 1
    path.write_bytes(b"y" * 999)  # damaged since: hashed again
    assert weights.sha256_of(path) == hashlib.sha256(b"y" * 999).hexdigest() and len(reads) == 2


def test_offline_error_says_what_to_download(monkeypatch, tmp_path):
    fake_hub(monkeypatch, fail=OSError("[Errno -3] Temporary failure in name resolution"))
    with pytest.raises(RuntimeError) as err:
        hub.download_stream_diffvsr(tmp_path / "sr")
    message = str(err.value)
    assert "huggingface.co/Jamichsu/Stream-DiffVSR" in message and "name resolution" in message
    assert str(tmp_path / "sr") in message
    for folder in ("unet/", "controlnet/", "vae/", "text_encoder/", "tokenizer/", "scheduler/", "model_index.json"):
        assert folder in message
    assert "in controlnet/, text_encoder/, unet/, vae/: config.json and the .safetensors weights; scheduler/: " \
           "scheduler_config.json;" in message  # (the scheduler has no weights)


@pytest.mark.parametrize("errno_name, says", [("ENOSPC", "the disk is full"), ("EACCES", "no permission")])
def test_a_download_that_cannot_be_stored_says_so_not_offline(monkeypatch, tmp_path, errno_name, says):
    import errno
    import os

    from streamvsr.models.raft import weights as raft_weights

    code = getattr(errno, errno_name)
    fake_hub(monkeypatch, fail=OSError(code, os.strerror(code)))
    with pytest.raises(RuntimeError) as err:
        hub.download_stream_diffvsr(tmp_path / "sr")
    assert f"{says}" in str(err.value) and str(tmp_path / "sr") in str(err.value)
    assert "online" not in str(err.value) and "by hand" not in str(err.value)

    class Response:
        headers = {"Content-Length": "4"}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, size):
            raise OSError(code, os.strerror(code))  # writing or reading: either way this machine's failure

    monkeypatch.setattr(raft_weights.urllib.request, "urlopen", lambda url, timeout=None: Response())
    with pytest.raises(RuntimeError) as err:
        raft_weights.download_raft("raft_small", tmp_path / "raft", progress=False)
    assert says in str(err.value) and "Offline" not in str(err.value)
    assert not (tmp_path / "raft").exists()  # (nothing in it, nor the folder it made)
    # FlashVSR's prompt embedding, fetched from GitHub (the same urllib)
    from streamvsr.models.flashvsr import hub as flashvsr_hub

    (tmp_path / "flash").mkdir()
    with pytest.raises(RuntimeError) as err:
        flashvsr_hub.download_prompt(tmp_path / "flash")
    assert says in str(err.value) and "by hand" not in str(err.value)
    assert list((tmp_path / "flash").iterdir()) == []


def test_a_stopped_download_leaves_no_folder_that_lists_as_a_model(monkeypatch, tmp_path, known_hashes):
    """The loader lists a folder by its model_index.json, so that file comes last."""
    calls = fake_hub(monkeypatch)

    def stop_after_three(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hub.download_stream_diffvsr(tmp_path / "S", stop_after_three)
    assert len(calls) == 3 and not (tmp_path / "S" / "model_index.json").exists()
    assert list(hub.HUB_FILES)[-1] == "model_index.json"


def test_pinned_hashes_are_the_spec_values():
    assert hub.HUB_FILES["controlnet/diffusion_pytorch_model.safetensors"].startswith("f801cc49")
    assert hub.HUB_FILES["vae/diffusion_pytorch_model.safetensors"].startswith("26554a15")


def test_progress_counts_the_files_and_can_stop_between_them(monkeypatch, tmp_path, known_hashes):
    """What the loader nodes show and how Cancel stops a multi-GB download: between files, keeping those done."""
    calls = fake_hub(monkeypatch)
    n = len(known_hashes)
    seen = []

    def cancelled_after_three(done, total):
        seen.append((done, total))
        if done == 3:
            raise KeyboardInterrupt  # the progress callback is where the nodes check for Cancel

    with pytest.raises(KeyboardInterrupt):
        hub.download_stream_diffvsr(tmp_path / "S", cancelled_after_three)
    assert seen == [(0, n), (1, n), (2, n), (3, n)] and len(calls) == 3
    seen.clear()
    hub.download_stream_diffvsr(tmp_path / "S", lambda done, total: seen.append((done, total)))
    assert seen == [(i, n - 3) for i in range(n - 2)] and len(calls) == n


@pytest.mark.parametrize("installed,command", [("2.4.0", "hf"), ("0.34.1", "hf"), ("0.33.5", "huggingface-cli"),
                                               (None, "hf")])
def test_the_download_command_offered_exists_in_the_installed_client(monkeypatch, tmp_path, installed, command):
    import importlib.metadata

    from streamvsr.models.flashvsr import hub as flashvsr_hub

    def version(name):
        if installed is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed

    monkeypatch.setattr(importlib.metadata, "version", version)
    # only the files the pipeline reads (the repository holds more)
    expected = f"`{command} download Jamichsu/Stream-DiffVSR {' '.join(hub.HUB_FILES)} --local-dir {tmp_path}`"
    assert expected in hub.manual_instructions(tmp_path)
    assert f"`{command} download JunhaoZhuang/FlashVSR-v1.1 --local-dir" in flashvsr_hub.manual_instructions(
        "v1.1", tmp_path)
    from streamvsr.models.stream_diffvsr.loader import download_commands  # (the loader's hint for a folder)

    assert f"`{command} download Jamichsu/Stream-DiffVSR --local-dir {tmp_path}`" in download_commands(tmp_path)


def test_commands_to_paste_keep_a_path_with_spaces_one_argument(monkeypatch, tmp_path):
    import shlex

    from streamvsr.models.shared import hub as shared_hub

    dest = tmp_path / "my models" / "ü"
    command = shared_hub.download_command("Jamichsu/Stream-DiffVSR", dest, ["unet/config.json"])
    assert shlex.split(command)[-4:] == ["Jamichsu/Stream-DiffVSR", "unet/config.json", "--local-dir", str(dest)]
    assert f" --local-dir '{dest}'` on a machine" in hub.manual_instructions(dest)
    monkeypatch.setattr(shared_hub.os, "name", "nt")
    windows = shared_hub.shell_command(["hf", "download", "r", "--local-dir", r"C:\Users\John Smith\models"])
    monkeypatch.undo()
    assert windows == r'hf download r --local-dir "C:\Users\John Smith\models"'


def test_a_mirror_set_with_hf_endpoint_is_where_the_files_are_said_to_be(monkeypatch, tmp_path):
    from streamvsr.models.flashvsr import hub as flashvsr_hub

    hub_settings(monkeypatch, HF_HUB_OFFLINE=False, ENDPOINT="https://hf-mirror.example/")
    fake_hub(monkeypatch, fail=OSError("[Errno 111] Connection refused"))
    with pytest.raises(RuntimeError) as err:
        hub.download_stream_diffvsr(tmp_path)
    assert "from https://hf-mirror.example/Jamichsu/Stream-DiffVSR (" in str(err.value)
    assert "https://hf-mirror.example/Jamichsu/Stream-DiffVSR/tree/main" in str(err.value)
    assert "huggingface.co" not in str(err.value)
    assert "https://hf-mirror.example/JunhaoZhuang/FlashVSR-v1.1/tree/main" in flashvsr_hub.manual_instructions(
        "v1.1", tmp_path)


@pytest.mark.parametrize("errno_name", ["ENOTDIR", "EEXIST", "EISDIR"])
def test_something_in_the_way_is_a_local_problem_naming_the_path(monkeypatch, tmp_path, errno_name):
    import errno
    import os

    code = getattr(errno, errno_name)
    (tmp_path / "afile").write_bytes(b"")  # e.g. HF_HOME naming a file
    fake_hub(monkeypatch, fail=OSError(code, os.strerror(code), str(tmp_path / "afile" / "token")))
    with pytest.raises(RuntimeError) as err:
        hub.download_stream_diffvsr(tmp_path / "sr")
    in_the_way = tmp_path / "afile" if errno_name == "ENOTDIR" else tmp_path / "afile" / "token"
    assert f"({in_the_way}): move it away or choose another folder" in str(err.value)
    assert "by hand" not in str(err.value) and "online" not in str(err.value)


def test_flashvsr_fetches_its_dit_last_after_the_prompt(monkeypatch, tmp_path):
    """The loader lists any folder holding a DiT: a download stopped before the end must not hold one."""
    from streamvsr.models.flashvsr import hub as flashvsr_hub

    calls = fake_hub(monkeypatch)
    dit = "diffusion_pytorch_model_streaming_dmd.safetensors"
    for version, files in flashvsr_hub.FILES.items():
        monkeypatch.setitem(flashvsr_hub.FILES, version, dict.fromkeys(files))  # (the fake content has no hash)
    monkeypatch.setattr(flashvsr_hub, "download_prompt", lambda dest: calls.append(("github", "posi_prompt.pth")))

    def stop_before_the_last(done, total):
        if done == total - 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        flashvsr_hub.download_flashvsr("v1.1", tmp_path, stop_before_the_last)
    assert not (tmp_path / "FlashVSR-v1.1" / dit).exists()
    flashvsr_hub.download_flashvsr("v1.1", tmp_path)
    assert [name for _, name in calls] == ["LQ_proj_in.ckpt", "TCDecoder.ckpt", "posi_prompt.pth", dit]
    calls.clear()
    flashvsr_hub.download_flashvsr("v1.1", tmp_path)  # complete: the prompt is still checked
    assert calls == [("github", "posi_prompt.pth")]


def test_a_prompt_file_of_the_users_is_kept_not_replaced(monkeypatch, tmp_path):
    from streamvsr.models.flashvsr import hub as flashvsr_hub
    from streamvsr.models.shared.errors import DownloadError

    served = tmp_path / "served.pth"
    served.write_bytes(b"served prompt")
    monkeypatch.setattr(flashvsr_hub, "PROMPT_GIT_BLOB", flashvsr_hub.git_blob_id(served))  # as if official
    dest = tmp_path / "FlashVSR-v1.1"
    dest.mkdir()
    (dest / "posi_prompt.pth").write_bytes(b"my own prompt")
    with pytest.raises(DownloadError, match=f"{dest / 'posi_prompt.pth'} is not the official posi_prompt.pth.*kept"):
        flashvsr_hub.download_prompt(dest, url=served.as_uri())
    assert (dest / "posi_prompt.pth").read_bytes() == b"my own prompt"
    (dest / "posi_prompt.pth").unlink()
    assert flashvsr_hub.download_prompt(dest, url=served.as_uri()).read_bytes() == b"served prompt"


def test_an_empty_models_variable_or_dest_is_not_the_current_folder(monkeypatch, tmp_path):
    import argparse

    from streamvsr.cli import main
    from streamvsr.cli.options import default_models_dir, user_path
    from streamvsr.models.raft import weights as raft_weights

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STREAMVSR_MODELS", "")
    assert default_models_dir() == tmp_path / "home" / ".cache" / "streamvsr"
    monkeypatch.setenv("STREAMVSR_MODELS", "rel")
    assert default_models_dir() == tmp_path / "rel"  # absolute: the same folder wherever it is used
    with pytest.raises(argparse.ArgumentTypeError, match="an empty path"):
        user_path("")
    fetched = []
    monkeypatch.setattr(hub, "download_stream_diffvsr", lambda dest: fetched.append(dest) or dest)
    monkeypatch.setattr(raft_weights, "download_raft", lambda name, dest: fetched.append(dest) or dest / "r.pth")
    with pytest.raises(SystemExit) as exit_:
        main(["download", "--dest", ""])
    assert exit_.value.code == 2 and fetched == []
    monkeypatch.setenv("STREAMVSR_MODELS", "")
    assert main(["download"]) == 0
    assert fetched == [tmp_path / "home" / ".cache" / "streamvsr" / "Stream-DiffVSR",
                       tmp_path / "home" / ".cache" / "streamvsr" / "raft"]


def test_the_loader_hint_offers_commands_for_the_folder_given(tmp_path):
    """`streamvsr download` fills DEST/Stream-DiffVSR, and the ComfyUI entry its models folder's: offered for such
    a folder only, and the hub client's command names the real folder (the hint said FOLDER and PARENT, which
    pasted, downloaded 4 GB into ./FOLDER)."""
    import shlex

    from streamvsr.models.shared.hub import _hub_cli
    from streamvsr.models.stream_diffvsr.loader import WeightsError, load_pipeline

    for name, ours in (("my models", False), ("Stream-DiffVSR", True)):
        folder = tmp_path / name
        folder.mkdir()
        with pytest.raises(WeightsError) as e:
            load_pipeline(folder)
        text = str(e.value)
        assert f"has no unet/ folder" in text and "FOLDER" not in text and "PARENT" not in text
        commands = [shlex.split(c) for c in text.split("`")[1::2]]
        # (the hub client's command as the installed release names it, tested on its own above)
        assert [*_hub_cli("download", "Jamichsu/Stream-DiffVSR"), "--local-dir", str(folder)] in commands
        assert (["streamvsr", "download", "--dest", str(tmp_path)] in commands) == ours
        assert ("'(download) …' entry" in text) == ours


def test_the_hub_client_required_writes_real_files_into_local_dir():
    """Before 0.23, hf_hub_download(local_dir=...) left links into ~/.cache there, which a copy breaks."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for name in ("requirements.txt", "pyproject.toml"):
        found = re.search(r"huggingface_hub>=(\d+)\.(\d+)", (root / name).read_text())
        assert found and (int(found[1]), int(found[2])) >= (0, 23), name


def test_a_model_in_the_hugging_face_cache_is_taken_from_there_also_offline(monkeypatch, tmp_path, known_hashes):
    """Fetched before by the official code (diffusers' from_pretrained) or another tool, the model is in the Hugging
    Face cache: the download takes it from there, as second names of the same data, instead of 4 GB again (offline,
    it said that the files were not in the local cache)."""
    import huggingface_hub
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    repo = cache / "models--Jamichsu--Stream-DiffVSR"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    for name in hub.HUB_FILES:
        # the hub names a Git LFS file's blob by its sha256, any other by its git blob id (40 digits)
        lfs = name.endswith(".safetensors")
        digest = hashlib.sha256(name.encode()) if lfs else hashlib.sha1(name.encode())
        blob = repo / "blobs" / digest.hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(name.encode())
        link = repo / "snapshots" / "0123abcd" / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError("nothing to download")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    dest = hub.download_stream_diffvsr(tmp_path / "models")
    for name in hub.HUB_FILES:
        assert (dest / name).read_bytes() == name.encode() and not (dest / name).is_symlink()
        # weights as second names of the cache's data; small files copied, since the hub client, run on this folder
        # later as an error suggests, copies them from its cache over ours (which fails where both are one file)
        linked = (dest / name).stat().st_ino == (repo / "snapshots" / "0123abcd" / name).stat().st_ino
        assert linked == name.endswith(".safetensors"), name
    assert not list(dest.rglob(".*.streamvsr-part"))
    # a cache it cannot read is no obstacle: the file is downloaded instead (it was a traceback)
    import streamvsr.models.shared.hub as shared_hub

    shutil.rmtree(dest)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(shared_hub.shutil, "copyfile", lambda *a, **k: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied")))
    fetched = []

    def network(repo_id, filename, local_dir=None, **kwargs):
        fetched.append(filename)
        (Path(local_dir) / filename).parent.mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / filename).write_bytes(filename.encode())
        return str(Path(local_dir) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", network)
    hub.download_stream_diffvsr(tmp_path / "models")
    assert sorted(fetched) == sorted(n for n in hub.HUB_FILES if not n.endswith(".safetensors"))
    monkeypatch.undo()
    monkeypatch.setattr(hub, "HUB_FILES", known_hashes)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    # a cached file that is not the published one is not taken: offline, that one is what is missing
    shutil.rmtree(dest)
    pinned = next(name for name, sha in known_hashes.items() if sha is not None)
    (repo / "snapshots" / "0123abcd" / pinned).unlink()
    (repo / "snapshots" / "0123abcd" / pinned).write_bytes(b"another revision")
    with pytest.raises(RuntimeError, match=f"HF_HUB_OFFLINE is set: unset it to download {pinned} of "):
        hub.download_stream_diffvsr(tmp_path / "models")


def test_raft_fetched_before_by_torchvision_is_taken_from_torchs_cache(monkeypatch, tmp_path):
    import torch

    from streamvsr.models.raft import weights as raft_weights

    data = b"raft weights"
    prefix = hashlib.sha256(data).hexdigest()[:8]
    name = f"raft_fake-{prefix}.pth"
    cached = tmp_path / "torch" / "checkpoints" / name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(data)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    monkeypatch.setitem(raft_weights.RAFT_WEIGHTS, "raft_fake", ((tmp_path / "nowhere").as_uri(), name, prefix))
    got = raft_weights.download_raft("raft_fake", tmp_path / "raft")
    assert got.read_bytes() == data and got.stat().st_ino == cached.stat().st_ino
    cached.write_bytes(b"another file")  # not the published one: not taken (here: offline, an error)
    got.unlink()
    with pytest.raises(RuntimeError, match="could not download"):
        raft_weights.download_raft("raft_fake", tmp_path / "raft")


def test_a_file_set_aside_by_a_killed_or_stopped_download_is_put_back(monkeypatch, tmp_path, known_hashes, caplog):
    """Killed mid-download (a closed terminal), a run left the user's file as NAME.mismatch, never named again;
    stopped while the new file was being checked, it left the unchecked download in its place."""
    from streamvsr.models.shared import hub as shared_hub

    fake_hub(monkeypatch)
    hub.download_stream_diffvsr(tmp_path)
    pinned = tmp_path / next(name for name, sha in known_hashes.items() if sha is not None)
    pinned.with_name(pinned.name + ".mismatch").write_bytes(b"mine")  # as a killed run leaves it
    pinned.unlink()
    fake_hub(monkeypatch, fail=OSError("[Errno -3] Temporary failure in name resolution"))
    with pytest.raises(RuntimeError, match=f"Kept as they were, though their sha256 is not the published one: "
                                           f"{pinned}"):
        hub.download_stream_diffvsr(tmp_path)
    assert pinned.read_bytes() == b"mine" and not list(tmp_path.rglob("*.mismatch*"))

    def stopped(path, sha):
        raise KeyboardInterrupt  # while the fresh download is being checked

    monkeypatch.setattr(shared_hub, "check_sha256", stopped)
    fake_hub(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        hub.download_stream_diffvsr(tmp_path)
    assert pinned.read_bytes() == b"mine" and not list(tmp_path.rglob("*.mismatch*"))
    monkeypatch.undo()
    # a verified copy in place and an earlier file set aside beside it (two downloads at once): said, kept
    fake_hub(monkeypatch)
    monkeypatch.setattr(hub, "HUB_FILES", known_hashes)
    pinned.unlink()
    pinned.with_name(pinned.name + ".mismatch").write_bytes(b"mine")
    hub.download_stream_diffvsr(tmp_path)  # puts it back, then replaces it with a verified download
    pinned.with_name(pinned.name + ".mismatch").write_bytes(b"mine")
    with caplog.at_level("WARNING"):
        hub.download_stream_diffvsr(tmp_path)
    assert f"{pinned}.mismatch is an earlier" in caplog.text and pinned.with_name(pinned.name + ".mismatch").exists()


def test_a_set_aside_file_that_cannot_go_back_is_said_as_the_users_and_cache_weights_without_links_are_linked(
        monkeypatch, tmp_path, caplog):
    """A failed put-back advised deleting the user's only copy ("... is there now: delete it"); a cache without
    links (Windows without developer mode) keeps weights under their own names, which were copied (4 GB again)."""
    import huggingface_hub

    from streamvsr.models.shared import hub as shared_hub

    path = tmp_path / "posi_prompt.pth"
    aside = tmp_path / "posi_prompt.pth.mismatch"
    aside.write_bytes(b"mine")
    replace = os.replace

    def refused(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(shared_hub.os, "replace", refused)
    with caplog.at_level("WARNING"):
        shared_hub.restore_set_aside(tmp_path, ["posi_prompt.pth"])
    monkeypatch.setattr(shared_hub.os, "replace", replace)
    assert "is your posi_prompt.pth" in caplog.text and "rename it to posi_prompt.pth by hand" in caplog.text
    assert "delete" not in caplog.text and aside.read_bytes() == b"mine" and not path.exists()
    cached = tmp_path / "hf" / "snapshots" / "0123" / "unet" / "diffusion_pytorch_model.safetensors"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")  # a regular file under its own name: no link to a blob named by its sha256
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: str(cached))
    target = tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    assert shared_hub._from_cache("r/r", "unet/diffusion_pytorch_model.safetensors", target, None) is True
    assert target.stat().st_ino == cached.stat().st_ino
    # the cache has the file, but the model folder cannot take it (a full disk): offline, that is what is said, not
    # that the cache lacks it
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shared_hub.os, "link", full)
    monkeypatch.setattr(shared_hub.shutil, "copyfile", full)
    monkeypatch.setattr(shared_hub, "offline_mode", lambda: True)
    with pytest.raises(RuntimeError, match=r"HF_HUB_OFFLINE is set: unset it to download unet/diffusion_pytorch_model"
                                           r"\.safetensors of r/r into .* \(the Hugging Face cache has it, but it "
                                           r"could not be put there \(.*: No space left on device\)\)"):
        shared_hub.download_files("r/r", {"unet/diffusion_pytorch_model.safetensors": None}, tmp_path / "full", "")


def test_hub_refusals_are_one_line_and_say_what_to_check(monkeypatch, tmp_path):
    """The hub client's HTTP errors run over several lines with request ids; a 401 or a gated repository is a
    token or terms matter, not a connection one."""
    class GatedRepoError(Exception):
        pass

    fake_hub(monkeypatch, fail=GatedRepoError("401 Client Error. (Request ID: abc-123)\n\nCannot access gated repo for "
                                              "url https://huggingface.co/x.\nAccess restricted"))
    with pytest.raises(RuntimeError) as e:
        hub.download_stream_diffvsr(tmp_path)
    assert "\n" not in str(e.value) and "check your token (HF_TOKEN" in str(e.value)
    # the login command of the client installed (before 0.34 it had no `hf`)
    import importlib.metadata

    for installed, login in (("0.33.5", "`huggingface-cli login`"), ("1.2.0", "`hf auth login`")):
        monkeypatch.setattr(importlib.metadata, "version", lambda name, installed=installed: installed)
        with pytest.raises(RuntimeError, match=f"or {login}\\)"):
            hub.download_stream_diffvsr(tmp_path)


def test_flashvsr_offline_asks_nothing_of_github_and_a_set_aside_weight_is_named(monkeypatch, tmp_path):
    from streamvsr.models.flashvsr import hub as flashvsr_hub
    from streamvsr.models.stream_diffvsr.loader import WeightsError, component_weights

    hub_settings(monkeypatch, HF_HUB_OFFLINE=True, ENDPOINT="https://huggingface.co")

    def no_network(*args, **kwargs):
        raise AssertionError("offline: no request")

    monkeypatch.setattr(flashvsr_hub.urllib.request, "urlopen", no_network)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set: unset it to download posi_prompt.pth, or download "
                                           "it by hand from https://"):
        flashvsr_hub.download_prompt(tmp_path)
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "diffusion_pytorch_model.safetensors.mismatch").write_bytes(b"x")
    with pytest.raises(WeightsError, match="diffusion_pytorch_model.safetensors.mismatch was set aside by a download "
                                           r"that stopped .*\(the loader's '\(download\) …' entry, or `streamvsr "
                                           r"download`\)"):
        component_weights(vae)
