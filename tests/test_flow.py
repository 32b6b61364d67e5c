"""Flow estimator: weight files, downloads (no network), reduced resolution, visualisation, the folder command."""

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streamvsr.models.raft.estimator import FlowEstimator
from streamvsr.models.raft.network import RAFT
from streamvsr.models.raft.visualise import flow_to_image
from streamvsr.models.raft.weights import RAFT_WEIGHTS, download_raft, load_raft
from streamvsr.models.shared.errors import WeightsError
from streamvsr.video.frames import flow_folder, list_pngs


def flow_dir(in_dir, out_dir, weights, save, num_flow_updates):
    return flow_folder(load_raft(weights, num_flow_updates=num_flow_updates), list_pngs(in_dir), out_dir, save)

tv = pytest.importorskip("torchvision.models.optical_flow")


def _reference(arch, seed=0):
    torch.manual_seed(seed)
    model = getattr(tv, arch)(weights=None).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def _pair(h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(1, 3, h, w, generator=g) * 2 - 1
    return a, torch.roll(a, shifts=(2, -1), dims=(-2, -1))


@pytest.mark.parametrize("arch,suffix", [("raft_large", ".pth"), ("raft_small", ".safetensors")])
def test_torchvision_state_dict_loads_strictly(tmp_path, arch, suffix):
    ref = _reference(arch, seed=6)
    path = tmp_path / f"{arch}{suffix}"
    if suffix == ".pth":
        torch.save(ref.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    est = load_raft(path, num_flow_updates=2)
    assert isinstance(est, FlowEstimator) and est.arch == arch
    for k, v in ref.state_dict().items():
        assert torch.equal(est.raft.state_dict()[k], v), k
    if arch == "raft_small":  # one end-to-end check through the estimator (RAFT itself: test_raft.py)
        a, b = _pair(128, 136, seed=7)
        with torch.inference_mode():
            assert (est(a, b) - ref(a, b, num_flow_updates=2)[-1]).abs().max() <= 1e-4


def test_wrong_file_names_the_keys(tmp_path):
    sd = _reference("raft_small").state_dict()
    del sd["update_block.flow_head.conv2.weight"]
    sd["extra.weight"] = torch.zeros(1)
    sd["update_block.flow_head.conv1.bias"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as e:
        load_raft(path)
    text = str(e.value)
    assert "missing 1 keys: update_block.flow_head.conv2.weight" in text
    assert "unexpected 1 keys: extra.weight" in text
    assert "update_block.flow_head.conv1.bias (3,)" in text
    assert RAFT_WEIGHTS["raft_large"][0] in text  # says what to download
    # how, to both audiences (the flow loader node reads the file through the same code)
    assert "`streamvsr download` (in ComfyUI: Load RAFT Flow Model's '(download) raft_large')" in text
    torch.save({f"unet.block{i}.weight": torch.zeros(1) for i in range(500)}, path)  # another model altogether
    with pytest.raises(WeightsError) as e:
        load_raft(path)
    assert str(e.value).startswith(f"{path} holds none of torchvision's RAFT tensors (none of its 500). Use "
                                   "torchvision's RAFT weights") and "block1" not in str(e.value)
    # the original repository's checkpoints (raft-things.pth: "module.fnet.conv1.weight", ...)
    torch.save({"module.fnet.conv1.weight": torch.zeros(1),
                "module.update_block.encoder.convc1.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match="is in the original RAFT repository's format \\(princeton-vl\\), which "
                                           "this does not read. Use torchvision's RAFT weights"):
        load_raft(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a PyTorch weights file.*cut short or damaged"):
        load_raft(path)
    with pytest.raises(WeightsError, match="not exist"):
        load_raft(tmp_path / "missing.pth")


def test_a_safetensors_file_named_in_capitals_is_read_as_one(tmp_path):
    """ComfyUI lists model files by their extension in any case: RAFT.SAFETENSORS was read as a pickle and called
    damaged, with advice to delete it."""
    from safetensors.torch import save_file

    sd = _reference("raft_small").state_dict()
    path = tmp_path / "RAFT_SMALL.SAFETENSORS"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = load_raft(path).raft
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_wrapped_checkpoint_is_unwrapped(tmp_path):
    sd = _reference("raft_small").state_dict()
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    assert load_raft(path).arch == "raft_small"


def test_registry_names_carry_the_hash_prefix():
    for name, (url, filename, prefix) in RAFT_WEIGHTS.items():
        assert url.startswith("https://download.pytorch.org/models/") and url.endswith("/" + filename)
        # torchvision's naming: <name>-<first 8 hex digits of the sha256>.pth
        assert filename.startswith(name) and filename == f"{filename.rsplit('-', 1)[0]}-{prefix}.pth"
        assert len(prefix) == 8 and all(ch in "0123456789abcdef" for ch in prefix)


def _fake_published_file(folder, payload=b"fake raft weights"):
    prefix = hashlib.sha256(payload).hexdigest()[:8]
    path = folder / f"raft_fake-{prefix}.pth"
    path.write_bytes(payload)
    return path, prefix


def test_download_verifies_and_renames(tmp_path, monkeypatch):
    src, prefix = _fake_published_file(tmp_path)
    dest = tmp_path / "models"
    monkeypatch.setitem(RAFT_WEIGHTS, "raft_fake", (src.as_uri(), src.name, prefix))
    got = download_raft("raft_fake", dest, progress=False)
    assert got == dest / src.name and got.read_bytes() == src.read_bytes()
    assert not list(dest.glob("*.part"))
    assert download_raft("raft_fake", dest) == got  # a verified copy is reused
    # a corrupted download is rejected and leaves nothing behind
    monkeypatch.setitem(RAFT_WEIGHTS, "raft_bad", (src.as_uri(), "raft_bad-00000000.pth", "00000000"))
    with pytest.raises(RuntimeError, match="corrupt"):
        download_raft("raft_bad", dest)
    assert not (dest / "raft_bad-00000000.pth").exists() and not list(dest.glob("*.part"))
    # a damaged copy found where the download goes is downloaded again, and replaced once the download is verified
    # (kept as it was where the download fails: tests/test_hub.py)
    got.write_bytes(b"damaged")
    assert download_raft("raft_fake", dest).read_bytes() == src.read_bytes()
    assert not list(dest.glob("*.part"))


def test_download_reports_bytes_and_a_stop_leaves_nothing_behind(tmp_path, monkeypatch):
    src, prefix = _fake_published_file(tmp_path)
    dest = tmp_path / "models"
    monkeypatch.setitem(RAFT_WEIGHTS, "raft_fake", (src.as_uri(), src.name, prefix))
    calls = []

    def stop(done, total):
        calls.append((done, total))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download_raft("raft_fake", dest, progress=stop)
    assert calls and not dest.exists()  # (nor the folder it made)
    calls.clear()
    got = download_raft("raft_fake", dest, progress=lambda done, total: calls.append((done, total)))
    assert got.read_bytes() == src.read_bytes() and calls[-1][0] == src.stat().st_size
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_download_offline_says_what_to_do(tmp_path, monkeypatch):
    url = (tmp_path / "nowhere" / "raft_large_C_T_SKHT_V2-ff5fadd5.pth").as_uri()  # fails like a dead network
    monkeypatch.setitem(RAFT_WEIGHTS, "raft_large", (url, "raft_large_C_T_SKHT_V2-ff5fadd5.pth", "ff5fadd5"))
    with pytest.raises(RuntimeError) as e:
        download_raft("raft_large", tmp_path / "models" / "raft")
    assert "by hand" in str(e.value) and str(tmp_path / "models") in str(e.value) and url in str(e.value)
    assert not (tmp_path / "models").exists()  # the folders it made are gone again: no empty model folder
    with pytest.raises(ValueError, match="unknown RAFT weights"):
        download_raft("raft_huge", tmp_path)


class _ShiftSearch(torch.nn.Module):
    """A stand-in for RAFT with a known answer: the best global integer shift, as a constant flow field."""

    arch = "stub"

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, image1, image2, num_flow_updates, corr, fmap2=None, return_fmap1=False):
        self.seen.append(tuple(image1.shape[-2:]))
        best, err = (0, 0), float("inf")
        for dy in range(-6, 7):
            for dx in range(-6, 7):
                # image1(p) ≈ image2(p + d): compare away from the wrapped borders
                a = image1[..., 8:-8, 8:-8]
                b = torch.roll(image2, shifts=(-dy, -dx), dims=(-2, -1))[..., 8:-8, 8:-8]
                e = float((a - b).abs().mean())
                if e < err:
                    best, err = (dx, dy), e
        out = torch.zeros(image1.shape[0], 2, *image1.shape[-2:])
        out[:, 0], out[:, 1] = best
        return (out, None) if return_fmap1 else out


def _smooth_pattern(h, w):
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    return torch.stack([torch.sin(xs / 5) * torch.cos(ys / 7), torch.sin((xs + ys) / 9), torch.cos(xs / 11)])[None]


@pytest.mark.parametrize("downscale", [2, 4])
def test_reduced_resolution_scales_the_flow(downscale):
    # image2 is image1 moved by (+8, -4): image1(p) = image2(p + (8, -4)), so the flow is (8, -4) everywhere.
    img2 = _smooth_pattern(128, 160)
    img1 = torch.roll(img2, shifts=(4, -8), dims=(-2, -1))
    stub = _ShiftSearch()
    est = FlowEstimator(stub, num_flow_updates=1, downscale=downscale)
    flow = est(img1, img2)
    assert stub.seen == [(128 // downscale, 160 // downscale)]
    assert flow.shape == (1, 2, 128, 160) and flow.dtype == torch.float32
    assert torch.allclose(flow[0, 0], torch.full((128, 160), 8.0), atol=0.5)
    assert torch.allclose(flow[0, 1], torch.full((128, 160), -4.0), atol=0.5)


def test_reduced_resolution_is_raft_on_resized_images():
    ref = _reference("raft_small", seed=8)
    model = RAFT("raft_small")
    model.load_state_dict(ref.state_dict())
    a, b = _pair(256, 272, seed=9)
    half = FlowEstimator(model, num_flow_updates=2, downscale=2)
    with torch.inference_mode():
        got = half(a, b)
        small = [F.interpolate(x, size=(128, 136), mode="bilinear", antialias=True) for x in (a, b)]
        raw = ref(*small, num_flow_updates=2)[-1]
        expected = F.interpolate(raw, size=(256, 272), mode="bilinear") * 2
    assert got.shape == (1, 2, 256, 272)
    assert (got - expected).abs().max() <= 2e-4


def test_estimator_options_are_checked():
    model = RAFT("raft_small")
    with pytest.raises(ValueError, match="downscale"):
        FlowEstimator(model, downscale=3)
    with pytest.raises(ValueError, match="corr"):
        FlowEstimator(model, corr="everything")
    est = FlowEstimator(model, corr="on_demand")
    assert 0 < est.estimate_memory(2880, 5120) < 8 << 30
    assert FlowEstimator(model, corr="all_pairs").estimate_memory(720, 1280) > 1 << 30


def test_flow_to_image_matches_torchvision():
    from torchvision.utils import flow_to_image as tv_flow_to_image

    g = torch.Generator().manual_seed(0)
    flow = torch.randn(2, 24, 30, generator=g) * 3
    ours = flow_to_image(flow)
    theirs = tv_flow_to_image(flow).permute(1, 2, 0).numpy()
    assert ours.shape == (24, 30, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    assert np.array_equal(flow_to_image(flow.permute(1, 2, 0).numpy()), ours)  # H x W x 2 too


def test_an_infinite_flow_is_drawn_without_a_warning():
    """An infinite speed overflowed in the magnitude's square (a RuntimeWarning each time the node drew it); it
    is meant to be infinite: beyond any scale, and left out of the default one."""
    import warnings

    from streamvsr.models.raft.visualise import largest_speed

    flow = np.zeros((2, 3, 2), np.float32)
    flow[0, 1] = (3, 4)
    flow[1, 2] = (np.inf, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drawn = flow_to_image(flow)
        assert largest_speed(flow) == 5.0
        huge = flow_to_image(np.full((1, 1, 2), 3e38, np.float32))  # (finite, its speed beyond float32's range)
    assert np.array_equal(huge, flow_to_image(np.ones((1, 1, 2), np.float32)))
    assert np.array_equal(drawn[0, 1], flow_to_image(flow[:1, 1:2])[0, 0])  # the scale is the finite 5 px


def test_flow_to_image_basic_colours():
    flow = np.zeros((1, 4, 2), np.float32)
    flow[0, 1] = (1, 0)  # right
    flow[0, 2] = (-1, 0)  # left
    flow[0, 3] = (0, -1)  # up
    img = flow_to_image(flow).astype(int)
    assert (img[0, 0] == 255).all()  # no motion: white
    r, g, b = img[0, 1]
    assert r == 255 and g < 10 and b < 50  # right: red
    r, g, b = img[0, 2]
    assert r < 10 and g > 150 and b > 150  # left: cyan
    assert img[0, 3, 2] == 255 and img[0, 3, 1] < 10  # up: blue-violet
    half = flow_to_image(flow, max_magnitude=2).astype(int)
    assert 120 <= half[0, 2, 0] <= 135  # half the speed: half saturated


def _write_frames(folder, frames):
    from PIL import Image

    folder.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"f{i:03d}.png")


def test_flow_dir_writes_raft_of_current_and_previous(tmp_path):
    ref = _reference("raft_small", seed=10)
    weights = tmp_path / "raft_small.pth"
    torch.save(ref.state_dict(), weights)
    rng = np.random.default_rng(0)
    base = (rng.random((60, 70, 3)) * 255).astype(np.uint8)
    frames = [base, np.roll(base, 2, axis=1), np.roll(base, (1, 3), axis=(0, 1))]
    _write_frames(tmp_path / "in", frames)
    n = flow_dir(tmp_path / "in", tmp_path / "out", weights, save="npy", num_flow_updates=2)
    assert n == 2 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f001.npy", "f002.npy"]
    for i in (1, 2):
        got = np.load(tmp_path / "out" / f"f{i:03d}.npy")
        assert got.shape == (60, 70, 2) and got.dtype == np.float32
        # torchvision on the frames padded by hand to 128 x 128 (edge replicate), image1 = frame i
        cur, prev = (torch.from_numpy(frames[j]).permute(2, 0, 1)[None].float() / 255 * 2 - 1 for j in (i, i - 1))
        pad = (0, 128 - 70, 0, 128 - 60)
        with torch.inference_mode():
            expected = ref(F.pad(cur, pad, mode="replicate"), F.pad(prev, pad, mode="replicate"),
                           num_flow_updates=2)[-1][0, :, :60, :70].permute(1, 2, 0).numpy()
        assert np.abs(got - expected).max() <= 1e-4
    flow_dir(tmp_path / "in", tmp_path / "png", weights, save="png", num_flow_updates=1)
    from PIL import Image

    with Image.open(tmp_path / "png" / "f002.png") as img:
        assert img.size == (70, 60) and img.mode == "RGB"
