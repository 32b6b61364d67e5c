"""The engine's savings change no number: with them (``reuse=True``, the default) the frames are bit-identical to
the plain per-step arithmetic (``reuse=False``, run on a separately loaded model so no saving leaks into it).

Saved: the prompt's cross-attention keys/values (once per model), each timestep's embeddings (once per model),
the ControlNet conditioning embedding (once per frame) and RAFT's features of the previous frame (carried in the
state). The compiled path is checked against eager within 1e-4.
"""

import pytest
import torch

from helpers import make_tiny_checkpoint, make_tiny_raft

pytest.importorskip("diffusers")

import streamvsr.models.shared.norms as norms  # noqa: E402
from streamvsr.models.raft.weights import load_raft  # noqa: E402
from streamvsr.models.stream_diffvsr.engine import StreamEngine, StreamState, new_state  # noqa: E402
from streamvsr.models.stream_diffvsr.loader import load_pipeline  # noqa: E402
from streamvsr.models.stream_diffvsr.unet import PromptKV, StepEmbedding  # noqa: E402

LR_H, LR_W = 32, 40


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def raft_path(tmp_path_factory):
    return make_tiny_raft(tmp_path_factory.mktemp("raft") / "raft_small.pth")


@pytest.fixture(scope="module")
def frames():
    g = torch.Generator().manual_seed(11)
    base = torch.rand(3, LR_H + 8, LR_W + 8, generator=g)
    return [base[:, i: i + LR_H, 2 * i: 2 * i + LR_W].contiguous() for i in range(3)]


def _run(engine, frames, state):
    outs = []
    for f in frames:
        hr, state = engine.step(f, state)
        outs.append(hr)
    return outs, state


@pytest.fixture(scope="module")
def plain(checkpoint, raft_path):
    """The per-step arithmetic, on its own copy of the model (no saving applied to it)."""
    return StreamEngine(load_pipeline(checkpoint), load_raft(raft_path), reuse=False)


@pytest.fixture(scope="module")
def fast(checkpoint, raft_path):
    return StreamEngine(load_pipeline(checkpoint), load_raft(raft_path))


@pytest.fixture(scope="module")
def reference(plain, frames):
    return _run(plain, frames, plain.new_state(42))


def test_savings_are_bit_identical(fast, reference, frames):
    got, state = _run(fast, frames, fast.new_state(42))
    expected, ref_state = reference
    for i, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"frame {i}: max abs difference {(a - b).abs().max().item()}"
    assert torch.equal(state.prev_output, ref_state.prev_output)
    # The savings were taken: RAFT's features ride in the state, the constants are cached.
    assert state.flow_features is not None and ref_state.flow_features is None
    assert any(k.startswith("kv:") for k in fast._constants) and any(k.startswith("temb:") for k in fast._constants)


@pytest.mark.parametrize("in_place", [True, False])
def test_kept_constants_follow_changed_biases(checkpoint, raft_path, frames, in_place):
    """The time embedding's biases are part of what the kept step embeddings depend on (changed in place or
    replaced, as a weight patch would)."""
    fast = StreamEngine(load_pipeline(checkpoint), load_raft(raft_path))
    plain = StreamEngine(load_pipeline(checkpoint), load_raft(raft_path), reuse=False)
    _run(fast, frames[:1], fast.new_state(3))
    for engine in (fast, plain):
        for net in (engine.pipeline.unet, engine.pipeline.controlnet):
            for layer in (net.time_embedding.linear_1, net.time_embedding.linear_2, net.time_resnets[0].time_emb_proj):
                change = torch.linspace(-1, 1, layer.bias.numel())
                if in_place:
                    with torch.no_grad():
                        layer.bias.add_(change)
                else:
                    layer.bias = torch.nn.Parameter(layer.bias + change, requires_grad=False)
    got, _ = _run(fast, frames[:2], fast.new_state(3))
    expected, _ = _run(plain, frames[:2], plain.new_state(3))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_restored_state_recomputes_the_flow_features(fast, reference, frames):
    first, state = _run(fast, frames[:2], fast.new_state(42))
    tensors, meta = state.to_dict()
    assert not any("flow" in k for k in tensors)  # a cache, not part of the saved sequence
    restored = StreamState.from_dict(tensors, meta)
    assert restored.flow_features is None and state.flow_features is not None
    second, _ = _run(fast, frames[2:], restored)
    assert all(torch.equal(a, b) for a, b in zip(first + second, reference[0]))


