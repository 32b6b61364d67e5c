"""CPU layers with oneDNN weights reordered once (models/shared/packed.py): the plain layers' numbers up to float
rounding (Winograd convolutions: within 2e-5 of the output's scale of a float64 reference), their parameters and
keys, the plain path wherever they cannot help, a fresh copy when the weight changes, and ComfyUI's cast path when
mixed under its layer classes. The whole Stream-DiffVSR engine built with them stays within 1e-4 of the plain
one."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from streamvsr.models.shared import packed
from streamvsr.models.shared.packed import PackedConv2d, PackedLinear, forget_packed, packed_operations
from streamvsr.models.shared.tensor_key import TensorKey

pytestmark = pytest.mark.skipif(not packed._ops_available(), reason="this PyTorch has no oneDNN operators")


def _conv_pair(cin, cout, k, **kw):
    torch.manual_seed(0)
    plain = nn.Conv2d(cin, cout, k, **kw)
    fast = PackedConv2d(cin, cout, k, **kw)
    fast.load_state_dict(plain.state_dict())
    return plain, fast


@pytest.mark.parametrize("cin,cout,k,kw,size", [
    (16, 32, 3, dict(padding=1), (12, 20)),            # small input: reordered weight kept
    (16, 32, 3, dict(padding=1), (70, 70)),            # large input: weight as stored
    (8, 8, 3, dict(padding=1, stride=2, bias=False), (15, 9)),
    (12, 6, 1, dict(), (10, 10)),
    (8, 16, (5, 1), dict(padding=(2, 0)), (9, 11)),
    (8, 8, 3, dict(padding=1, groups=4), (10, 10)),
    (4, 4, 3, dict(padding=2, dilation=2), (10, 10)),
])
def test_conv_matches_the_plain_layer(cin, cout, k, kw, size):
    plain, fast = _conv_pair(cin, cout, k, **kw)
    x = torch.randn(1, cin, *size)
    with torch.inference_mode():
        expected, got = plain(x), fast(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (fast._packed is not None) == (size[0] * size[1] <= packed.PACK_MAX_PIXELS)


def test_conv_keeps_the_state_dict_and_follows_weight_changes():
    plain, fast = _conv_pair(8, 8, 3, padding=1)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(1, 8, 10, 10)
    with torch.no_grad():
        fast(x)
        first = fast._packed[1]
        fast.weight.mul_(2)  # in place: the version counter moves
        plain.weight.mul_(2)
        assert (fast(x) - plain(x)).abs().max() <= 1e-5 * plain(x).abs().max()
        assert fast._packed[1] is not first
        fast.weight = nn.Parameter(torch.zeros_like(fast.weight))  # replaced (as a model patcher does)
        assert torch.equal(fast(x), fast.bias.view(1, -1, 1, 1).expand(1, 8, 10, 10))
        fast(torch.randn(1, 8, 6, 7))  # another input size: packed again for it
        assert fast._packed[0] == TensorKey((fast.weight, None), (1, 8, 6, 7))


def test_conv_runs_the_plain_layer_where_packing_cannot_apply():
    _, fast = _conv_pair(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    y = fast(x)  # autograd: the plain layer, gradients flow
    y.sum().backward()
    assert x.grad is not None and fast._packed is None
    with torch.inference_mode():
        half = fast.to(torch.bfloat16)
        out = half(x.detach().to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and fast._packed is None
    reflect = PackedConv2d(4, 4, 3, padding=1, padding_mode="reflect")
    with torch.inference_mode():
        xr = torch.randn(1, 4, 8, 8)
        assert torch.equal(reflect(xr), F.conv2d(F.pad(xr, (1, 1, 1, 1), mode="reflect"), reflect.weight,
                                                 reflect.bias))


def test_conv_without_onednn_runs_the_plain_layer(monkeypatch):
    plain, fast = _conv_pair(4, 4, 3, padding=1)
    monkeypatch.setattr(packed, "_AVAILABLE", [False])
    x = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        assert torch.equal(fast(x), plain(x))
    assert fast._packed is None


@pytest.mark.parametrize("shape", [(1, 64, 32), (3, 32), (1, 5000, 32)])
def test_linear_matches_the_plain_layer(shape):
    torch.manual_seed(0)
    plain = nn.Linear(32, 48)
    fast = PackedLinear(32, 48)
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(*shape)
    with torch.inference_mode():
        expected, got = plain(x), fast(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert fast._packed is not None


def _conv_reference(x, conv):
    """The convolution in float64: an independent reference for both the direct and the Winograd path."""
    bias = None if conv.bias is None else conv.bias.double()
    return F.conv2d(x.double(), conv.weight.double(), bias, padding=1)


@pytest.mark.parametrize("n,cin,cout,size,bias", [
    (1, 128, 128, (16, 16), True),     # whole tiles, one band
    (1, 96, 130, (17, 23), True),      # partial tiles on the bottom and right edges
    (2, 100, 96, (30, 9), False),      # a batch, no bias
])
def test_winograd_matches_the_convolution(n, cin, cout, size, bias):
    _, fast = _conv_pair(cin, cout, 3, padding=1, bias=bias)
    x = torch.randn(n, cin, *size)
    with torch.inference_mode():
        assert fast.uses_winograd(x)
        got = fast(x)
    expected = _conv_reference(x, fast)
    assert got.shape == expected.shape and got.is_contiguous(memory_format=torch.channels_last)
    # Winograd F(4x4, 3x3) rounds a few times more than a direct convolution (its transforms have
    # coefficients up to 8) but stays within 2e-5 of the output's scale
    assert (got.double() - expected).abs().max() <= 2e-5 * expected.abs().max()
    assert fast._winograd is not None and fast._packed is None


def test_winograd_bands_and_reused_buffers_give_the_same_result(monkeypatch):
    _, fast = _conv_pair(96, 96, 3, padding=1)
    large, small = torch.randn(1, 96, 26, 21), torch.randn(1, 96, 16, 17)
    with torch.inference_mode():
        whole = fast(large)
        after = fast(small)  # a smaller input after a larger one: buffers are reused, not misread
        monkeypatch.setattr(packed, "WINOGRAD_BAND_BYTES", 1)  # one row of tiles per band, fresh buffers
        banded = fast(large)
        # at most 3 of the 7 tile rows per band: 3 bands of 3, the last one padded with 2 rows of zero tiles
        monkeypatch.setattr(packed, "WINOGRAD_BAND_BYTES", 3 * 36 * 6 * 96 * 4)
        assert packed.winograd_bands(26, 21, 96, 4) == (3, 3)
        padded = fast(large)
    assert torch.equal(banded, whole) and torch.equal(padded, whole)
    assert (after.double() - _conv_reference(small, fast)).abs().max() <= 2e-5 * after.abs().max()


def test_winograd_applies_only_to_wide_3x3_convolutions_on_large_enough_maps():
    x = torch.randn(1, 128, 16, 16)
    assert PackedConv2d(128, 128, 3, padding=1).uses_winograd(x)
    assert not PackedConv2d(128, 128, 3, padding=1).uses_winograd(x[..., :15])  # 240 < 256 positions
    assert not PackedConv2d(128, 64, 3, padding=1).uses_winograd(x)  # too narrow to pay
    assert not PackedConv2d(128, 128, 3, padding=1, stride=2).uses_winograd(x)
    assert not PackedConv2d(128, 128, 3, padding=2, dilation=2).uses_winograd(x)
    assert not PackedConv2d(128, 128, 3, padding=1, groups=2).uses_winograd(x)
    assert not PackedConv2d(128, 128, 1).uses_winograd(x)


def test_winograd_kernel_follows_weight_changes():
    plain, fast = _conv_pair(96, 96, 3, padding=1)
    x = torch.randn(1, 96, 16, 16)
    with torch.no_grad():
        fast(x)
        first = fast._winograd[1]
        fast.weight.mul_(-0.5)
        plain.weight.mul_(-0.5)
        expected = plain(x)
        assert (fast(x) - expected).abs().max() <= 2e-5 * expected.abs().max()
        assert fast._winograd[1] is not first


def _kept_copy_case(kind):
    """(layer, input, its call, the plain arithmetic of that call for a given weight and bias) for each kind of
    weight copy the packed layers keep."""
    torch.manual_seed(1)
    if kind in ("linear", "gated"):
        layer, x = PackedLinear(16, 24), torch.randn(1, 5, 16)
        if kind == "linear":
            return layer, x, layer, lambda w, b: F.linear(x, w, b)

        def geglu(w, b):
            h, gate = F.linear(x, w, b).chunk(2, dim=-1)
            return h * F.gelu(gate)
        return layer, x, layer.gated_gelu, geglu
    channels, size = (96, 16) if kind == "winograd" else (8, 6)
    layer, x = PackedConv2d(channels, channels, 3, padding=1), torch.randn(1, channels, size, size)
    if kind == "upsampled":
        return layer, x, layer.upsampled, lambda w, b: F.conv2d(F.interpolate(x, scale_factor=2.0), w, b, padding=1)
    return layer, x, layer, lambda w, b: F.conv2d(x, w, b, padding=1)


def _alias(storage: torch.Tensor) -> nn.Parameter:
    """A new parameter over ``storage``'s memory with a version counter of its own."""
    t = torch.empty(0).set_(storage.untyped_storage(), 0, storage.shape, storage.stride())
    return nn.Parameter(t, requires_grad=False)


