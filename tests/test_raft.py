"""RAFT against torchvision (random weights), and the on-demand correlation against the all-pairs one."""

import pytest
import torch
import torch.nn.functional as F

from streamvsr.models.raft.correlation import (AllPairsCorrelation, OnDemandCorrelation, all_pairs_bytes,
                                               select_correlation)
from streamvsr.models.raft.network import RAFT, raft_large, raft_small

tv = pytest.importorskip("torchvision.models.optical_flow")


def _reference(arch, seed=0, scale=0.01):
    torch.manual_seed(seed)
    model = getattr(tv, arch)(weights=None).eval()
    with torch.no_grad():
        for p in model.parameters():  # move away from the init so nothing cancels by accident
            p.add_(torch.randn_like(p) * scale)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _ours(ref, arch):
    model = RAFT(arch)
    model.load_state_dict(ref.state_dict(), strict=True)
    return model.eval()


def _pair(h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(1, 3, h, w, generator=g) * 2 - 1
    return a, torch.roll(a, shifts=(1, 3), dims=(-2, -1)) * 0.9


@pytest.mark.parametrize("arch", ["raft_large", "raft_small"])
def test_state_dict_matches_torchvision(arch):
    theirs = getattr(tv, arch)(weights=None).state_dict()
    ours = (raft_large if arch == "raft_large" else raft_small)().state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape for k in theirs)


@pytest.mark.parametrize("arch", ["raft_large", "raft_small"])
def test_matches_torchvision(arch):
    ref = _reference(arch)
    ours = _ours(ref, arch)
    a, b = _pair(128, 144)
    with torch.inference_mode():
        expected = ref(a, b, num_flow_updates=5)[-1]
        for corr in ("all_pairs", "on_demand"):
            got = ours(a, b, num_flow_updates=5, corr=corr)
            assert got.shape == expected.shape
            assert (got - expected).abs().max() <= 1e-4, corr
    assert expected.abs().max() > 1  # a real flow, not a near-zero field


def test_default_update_count_matches_torchvision():
    import inspect

    assert inspect.signature(tv.RAFT.forward).parameters["num_flow_updates"].default == 12
    assert inspect.signature(RAFT.forward).parameters["num_flow_updates"].default == 12


def test_odd_size_is_padded_like_manual_padding():
    # torchvision only takes multiples of 8 (and >= 128): pad by hand (edge replicate), crop its result.
    ref = _reference("raft_large", seed=4)
    ours = _ours(ref, "raft_large")
    a, b = _pair(121, 150, seed=5)
    pad = (0, 2, 0, 7)
    with torch.inference_mode():
        expected = ref(F.pad(a, pad, mode="replicate"), F.pad(b, pad, mode="replicate"),
                       num_flow_updates=3)[-1][..., :121, :150]
        got = ours(a, b, 3, corr="on_demand")
    assert got.shape == (1, 2, 121, 150)
    assert (got - expected).abs().max() <= 1e-4