def test_features_of_another_flow_model_are_not_used(fast, plain, frames, tmp_path):
    _, state = _run(fast, frames[:2], fast.new_state(9))
    _, ref_state = _run(plain, frames[:2], plain.new_state(9))
    # Another estimator object (as after reloading it in ComfyUI) computes its own features.
    other = StreamEngine(fast.pipeline, load_raft(make_tiny_raft(tmp_path / "other.pth", seed=1)))
    reference = StreamEngine(plain.pipeline, load_raft(tmp_path / "other.pth"), reuse=False)
    assert torch.equal(other.step(frames[2], state)[0], reference.step(frames[2], ref_state)[0])


def test_another_frame_size_reuses_nothing_stale(fast, plain, frames):
    small = [f[:, :24, :32].contiguous() for f in frames[:2]]
    got, _ = _run(fast, small, fast.new_state(1))
    expected, _ = _run(plain, small, plain.new_state(1))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_half_precision_savings_are_bit_identical(checkpoint, raft_path, frames):
    fast = StreamEngine(load_pipeline(checkpoint, dtype=torch.bfloat16), load_raft(raft_path))
    plain = StreamEngine(load_pipeline(checkpoint, dtype=torch.bfloat16), load_raft(raft_path), reuse=False)
    got, _ = _run(fast, frames[:2], fast.new_state(5))
    expected, _ = _run(plain, frames[:2], plain.new_state(5))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_precomputed_constants_match_the_networks(checkpoint):
    pipe = load_pipeline(checkpoint)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 7, 16, 20, generator=g)
    cond = torch.randn(1, 3, 64, 80, generator=g)
    embeds = pipe.prompt_embeds
    t = torch.tensor(749)
    with torch.inference_mode():
        down, mid = pipe.controlnet(sample, t, embeds, cond)
        down2, mid2 = pipe.controlnet(sample, pipe.controlnet.step_embedding(t, sample),
                                      pipe.controlnet.prompt_kv(embeds),
                                      cond_embedding=pipe.controlnet.embed_condition(cond))
        assert all(torch.equal(a, b) for a, b in zip(down + [mid], down2 + [mid2]))
        kv, temb = pipe.unet.prompt_kv(embeds), pipe.unet.step_embedding(t, sample)
        assert isinstance(kv, PromptKV) and isinstance(temb, StepEmbedding)
        assert len(kv.kv) == len(pipe.unet.cross_attentions) > 0
        assert torch.equal(pipe.unet(sample, t, embeds, down, mid), pipe.unet(sample, temb, kv, down, mid))


@pytest.mark.parametrize("corr", ["all_pairs", "on_demand"])
@pytest.mark.parametrize("downscale", [1, 2])
def test_raft_reused_features_give_the_same_flow(raft_path, corr, downscale):
    estimator = load_raft(raft_path, corr=corr, downscale=downscale)
    g = torch.Generator().manual_seed(4)
    a, b, c = (torch.rand(1, 3, 128, 160, generator=g) * 2 - 1 for _ in range(3))
    _, features_b = estimator.flow_and_features(b, a)
    flow, features_c = estimator.flow_and_features(c, b, features_b)
    assert torch.equal(flow, estimator(c, b))
    assert torch.equal(features_c, estimator.flow_and_features(c, a)[1])


# ---------------------------------------------------------------------------------------------- compiled path


def _require_inductor():
    """Skip only where Inductor itself cannot compile (e.g. no C++ compiler): CompiledCall turns any compile
    failure into an eager run, so without this probe a failure of our own networks would look like a skip."""
    try:
        torch.compile(lambda t: t * 2 + 1, dynamic=False)(torch.ones(4))
    except Exception as e:  # noqa: BLE001 - whatever the toolchain raises
        pytest.skip(f"torch.compile (Inductor) is unavailable here: {type(e).__name__}: {e}"[:300])