@pytest.mark.parametrize("kind", ["linear", "gated", "conv", "winograd", "upsampled"])
def test_a_new_weight_at_the_old_weights_address_is_not_taken_for_it(kind):
    # What the allocator does when a patched weight replaces one that was just freed: same address, same version.
    layer, x, call, reference = _kept_copy_case(kind)
    memory = layer.weight.detach().clone()
    layer.weight = old = _alias(memory)
    with torch.inference_mode():
        call(x)
    memory.copy_(torch.randn_like(memory))  # another weight in the same memory
    layer.weight = new = _alias(memory)
    assert (new.data_ptr(), new._version) == (old.data_ptr(), old._version)
    with torch.inference_mode():
        expected, got = reference(memory, layer.bias), call(x)
    assert (got - expected).abs().max() <= 2e-5 * expected.abs().max()


def test_a_tensor_key_keeps_no_tensor_alive_and_a_gone_tensor_matches_nothing():
    import gc
    import weakref

    t = torch.zeros(3)
    key, ref = TensorKey((t, None), (1,)), weakref.ref(t)
    assert key == TensorKey((t, None), (1,))
    assert key != TensorKey((t, None), (2,)) and key != TensorKey((t, t), (1,))
    assert key != TensorKey((t.clone(), None), (1,))
    del t
    gc.collect()
    assert ref() is None
    assert all(key != TensorKey((torch.zeros(3), None), (1,)) for _ in range(4))


