"""DDIM against the spec's formulas and constants, and against diffusers' DDIMScheduler."""

import math

import pytest
import torch

from helpers import SCHEDULER_CONFIG
from streamvsr.models.stream_diffvsr.scheduler import DDIMScheduler

# spec §1.2: alpha_bar_t for the four default timesteps and alpha_bar_0
SPEC_ALPHA_BAR = {999: 0.0007334120, 749: 0.0386055075, 499: 0.3331878185, 249: 0.8215212226, 0: 0.9998999834}


def test_official_timesteps_and_constants():
    s = DDIMScheduler(SCHEDULER_CONFIG)
    assert s.timesteps(4) == [999, 749, 499, 249]
    assert s.timesteps(1) == [999]
    assert s.timesteps(2) == [999, 499]
    assert s.timesteps(3) == [999, 666, 332]
    assert s.timesteps(8) == [999, 874, 749, 624, 499, 374, 249, 124]
    for t, value in SPEC_ALPHA_BAR.items():
        assert float(s.alphas_cumprod[t]) == pytest.approx(value, rel=1e-6)
    assert float(s.final_alpha_cumprod) == pytest.approx(SPEC_ALPHA_BAR[0], rel=1e-7)


def test_step_formula_v_prediction_last_step_is_not_x0():
    # Written from spec §1.2: x0 = sqrt(a)x - sqrt(1-a)v; eps = sqrt(a)v + sqrt(1-a)x; prev = sqrt(ap)x0 + sqrt(1-ap)eps
    s = DDIMScheduler(SCHEDULER_CONFIG)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64)
    for t, prev_t in ((999, 749), (749, 499), (499, 249), (249, 0)):
        a, ap = SPEC_ALPHA_BAR[t], SPEC_ALPHA_BAR[prev_t]
        x0 = math.sqrt(a) * x - math.sqrt(1 - a) * v
        eps = math.sqrt(a) * v + math.sqrt(1 - a) * x
        expected = math.sqrt(ap) * x0 + math.sqrt(1 - ap) * eps
        got, got_x0 = s.step(v.float(), t, x.float(), 4)
        assert torch.allclose(got.double(), expected, atol=2e-6)
        assert torch.allclose(got_x0.double(), x0, atol=2e-6)
    # Quirk Q6: the last step lands on alpha_bar_0 = 0.99990, so it keeps 1% of eps.
    last, x0 = s.step(v.float(), 249, x.float(), 4)
    assert not torch.allclose(last, x0, atol=1e-3)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("overrides", [
    {},
    {"timestep_spacing": "leading"},
    {"timestep_spacing": "linspace", "prediction_type": "epsilon"},
    {"set_alpha_to_one": True, "beta_schedule": "linear", "prediction_type": "sample"},
    {"beta_schedule": "squaredcos_cap_v2"},
])
def test_matches_diffusers(steps, overrides):
    diffusers = pytest.importorskip("diffusers")
    config = {**SCHEDULER_CONFIG, **overrides}
    ref = diffusers.DDIMScheduler.from_config(config)
    ref.set_timesteps(steps)
    ours = DDIMScheduler(config)
    assert ours.timesteps(steps) == ref.timesteps.tolist()
    g = torch.Generator().manual_seed(steps)
    x = torch.randn(1, 4, 6, 7, generator=g)
    x_ref = x.clone()
    for t in ours.timesteps(steps):
        out = torch.randn(1, 4, 6, 7, generator=g)
        x, _ = ours.step(out, t, x, steps)
        x_ref = ref.step(out, torch.tensor(t), x_ref).prev_sample
        assert torch.equal(x, x_ref), (t, (x - x_ref).abs().max())


@pytest.mark.parametrize("key", ["clip_sample", "thresholding", "rescale_betas_zero_snr"])
def test_unsupported_options_raise(key):
    with pytest.raises(ValueError, match=key):
        DDIMScheduler({**SCHEDULER_CONFIG, key: True})