@pytest.mark.parametrize("cpu_layers", [False, True], ids=["plain-layers", "cpu-layers"])
def test_compiled_engine_is_close_to_eager(checkpoint, raft_path, frames, reference, caplog, cpu_layers):
    """Compiled plain layers, and the CPU layers `load_engine` uses (kept whole as operators), against the eager
    plain arithmetic."""
    from streamvsr.models.shared.packed import PackedConv2d
    from streamvsr.models.stream_diffvsr import load_engine

    pytest.importorskip("torch._inductor")
    _require_inductor()
    if cpu_layers:
        fast = load_engine(checkpoint, flow=raft_path, compile=True)
    else:
        fast = StreamEngine(load_pipeline(checkpoint), load_raft(raft_path), compile=True)
    with caplog.at_level("INFO", logger="streamvsr.models.stream_diffvsr.speed"):
        got, state = _run(fast, frames, fast.new_state(42))
    # Inductor works here (the probe above), so an eager fallback means our networks stopped compiling.
    fallbacks = [r.getMessage() for r in caplog.records if "eagerly" in r.getMessage()]
    assert not fallbacks, "the compiled path fell back to eager: " + "; ".join(fallbacks)
    convs = [m for m in fast.pipeline.modules() if isinstance(m, PackedConv2d)]
    if cpu_layers:  # called as operators: their copies were made by the compiled calls
        assert convs and all(m._operator for m in convs) and any(m._packed is not None for m in convs)
    else:
        assert not convs
    expected, ref_state = reference
    for i, (a, b) in enumerate(zip(got, expected)):
        assert (a - b).abs().max() <= 1e-4, f"frame {i}"
    assert (state.prev_output - ref_state.prev_output).abs().max() <= 1e-4
    assert fast.compile_seconds > 0
    # One UNet graph per frame size: the first frame's zero residuals are laid out as the later frames' are.
    assert sum("compiled the UNet" in r.getMessage() for r in caplog.records) == 1, caplog.text
    # The temporal decoder once, for the later frames (a first frame, without temporal features, decodes
    # eagerly), and RAFT's parts, each once (the update block runs several times a frame, with the same shapes).
    for part in ("temporal decoder", "RAFT feature encoder", "RAFT context encoder", "RAFT update block"):
        assert sum(f"compiled the {part} " in r.getMessage() for r in caplog.records) == 1, caplog.text
    # Kept for the session: a new engine on the same models compiles nothing more for the same frame size.
    again = StreamEngine(fast.pipeline, fast.flow, compile=True)
    before = again.compile_seconds
    _run(again, frames[:2], again.new_state(42))
    assert again.compile_seconds == before
    # nor a resumed sequence, whose previous frame comes back from its checkpoint in another memory layout (RAFT's
    # feature encoder was compiled a second time for it)
    from streamvsr.models.stream_diffvsr.engine import StreamState

    caplog.clear()
    with caplog.at_level("INFO", logger="streamvsr.models.stream_diffvsr.speed"):
        _run(again, frames[2:], StreamState.from_dict(*state.to_dict()))
        # frames as files and ComfyUI hand them over (channels-last), then the sequence continued from its checkpoint
        channels_last = [f.permute(1, 2, 0).contiguous().permute(2, 0, 1) for f in frames]
        _, state = _run(again, channels_last[:2], again.new_state(42))
        _run(again, channels_last[2:], StreamState.from_dict(*state.to_dict()))
    assert "compiled the" not in caplog.text and again.compile_seconds == before