@pytest.mark.parametrize("kind", ["gated", "upsampled"])
@pytest.mark.parametrize("in_place", [True, False])
def test_copies_that_hold_the_bias_follow_its_changes(kind, in_place):
    layer, x, call, reference = _kept_copy_case(kind)
    with torch.inference_mode():
        call(x)
    change = torch.randn_like(layer.bias)
    if in_place:
        with torch.no_grad():
            layer.bias.add_(change)  # the bias's version counter moves
    else:
        layer.bias = nn.Parameter(layer.bias + change, requires_grad=False)
    with torch.inference_mode():
        expected, got = reference(layer.weight, layer.bias), call(x)
    assert (got - expected).abs().max() <= 2e-5 * expected.abs().max()


@pytest.mark.parametrize("kind", ["linear", "gated", "conv", "winograd", "upsampled"])
def test_forget_packed_drops_copies_after_a_change_pytorch_does_not_count(kind):
    layer, x, call, reference = _kept_copy_case(kind)
    module = nn.Sequential(layer)
    with torch.inference_mode():
        call(x)
    layer.weight.data.mul_(-2)  # ``.data`` has a version counter of its own: no key can see this
    assert forget_packed(module) == 1
    assert forget_packed(module) == 0
    with torch.inference_mode():
        expected, got = reference(layer.weight, layer.bias), call(x)
    assert (got - expected).abs().max() <= 2e-5 * expected.abs().max()


