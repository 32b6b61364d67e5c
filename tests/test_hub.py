"""The official-checkpoint download, with a stand-in for huggingface_hub (no network)."""

import hashlib
import sys
import types

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


def test_hash_mismatch_deletes_the_file(monkeypatch, tmp_path, known_hashes):
    fake_hub(monkeypatch, content=lambda name: b"truncated")
    with pytest.raises(RuntimeError, match="controlnet/diffusion_pytorch_model.safetensors as downloaded is not the "
                                           "published file .* Download it again; if it fails the same way, the file "
                                           "on the hub has changed: update ComfyUI-StreamVSR"):
        hub.download_stream_diffvsr(tmp_path)
    assert not (tmp_path / "controlnet" / "diffusion_pytorch_model.safetensors").exists()
    # a corrupt file left from before is caught without any download
    fake_hub(monkeypatch)
    hub.download_stream_diffvsr(tmp_path)
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"bad")
    calls = fake_hub(monkeypatch, fail=AssertionError("no network expected"))
    with pytest.raises(RuntimeError, match="corrupt"):
        hub.download_stream_diffvsr(tmp_path)
    assert calls == []


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
    assert list((tmp_path / "raft").iterdir()) == []
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