def test_compile_unavailable_falls_back_to_eager_with_a_warning(checkpoint, raft_path, frames, reference, caplog,
                                                                monkeypatch):
    from streamvsr.models.stream_diffvsr import speed

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(speed, "_COMPILER_FAILURE", None)  # (and put back afterwards: the session's record)
    fast = StreamEngine(load_pipeline(checkpoint), load_raft(raft_path), compile=True)
    with caplog.at_level("WARNING"):
        got, _ = _run(fast, frames[:2], fast.new_state(42))
    warnings = [r.getMessage() for r in caplog.records if "eagerly" in r.getMessage()]
    # one line, one try: a missing compiler fails every network alike, each after tracing it (7 warnings before)
    assert len(warnings) == 1 and "no compiler here" in warnings[0] and "for the rest of this session" in warnings[0]
    assert len(calls) == 1
    # eager fallback: channels-last weights change rounding only
    assert all((a - b).abs().max() <= 1e-4 for a, b in zip(got, reference[0]))
    # a model loaded afterwards runs eagerly too: said once for it (it was silent), not per run
    caplog.clear()
    with caplog.at_level("WARNING"):
        pipeline = load_pipeline(checkpoint)
        for _ in range(2):
            later = StreamEngine(pipeline, load_raft(raft_path), compile=True)
            _run(later, frames[:1], later.new_state(42))
    said = [r.getMessage() for r in caplog.records if "eagerly" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("torch.compile failed earlier in this session (RuntimeError: no "
                                                 "compiler here): this model runs eagerly too")
    assert len(calls) == 1


def test_the_compiler_failure_said_is_its_cause_not_dynamos_wrapper(monkeypatch, caplog):
    """Dynamo's BackendCompilerFailed says only "backend='inductor' raised:" on its first line."""
    import inspect

    from torch._dynamo.exc import BackendCompilerFailed

    from streamvsr.models.stream_diffvsr import speed

    def compile_without_a_compiler(fn, dynamic=None, mode=None):
        def run(x):
            try:
                raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
            except RuntimeError as e:
                # (first_useful_frame is a third argument of later PyTorch releases; 2.5 and 2.6 take two)
                extra = (None,) if "first_useful_frame" in inspect.signature(BackendCompilerFailed).parameters else ()
                raise BackendCompilerFailed(lambda: None, e, *extra) from e
        return run

    monkeypatch.setattr(torch, "compile", compile_without_a_compiler)
    monkeypatch.setattr(speed, "_COMPILER_FAILURE", None)
    with caplog.at_level("WARNING"):
        assert torch.equal(speed.CompiledCall(lambda x: x, "UNet")(torch.ones(2)), torch.ones(2))
    assert "(it failed on the UNet: RuntimeError: InvalidCxxCompiler: No working C++ compiler found)" in caplog.text


def test_out_of_memory_in_a_compiled_network_is_not_a_compiler_failure(monkeypatch, caplog):
    """Out of memory is the frame's failure, for the engine's own handling: it is raised as it is, and the network
    stays compiled (no eager rerun holding the failed attempt's memory)."""
    from streamvsr.models.shared.runtime import OUT_OF_MEMORY
    from streamvsr.models.stream_diffvsr import speed

    eager_calls = []

    def fake_compile(fn, dynamic=None, mode=None):
        def run(x):
            raise OUT_OF_MEMORY("CUDA out of memory (simulated)")
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    call = speed.CompiledCall(lambda x: eager_calls.append(x) or x, "test net")
    with caplog.at_level("WARNING"), pytest.raises(OUT_OF_MEMORY):
        call(torch.ones(2))
    assert not call.failed and eager_calls == [] and "eagerly" not in caplog.text
    # as Inductor raises it when memory runs out while it generates code (max-autotune's benchmarks on a nearly
    # full GPU): wrapped in its own error, it turned compiling off for the session as "unavailable"
    import importlib

    InductorError = getattr(importlib.import_module("torch._inductor.exc"), "InductorError", None)
    if InductorError is None:  # (PyTorch before 2.7 has no such wrapper)
        return

    def wrapping_compile(fn, dynamic=None, mode=None):
        def run(x):
            try:
                raise OUT_OF_MEMORY("CUDA out of memory (simulated)")
            except OUT_OF_MEMORY as e:
                raise InductorError(e, None) from e
        return run

    monkeypatch.setattr(torch, "compile", wrapping_compile)
    monkeypatch.setattr(speed, "_COMPILER_FAILURE", None)
    call = speed.CompiledCall(lambda x: eager_calls.append(x) or x, "test net")
    with caplog.at_level("WARNING"), pytest.raises(InductorError):
        call(torch.ones(2))
    assert not call.failed and eager_calls == [] and speed._COMPILER_FAILURE is None


def test_a_network_compiled_for_many_frame_sizes_keeps_compiling_and_says_when_it_no_longer_can(monkeypatch,
                                                                                                  caplog):
    """Dynamo compiles a function for 8 shapes by default, then runs it eagerly without a word (RAFT's two
    encoders share their code: four frame sizes). CompiledCall keeps RECOMPILE_LIMIT; past that, Dynamo runs the
    code eagerly for every shape, which is said once. (Both limits are lowered here to be reached.)"""
    from streamvsr.models.stream_diffvsr import speed

    pytest.importorskip("torch._inductor")
    _require_inductor()
    if not speed.recompile_limit_hit():
        pytest.skip("this PyTorch cannot report the recompile limit")
    compiled_runs = []

    def scale(x):
        compiled_runs.append(torch.compiler.is_compiling())
        return x * 2 + 1

    monkeypatch.setattr(speed, "RECOMPILE_LIMIT", 3)
    call = speed.CompiledCall(scale, "test net")
    # (Dynamo's own limit below ours; its config is a module of its own, which monkeypatch would leave broken)
    with torch._dynamo.config.patch(recompile_limit=1), caplog.at_level("WARNING"):
        for n in (3, 5, 7):
            assert torch.equal(call(torch.ones(n)), torch.ones(n) * 3)
        assert compiled_runs == [True] * 3 and not call.failed  # 3 sizes, where Dynamo alone would compile 1
        compiled_runs.clear()
        assert "compiled for as many" not in caplog.text
        for n in (9, 3):
            assert torch.equal(call(torch.ones(n)), torch.ones(n) * 3)
        assert compiled_runs[-2:] == [False, False] and call.failed  # eager from the 4th size on, and said once
        assert "the test net has been compiled for as many frame sizes as this session keeps (3); it runs " \
               "eagerly from now on" in caplog.text and caplog.text.count("compiled for as many") == 1


def test_each_loaded_copy_of_a_network_has_its_own_graphs(checkpoint, raft_path, frames, monkeypatch, caplog):
    """Dynamo counts graphs per code object: every copy of a network (a model loaded again in ComfyUI) added to
    one count for the session, freed copies included, until the network ran eagerly ("compiled for as many frame
    sizes as this session keeps (0)"). Each copy keeps its own (the limits are lowered here to 1)."""
    import gc

    from streamvsr.models.stream_diffvsr import load_engine, speed

    pytest.importorskip("torch._inductor")
    _require_inductor()
    if not speed.recompile_limit_hit():
        pytest.skip("this PyTorch cannot report the recompile limit")
    monkeypatch.setattr(speed, "RECOMPILE_LIMIT", 1)
    with torch._dynamo.config.patch(recompile_limit=1), caplog.at_level("INFO"):
        for _ in range(2):
            engine = load_engine(checkpoint, flow=raft_path, compile=True)
            engine.step(frames[0], engine.new_state(1))  # (the first frame runs the UNet alone)
            del engine
            gc.collect()
    assert caplog.text.count("compiled the UNet for") == 2 and "compiled for as many" not in caplog.text


def test_compile_on_the_cpu_is_flagged_at_load(checkpoint, raft_path, caplog):
    from streamvsr.models.stream_diffvsr import load_engine

    with caplog.at_level("WARNING"):
        engine = load_engine(checkpoint, flow=raft_path, compile=True)  # nothing compiles before the first frame
        assert engine.compile
        assert any("--compile on the CPU" in r.getMessage() for r in caplog.records)
        caplog.clear()
        load_engine(checkpoint, flow=raft_path)
    assert not any("--compile" in r.getMessage() for r in caplog.records)


def test_compile_mode_is_handed_to_torch_compile_and_graph_outputs_are_copied(monkeypatch):
    """CUDA graph modes replay into memory that the next replay reuses, so their outputs are copied before the
    engine keeps them (checked with meta tensors standing in for a device's); the default mode returns the
    compiled function's own outputs."""
    from streamvsr.models.stream_diffvsr import speed

    seen, graph_memory = [], {}

    def fake_compile(fn, dynamic=None, mode=None):
        seen.append((dynamic, mode))

        def replay(x):
            graph_memory["out"] = fn(x)
            return graph_memory["out"]

        return replay

    monkeypatch.setattr(torch, "compile", fake_compile)
    on_device = torch.empty(2, 3, device="meta")
    for mode, copied in [(None, False), ("max-autotune-no-cudagraphs", False), ("reduce-overhead", True),
                         ("max-autotune", True)]:
        call = speed.CompiledCall(lambda x: (x * 2, [x + 1], 3), "test net", mode=mode)
        out = call(on_device)
        assert seen[-1] == (False, mode)
        assert (out[0] is not graph_memory["out"][0]) == copied, mode
        assert (out[1][0] is not graph_memory["out"][1][0]) == copied, mode
        assert out[0].shape == (2, 3) and out[2] == 3
        cpu = call(torch.ones(2))  # nothing to copy on the CPU, where no graph is captured
        assert cpu[0] is graph_memory["out"][0]


def test_compiled_networks_are_kept_per_mode(checkpoint):
    from streamvsr.models.stream_diffvsr.speed import compiled

    unet = load_pipeline(checkpoint).unet
    default = compiled(unet, "forward", "UNet", channels_last=False)
    assert compiled(unet, "forward", "UNet", channels_last=False) is default
    graphs = compiled(unet, "forward", "UNet", channels_last=False, mode="reduce-overhead")
    assert graphs is not default and graphs.mode == "reduce-overhead"


def _channels_last(network) -> bool:
    """Whether the network's 3x3 convolution weights (where the layouts differ) are all stored channels-last."""
    weights = [p for p in network.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    return bool(weights) and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                                 for p in weights)


def test_half_precision_on_a_gpu_runs_channels_last(checkpoint, raft_path, frames, monkeypatch):
    """On a GPU in half precision the engine stores the networks channels-last, every group norm keeps that layout,
    and the frames are as close to float32's as in NCHW. The CPU stands in for the GPU."""
    reference, _ = _run(StreamEngine(load_pipeline(checkpoint), load_raft(raft_path)), frames, new_state(3))
    nchw = StreamEngine(load_pipeline(checkpoint, dtype=torch.bfloat16), load_raft(raft_path))
    assert not _channels_last(nchw.pipeline.unet)  # the CPU: left as loaded
    before, _ = _run(nchw, frames, new_state(3))

    monkeypatch.setattr(norms, "CHANNELS_LAST_DEVICES", ("cuda", "cpu"))
    monkeypatch.delenv(norms.LAYOUT_ENV, raising=False)
    assert not _channels_last(StreamEngine(load_pipeline(checkpoint), load_raft(raft_path)).pipeline.unet)  # fp32
    calls = []
    path = norms.group_norm_channels_last
    monkeypatch.setattr(norms, "group_norm_channels_last", lambda *a: calls.append(1) or path(*a))
    nhwc = StreamEngine(load_pipeline(checkpoint, dtype=torch.bfloat16), load_raft(raft_path))
    assert all(_channels_last(n) for n in (nhwc.pipeline.unet, nhwc.pipeline.controlnet, nhwc.pipeline.vae))
    got, state = _run(nhwc, frames, new_state(3))
    norms_per_frame = sum(isinstance(m, torch.nn.GroupNorm) for m in nhwc.pipeline.unet.modules()) * nhwc.steps
    assert len(calls) > len(frames) * norms_per_frame  # the ControlNet's norms come on top from frame 1
    for i, (a, b, ref) in enumerate(zip(got, before, reference)):
        assert a.shape == ref.shape
        assert (a - ref).abs().max() <= 1.5 * (b - ref).abs().max(), f"frame {i}"
    tensors, _ = state.to_dict()  # the state saves as it did (safetensors wants contiguous tensors)
    assert all(t.is_contiguous() for t in tensors.values())


def test_half_precision_computes_the_prompt_keys_and_values_once(checkpoint, raft_path, frames, monkeypatch):
    """The prompt embedding is stored in float32: cast anew for every frame, it would be another tensor each time
    and the keys and values kept for it would be computed again for every frame."""
    engine = StreamEngine(load_pipeline(checkpoint, dtype=torch.bfloat16), load_raft(raft_path))
    calls = []
    for name in ("unet", "controlnet"):
        net = getattr(engine.pipeline, name)
        monkeypatch.setattr(net, "prompt_kv", lambda embeds, net=net, name=name: (
            calls.append(name), type(net).prompt_kv(net, embeds))[1])
    _run(engine, frames, engine.new_state(5))
    assert sorted(calls) == ["controlnet", "unet"]