@pytest.mark.parametrize("kind", ["linear", "gated", "conv", "winograd", "upsampled"])
def test_a_cast_there_and_back_drops_the_copies_and_a_move_that_changes_nothing_keeps_them(kind):
    """``.half().float()`` swaps the weights' data for rounded values under the same Parameter, often at the old
    address and with the old version (no key can tell): the copies must go. ``.to`` the device they are on
    replaces nothing, and a rebuild of every copy on each ComfyUI load would cost seconds."""
    layer, x, call, reference = _kept_copy_case(kind)
    with torch.inference_mode():
        call(x)
    held = [getattr(layer, slot) for slot in layer.COPIES]
    assert any(h is not None for h in held)
    layer.to("cpu", torch.float32)
    assert all(getattr(layer, slot) is h for slot, h in zip(layer.COPIES, held))
    layer.half().float()
    assert all(getattr(layer, slot) is None for slot in layer.COPIES)
    with torch.inference_mode():
        expected, got = reference(layer.weight, layer.bias), call(x)
    assert (got - expected).abs().max() <= 2e-5 * expected.abs().max()


def test_a_network_with_packed_copies_and_operators_deep_copies_and_pickles():
    """Like a plain network (a third-party node may copy a model): the copies (oneDNN tensors, which cannot be
    copied) and the compile-operator handle (it names the original layer) are left out, and the copy computes the
    same."""
    import copy
    import pickle

    torch.manual_seed(0)
    ops = packed_operations()
    net = nn.Sequential(ops.Conv2d(128, 128, 3, padding=1), nn.Flatten(2), ops.Linear(256, 16))
    x = torch.randn(1, 128, 16, 16)
    assert packed.prepare_packed(net) == 1 and packed.as_operators(net) == 2
    with torch.inference_mode():
        want = net(x)
    for twin in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert twin[0]._operator is None and twin[0]._winograd is None and twin[2]._packed is None
        with torch.inference_mode():
            assert torch.equal(twin(x), want)
    assert net[0]._operator is not None and net[0]._winograd is not None  # the original keeps its own


class _CastFlags:
    comfy_cast_weights = False
    weight_function = []
    bias_function = []


class _ComfyLikeOps:
    """Layers shaped like ComfyUI's ``comfy.ops`` classes (ComfyUI is not installed for these tests): a forward
    that takes the cast path while the layer is cast or patched, and the torch layer's forward otherwise."""

    cast_calls = []

    class Conv2d(nn.Conv2d, _CastFlags):
        def forward(self, *args, **kwargs):
            if self.comfy_cast_weights or self.weight_function or self.bias_function:
                _ComfyLikeOps.cast_calls.append(self)
                return self._conv_forward(args[0], self.weight, self.bias)
            return super().forward(*args, **kwargs)

    class Linear(nn.Linear, _CastFlags):
        def forward(self, *args, **kwargs):
            if self.comfy_cast_weights or self.weight_function or self.bias_function:
                _ComfyLikeOps.cast_calls.append(self)
                return F.linear(args[0], self.weight, self.bias)
            return super().forward(*args, **kwargs)

    GroupNorm = nn.GroupNorm