def test_parts_stand_in_for_the_submodules():
    """What a compiled path hands over replaces exactly the named parts: the encoders once per image (the feature
    encoder not for an image whose features are given), the update block once per update."""
    ref = _reference("raft_small", seed=6)
    model = _ours(ref, "raft_small")
    calls = {name: 0 for name in RAFT.PARTS}

    def counting(name):
        module = getattr(model, name)

        def call(*args):
            calls[name] += 1
            return module(*args)
        return call

    parts = {name: counting(name) for name in RAFT.PARTS}
    a, b = _pair(128, 144, seed=7)
    with torch.inference_mode():
        expected = ref(a, b, num_flow_updates=4)[-1]
        got, fmap1 = model(a, b, 4, corr="all_pairs", parts=parts, return_fmap1=True)
        assert calls == {"feature_encoder": 2, "context_encoder": 1, "update_block": 4}
        assert fmap1.shape[-2:] == (128 // 8, 144 // 8)
        again = model(a, b, 4, corr="all_pairs", parts=parts, fmap2=model.feature_encoder(b))
        assert calls == {"feature_encoder": 3, "context_encoder": 2, "update_block": 8}
    assert (got - expected).abs().max() <= 1e-4
    assert torch.equal(again, got)


def test_gru_inputs_stay_channels_last_with_the_cpu_layers():
    """With the CPU layers (channels-last outputs), the update block's GRU takes channels-last maps as they come
    (no reordered copy of its 384-channel input on every update), and the flow is that of torchvision."""
    from streamvsr.models.shared.packed import packed_operations

    ref = _reference("raft_large", seed=8)
    model = RAFT("raft_large", operations=packed_operations())
    model.load_state_dict(ref.state_dict(), strict=True)
    model.eval()
    layouts = []

    def record(_module, args):
        layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))

    gru = model.update_block.recurrent_block
    hooks = [conv.register_forward_pre_hook(record) for cell in (gru.convgru1, gru.convgru2)
             for conv in (cell.convz, cell.convr, cell.convq)]
    a, b = _pair(128, 144, seed=9)
    with torch.inference_mode():
        got = model(a, b, 3, corr="on_demand")
        expected = ref(a, b, num_flow_updates=3)[-1]
    for hook in hooks:
        hook.remove()
    assert len(layouts) == 3 * 6 and all(layouts)
    assert (got - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("size", [(131, 157), (50, 70), (200, 136)])
def test_on_demand_equals_all_pairs(size):
    model = _ours(_reference("raft_small", seed=2), "raft_small")
    a, b = _pair(*size, seed=3)
    with torch.inference_mode():
        full = model(a, b, 3, corr="all_pairs")
        lazy = model(a, b, 3, corr="on_demand", block_bytes=1 << 20)  # small blocks: several chunks
    assert full.shape == (1, 2, *size)
    assert (full - lazy).abs().max() <= 1e-4


def _lookup_reference(fmap1, fmap2, coords, radius):
    """torchvision's own pyramid and lookup (its CorrBlock), independent of ours."""
    from torchvision.models.optical_flow.raft import CorrBlock

    block = CorrBlock(num_levels=4, radius=radius)
    block.build_pyramid(fmap1, fmap2)
    return block.index_pyramid(coords)


@pytest.mark.parametrize("b,h,w,radius,noise", [(1, 16, 20, 4, 0.3), (2, 17, 23, 3, 4.0), (1, 24, 40, 4, 30.0),
                                                 (1, 19, 16, 4, 200.0)])
def test_lookup_matches_torchvision_corr_block(b, h, w, radius, noise):
    # Smooth, wide-spread and wild coordinates (far outside the image too) reach the normal patches, the wide
    # patches and the per-pixel path of the on-demand lookup.
    g = torch.Generator().manual_seed(h * w)
    c = 32
    fmap1, fmap2 = torch.randn(b, c, h, w, generator=g), torch.randn(b, c, h, w, generator=g)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    coords = torch.stack([xs, ys])[None] + torch.randn(b, 2, h, w, generator=g) * noise
    coords[:, :, :3, :5] += 9.7  # a motion boundary
    with torch.inference_mode():
        expected = _lookup_reference(fmap1, fmap2, coords, radius)
        lazy = OnDemandCorrelation(fmap1, fmap2, radius, block_bytes=1 << 15)(coords)
        full = AllPairsCorrelation(fmap1, fmap2, radius)(coords)
    assert lazy.shape == expected.shape == (b, 4 * (2 * radius + 1) ** 2, h, w)
    assert (lazy - expected).abs().max() <= 1e-4
    assert (full - expected).abs().max() <= 1e-4


def test_convex_upsampling_in_bands_matches_torchvision():
    from torchvision.models.optical_flow._utils import upsample_flow

    model = _ours(_reference("raft_large", seed=7), "raft_large")
    g = torch.Generator().manual_seed(0)
    flow, hidden = torch.randn(1, 2, 13, 11, generator=g) * 3, torch.randn(1, 128, 13, 11, generator=g)
    with torch.inference_mode():
        expected = upsample_flow(flow, model.mask_predictor(hidden))
        banded = model.upsample(flow, hidden, block_bytes=1)  # one row per band
        cropped = model.upsample(flow, hidden, (99, 85), block_bytes=3 * 11 * 576 * 4 * 5)
    assert (banded - expected).abs().max() <= 1e-5
    assert (cropped - expected[..., :99, :85]).abs().max() <= 1e-5


def test_volume_size_and_auto_rule():
    # Spec §4.2: 25.63 GiB for a 2304² output, 197.75 GiB for 5120x2880 (level 0 alone), x4/3 with the pyramid.
    level0 = lambda h, w: 4 * (h * w // 64) ** 2  # noqa: E731
    assert level0(2304, 2304) / 2**30 == pytest.approx(25.63, abs=0.01)
    assert level0(2880, 5120) / 2**30 == pytest.approx(197.75, abs=0.01)
    # 360x640 features pool exactly to 180x320, 90x160, 45x80
    assert all_pairs_bytes(2880, 5120) == level0(2880, 5120) * 85 // 64
    assert all_pairs_bytes(100, 100) == all_pairs_bytes(128, 128)  # padded size
    gib = 2**30
    assert select_correlation(720, 1280, memory_bytes=16 * gib) == "all_pairs"  # 1.0 GiB
    assert select_correlation(720, 1280, memory_bytes=2 * gib) == "on_demand"  # more than a quarter
    assert select_correlation(1080, 1920, memory_bytes=1000 * gib) == "on_demand"  # over the 2 GiB cap
    assert select_correlation(1080, 1920, memory_bytes=16 * gib, batch=1) == "on_demand"


def test_auto_correlation_is_decided_once_per_shape(monkeypatch):
    """The first frame decides from the device's memory and what is free then; later frames of that size take the
    same path whatever is free by then (the paths differ by float rounding: a sequence must not mix them)."""
    from streamvsr.models.raft import network
    from streamvsr.models.shared import runtime

    gib = 2**30
    asked, free = [], [64 * gib]

    def spy(h, w, memory_bytes, batch=1, element_size=4):
        asked.append(memory_bytes)
        return select_correlation(h, w, memory_bytes, batch, element_size)

    monkeypatch.setattr(network, "select_correlation", spy)
    monkeypatch.setattr(network, "device_memory", lambda device: 16 * gib)
    monkeypatch.setattr(network, "available_memory", lambda device: free[0])
    model = raft_small().eval()
    a, b = _pair(64, 64)
    with torch.no_grad():
        model(a, b, num_flow_updates=1, corr="auto")
        free[0] = 1 << 20  # later, almost nothing is free
        model(a, b, num_flow_updates=1, corr="auto")
        assert asked == [16 * gib]  # a quarter of the device's memory: less than half of what was free
        model(*_pair(72, 64), num_flow_updates=1, corr="auto")  # another size: decided anew, from what is free
    assert asked == [16 * gib, 2 << 20]
    assert runtime.device_memory("cpu") > 0


def test_rejects_bad_arguments():
    model = RAFT("raft_small")
    a, b = _pair(128, 128)
    with pytest.raises(ValueError, match="corr"):
        model(a, b, 1, corr="volume")
    with pytest.raises(ValueError, match="images must"):
        model(a, b[..., :64], 1)
    with pytest.raises(ValueError, match="unknown RAFT"):
        RAFT("raft_huge")