def test_operations_over_comfy_layers_keep_their_cast_path():
    ops = packed_operations(base=_ComfyLikeOps)
    assert packed_operations(base=_ComfyLikeOps).Conv2d is ops.Conv2d  # one mixed class, not one per call
    assert ops.GroupNorm is nn.GroupNorm
    torch.manual_seed(0)
    conv = ops.Conv2d(96, 96, 3, padding=1)
    linear = ops.Linear(16, 32)
    assert isinstance(conv, _ComfyLikeOps.Conv2d) and isinstance(conv, PackedConv2d)
    assert isinstance(linear, _ComfyLikeOps.Linear) and isinstance(linear, PackedLinear)
    x, t = torch.randn(1, 96, 16, 16), torch.randn(1, 5, 16)
    _ComfyLikeOps.cast_calls.clear()
    with torch.inference_mode():
        y = conv(x)  # not cast: the packed path (here Winograd) under the comfy class's forward
        assert conv._winograd is not None and not _ComfyLikeOps.cast_calls
        assert (y.double() - _conv_reference(x, conv)).abs().max() <= 2e-5 * y.abs().max()
        gelu = linear.gated_gelu(t)
        assert linear._halves is not None
        conv.comfy_cast_weights = linear.comfy_cast_weights = True  # ComfyUI casts on the fly from now on
        assert not conv.can_fold_upsample(x)
        assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
        h, gate = F.linear(t, linear.weight, linear.bias).chunk(2, dim=-1)
        assert torch.equal(linear.gated_gelu(t), h * F.gelu(gate))
        assert (gelu - h * F.gelu(gate)).abs().max() <= 1e-5 * gelu.abs().max()
    assert _ComfyLikeOps.cast_calls == [conv, linear]


def test_operations_namespace_swaps_only_conv_and_linear():
    ops = packed_operations()
    assert ops.Conv2d is PackedConv2d and ops.Linear is PackedLinear
    assert ops.GroupNorm is nn.GroupNorm and ops.Conv1d is nn.Conv1d and ops.LayerNorm is nn.LayerNorm


def _compare_engines(tmp_path, seed):
    """The engine `load_engine` builds on the CPU (packed layers) against plain layers, three frames: the fast
    engine, after checking every frame and the carried decoder output are within 1e-4."""
    pytest.importorskip("diffusers")
    from helpers import make_tiny_checkpoint, make_tiny_raft

    from streamvsr.models.raft.weights import load_raft
    from streamvsr.models.stream_diffvsr import load_engine
    from streamvsr.models.stream_diffvsr.engine import StreamEngine
    from streamvsr.models.stream_diffvsr.loader import load_pipeline

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    raft = make_tiny_raft(tmp_path / "raft.pth")
    fast = load_engine(ckpt, flow=raft)  # what the command line runs on the CPU
    assert isinstance(fast.pipeline.unet.conv_in, PackedConv2d)
    linears = [m for m in fast.pipeline.modules() if isinstance(m, PackedLinear)]
    once = [m for m in linears if m.single_use]  # the prompt's keys and values: computed once, no copy kept
    pipe = fast.pipeline
    assert once and len(once) == 2 * len(pipe.unet.cross_attentions + pipe.controlnet.cross_attentions)
    assert all(m._halves if m.gated else m._packed for m in linears if not m.single_use)  # prepared at load
    assert not any(m._packed for m in once)
    plain = StreamEngine(load_pipeline(ckpt), load_raft(raft))
    assert type(plain.pipeline.unet.conv_in) is nn.Conv2d
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, 40, 48, generator=g)
    s1, s2 = fast.new_state(7), plain.new_state(7)
    for i in range(3):
        frame = base[:, i: i + 32, 2 * i: 2 * i + 40]
        a, s1 = fast.step(frame, s1)
        b, s2 = plain.step(frame, s2)
        assert (a - b).abs().max() <= 1e-4, f"frame {i}"
    assert (s1.prev_output - s2.prev_output).abs().max() <= 1e-4
    assert not any(m._packed for m in once)  # still none after the frames
    return fast


def test_engine_with_packed_layers_is_close_to_the_plain_one(tmp_path):
    fast = _compare_engines(tmp_path, seed=3)
    assert any(m._packed is not None for m in fast.pipeline.unet.modules() if isinstance(m, PackedConv2d))


def test_engine_with_winograd_convolutions_is_close_to_the_plain_one(tmp_path, monkeypatch):
    """The tiny checkpoint's layers are too narrow for the Winograd rule; lowered, every 3x3 convolution of the
    UNet, the ControlNet and RAFT on 16x16 or more runs it, through four steps and the flow of three frames."""
    monkeypatch.setattr(packed, "WINOGRAD_MIN_CHANNELS", 1)
    fast = _compare_engines(tmp_path, seed=5)
    for network in (fast.pipeline.unet, fast.pipeline.controlnet):
        assert any(m._winograd is not None for m in network.modules() if isinstance(m, PackedConv2d))


@pytest.mark.parametrize("size,bias", [((5, 7), True), ((70, 66), True), ((8, 8), False)])
def test_folded_upsample_matches_nearest_then_conv(size, bias):
    plain, fast = _conv_pair(6, 10, 3, padding=1, bias=bias)
    x = torch.randn(2, 6, *size)
    with torch.inference_mode():
        expected = plain(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        assert fast.can_fold_upsample(x)
        got = fast.upsampled(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_folded_upsample_applies_only_to_plain_3x3_convolutions():
    x = torch.randn(1, 4, 6, 6)
    with torch.inference_mode():
        assert not PackedConv2d(4, 4, 3, padding=1, stride=2).can_fold_upsample(x)
        assert not PackedConv2d(4, 4, 1).can_fold_upsample(x)
        assert not PackedConv2d(4, 4, 3, padding=1, groups=2).can_fold_upsample(x)
        assert not PackedConv2d(4, 4, 3, padding=1).can_fold_upsample(x.double())
    assert not PackedConv2d(4, 4, 3, padding=1).can_fold_upsample(x.requires_grad_())


def test_unet_upsampler_folds_only_an_exact_doubling():
    from streamvsr.models.stream_diffvsr.unet import Upsample2D

    torch.manual_seed(0)
    plain = Upsample2D(8)
    fast = Upsample2D(8, operations=packed_operations())
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(1, 8, 5, 6)
    calls = []
    fast.conv.upsampled = lambda t, f=fast.conv.upsampled: calls.append(1) or f(t)
    with torch.inference_mode():
        for size in (None, (10, 12), (9, 11)):  # (9, 11): the ceil-rounded skip of an odd latent
            expected, got = plain(x, size), fast(x, size)
            assert got.shape == expected.shape
            assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert len(calls) == 2


@pytest.mark.parametrize("small", [True, False])
@pytest.mark.parametrize("corr", ["all_pairs", "on_demand"])
def test_raft_with_packed_layers_gives_the_same_flow(tmp_path, small, corr):
    pytest.importorskip("torchvision")
    from helpers import make_tiny_raft

    from streamvsr.models.raft.weights import load_raft

    path = make_tiny_raft(tmp_path / "raft.pth", small=small)
    plain = load_raft(path, corr=corr)
    fast = load_raft(path, corr=corr, operations=packed_operations())
    g = torch.Generator().manual_seed(2)
    a, b, c = (torch.rand(1, 3, 64, 96, generator=g) * 2 - 1 for _ in range(3))
    expected = plain(b, a)
    flow, features = fast.flow_and_features(b, a)
    assert (flow - expected).abs().max() <= 1e-3  # pixels
    # the carried features still give the flow of a fresh call
    assert torch.equal(fast.flow_and_features(c, b, features)[0], fast(c, b))


@pytest.mark.parametrize("bias", [True, False])
def test_gated_gelu_matches_geglu(bias):
    from streamvsr.models.stream_diffvsr.unet import GEGLU

    torch.manual_seed(0)
    plain = GEGLU(32, 64)
    fast = GEGLU(32, 64, operations=packed_operations())
    if not bias:
        plain.proj.bias = fast.proj.bias = None
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(1, 50, 32)
    with torch.inference_mode():
        expected, got = plain(x), fast(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert fast.proj._halves is not None and fast.proj._packed is None
    with torch.no_grad():  # plain arithmetic where oneDNN does not apply (here: another dtype)
        assert torch.equal(fast.double()(x.double()), plain.double()(x.double()))


def test_prepare_makes_the_linear_copies_before_the_first_call():
    from streamvsr.models.stream_diffvsr.unet import FeedForward

    torch.manual_seed(0)
    ops = packed_operations()
    net = nn.Sequential(ops.Linear(32, 32), FeedForward(32, operations=ops))
    net.append(nn.Linear(32, 8))  # a plain layer: nothing to prepare
    x = torch.randn(1, 20, 32)
    with torch.inference_mode():
        lazy = net(x)
    fresh = nn.Sequential(ops.Linear(32, 32), FeedForward(32, operations=ops), nn.Linear(32, 8))
    fresh.load_state_dict(net.state_dict())
    linear, geglu = fresh[0], fresh[1].net[0].proj
    assert packed.prepare_packed(fresh) == 3  # the first layer, the GEGLU and the feed-forward's output layer
    assert linear._packed is not None and linear._halves is None
    assert geglu.gated and geglu._halves is not None and geglu._packed is None  # only the copy its calls use
    prepared = (linear._packed[1], geglu._halves[1])
    with torch.inference_mode():
        got = fresh(x)
    assert torch.equal(got, lazy)  # the same copies, made earlier
    assert linear._packed[1] is prepared[0] and geglu._halves[1] is prepared[1]  # and used, not remade


def test_prepare_skips_layers_the_packed_path_would_not_run():
    ops = packed_operations(base=_ComfyLikeOps)
    managed, double = ops.Linear(16, 16), PackedLinear(16, 16, dtype=torch.float64)
    managed.comfy_cast_weights = True
    assert packed.prepare_packed(nn.Sequential(managed, double)) == 0
    assert managed._packed is None and double._packed is None


class _GatedNet(nn.Module):
    """Each kind of packed call (Winograd and reordered convolutions, a linear layer, a GEGLU) with plain
    operations between them, for the torch.compile tests."""

    def __init__(self, ops):
        from streamvsr.models.stream_diffvsr.unet import GEGLU

        super().__init__()
        self.conv = ops.Conv2d(96, 96, 3, padding=1)
        self.norm = nn.GroupNorm(8, 96)
        self.head = ops.Conv2d(96, 16, 1)
        self.linear = ops.Linear(16, 16)
        self.geglu = GEGLU(16, 32, operations=ops)

    def forward(self, x):
        y = self.head(F.silu(self.norm(self.conv(x))) + x)
        t = y.flatten(2).transpose(1, 2)
        return self.geglu(self.linear(t) + t)


def _graph_targets(net, x):
    """Compiles ``net`` with a backend that records the traced graph and runs it as traced; (targets, output)."""
    graphs = []

    def record(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.inference_mode():
        out = torch.compile(net, backend=record, dynamic=False)(x)
    return {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op.startswith("call_")}, out


def test_compile_keeps_marked_packed_layers_as_operators():
    torch.manual_seed(0)
    net = _GatedNet(packed_operations())
    x = torch.randn(1, 96, 16, 16)
    with torch.inference_mode():
        expected = net(x)
    plain = ("conv2d", "linear", "gelu")
    targets, _ = _graph_targets(net, x)  # unmarked: the plain layers are traced
    assert not any("streamvsr" in t for t in targets)
    assert all(any(name in t for t in targets) for name in plain)
    assert packed.as_operators(nn.Sequential(nn.Conv2d(4, 4, 1), nn.Linear(4, 4))) == 0  # plain layers: none
    assert packed.as_operators(net) == 4
    targets, got = _graph_targets(net, x)
    assert {"streamvsr.packed_conv2d", "streamvsr.packed_linear", "streamvsr.packed_gated_gelu"} <= targets
    assert not any(name in t for t in targets for name in plain if "streamvsr" not in t)
    assert net.conv._winograd is not None and net.head._packed is not None  # the packed layers ran
    assert net.linear._packed is not None and net.geglu.proj._halves is not None
    assert torch.equal(got, expected)  # the same calls as eager, in the same order
    handle = net.conv._operator
    del net, targets
    import gc

    gc.collect()
    assert handle not in packed._OPERATOR_LAYERS  # forgotten with the layer


def test_compiled_network_with_packed_operators_is_close_to_eager():
    torch._dynamo.reset()
    try:  # Inductor itself, on something trivial: a failure with the network below is a failure of the test
        torch.compile(lambda t: t * 2 + 1)(torch.ones(4))
    except Exception as e:  # noqa: BLE001 - no C++ compiler for Inductor on this machine
        pytest.skip(f"torch.compile (Inductor) is unavailable here: {type(e).__name__}: {e}"[:300])
    torch.manual_seed(0)
    net = _GatedNet(packed_operations())
    packed.as_operators(net)
    x = torch.randn(1, 96, 16, 16)
    with torch.inference_mode():
        expected = net(x)
        got = torch.compile(net, dynamic=False)(x)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_a_second_copy_of_the_module_gets_its_own_operators(monkeypatch):
    """The pack imported twice in one process (under two names): each copy's layers reach their own registry."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"{packed.__package__}.packed_second_copy", packed.__file__)
    second = importlib.util.module_from_spec(spec)
    # registered by name as ComfyUI does with a node pack (Dynamo imports a module by name to trace into it)
    monkeypatch.setitem(sys.modules, spec.name, second)
    spec.loader.exec_module(second)
    first_net, second_net = _GatedNet(packed_operations()), _GatedNet(second.packed_operations())
    second_net.load_state_dict(first_net.state_dict())
    packed.as_operators(first_net)
    second.as_operators(second_net)
    x = torch.randn(1, 96, 16, 16)
    first_targets, first_out = _graph_targets(first_net, x)
    second_targets, second_out = _graph_targets(second_net, x)
    ours = {t.split(".")[0] for t in first_targets if t.startswith("streamvsr")}
    theirs = {t.split(".")[0] for t in second_targets if t.startswith("streamvsr")}
    assert len(ours) == len(theirs) == 1 and ours != theirs
    # (the GEGLU knows the first copy's class only, so the second copy's runs unfused: rounding differs)
    assert (first_out - second_out).abs().max() <= 1e-5 * first_out.abs().max()


def test_winograd_kernels_are_made_by_the_first_call_for_its_size_and_dropped_when_unused(monkeypatch):
    """Not at load (``prepare_packed``): the layout depends on the input size, and a kernel made ahead in the
    transform's own layout stayed allocated beside its laid-out copy."""
    torch.manual_seed(0)
    conv = PackedConv2d(96, 96, 3, padding=1)
    others = PackedConv2d(96, 96, 1), PackedConv2d(256, 256, 3, padding=1)
    assert packed.prepare_packed(nn.Sequential(conv, *others)) == 0
    assert conv._winograd is None and conv._packed is None
    made = []
    transform = packed.winograd_kernel
    monkeypatch.setattr(packed, "winograd_kernel", lambda weight: made.append(1) or transform(weight))
    x, wider = torch.randn(1, 96, 16, 16), torch.randn(1, 96, 16, 32)  # 16 and 32 tiles per band
    with torch.inference_mode():
        y = conv(x)
        laid_out = conv._winograd[1]
        assert torch.equal(conv(x), y) and conv._winograd[1] is laid_out and len(made) == 1  # kept for this size
        assert (y.double() - _conv_reference(x, conv)).abs().max() <= 2e-5 * y.abs().max()
        z = conv(wider)  # another band size: laid out again
        assert conv._winograd[1] is not laid_out and len(made) == 2
        assert (z.double() - _conv_reference(wider, conv)).abs().max() <= 2e-5 * z.abs().max()
        conv(torch.randn(1, 96, 8, 8))  # below WINOGRAD_MIN_PIXELS: the direct path, the kernel goes
        assert conv._winograd is None and conv._packed is not None
        conv(x)
        assert conv._winograd is not None and conv._packed is None
        conv.upsampled(torch.randn(1, 96, 8, 8))  # the folded upsample has its own kernels
    assert conv._winograd is None and conv._phases is not None
