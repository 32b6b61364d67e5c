"""Deterministic DDIM (eta = 0) driven by a diffusers ``scheduler_config.json``.

Stream-DiffVSR ships a DDIMScheduler config with v-prediction, "trailing" spacing and
``set_alpha_to_one = false``; the arithmetic below follows the same order of float32 operations so that the
latents match the official pipeline bit for bit on CPU.
"""

from __future__ import annotations

import math

import torch

_SUPPORTED_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_SUPPORTED_SPACINGS = ("leading", "trailing", "linspace")
_SUPPORTED_PREDICTIONS = ("epsilon", "v_prediction", "sample")


def _betas(config: dict) -> torch.Tensor:
    n = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float32)
    schedule = config.get("beta_schedule", "linear")
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    if schedule == "linear":
        return torch.linspace(start, end, n, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
    if schedule == "squaredcos_cap_v2":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(
        f"scheduler config: beta_schedule={schedule!r} is not supported (use one of {_SUPPORTED_BETA_SCHEDULES})"
    )


class DDIMScheduler:
    """DDIM sampler with eta = 0 and no clipping, configured from ``scheduler_config.json``.

    ``timesteps(n)`` gives the denoising timesteps for ``n`` steps; ``step(model_output, t, sample)`` returns
    the previous sample. The schedule math is float32; ``step`` computes in the dtype of ``sample``.
    """

    def __init__(self, config: dict):
        self.config = dict(config)
        for key, allowed in (
            ("timestep_spacing", _SUPPORTED_SPACINGS),
            ("prediction_type", _SUPPORTED_PREDICTIONS),
        ):
            value = self.config.get(key, allowed[0])
            if value not in allowed:
                raise ValueError(f"scheduler config: {key}={value!r} is not supported (use one of {allowed})")
        for key in ("clip_sample", "thresholding", "rescale_betas_zero_snr"):
            if self.config.get(key, False):
                raise ValueError(
                    f"scheduler config: {key}=true is not supported; Stream-DiffVSR's DDIM config sets it to false"
                )
        self.num_train_timesteps = int(self.config.get("num_train_timesteps", 1000))
        self.prediction_type = self.config.get("prediction_type", "epsilon")
        self.alphas_cumprod = torch.cumprod(1.0 - _betas(self.config), dim=0)
        # With set_alpha_to_one=false the step after the last timestep lands on alpha_bar[0], not 1: quirk Q6.
        self.final_alpha_cumprod = (
            torch.tensor(1.0) if self.config.get("set_alpha_to_one", True) else self.alphas_cumprod[0]
        )

    def timesteps(self, num_inference_steps: int) -> list[int]:
        n, total = int(num_inference_steps), self.num_train_timesteps
        if not 1 <= n <= total:
            raise ValueError(f"num_inference_steps must be between 1 and {total}, got {n}")
        spacing = self.config.get("timestep_spacing", "leading")
        if spacing == "trailing":
            ratio = total / n
            steps = [int(round(total - i * ratio)) - 1 for i in range(n)]
        elif spacing == "leading":
            ratio = total // n
            offset = int(self.config.get("steps_offset", 0))
            steps = [i * ratio + offset for i in reversed(range(n))]
        else:  # linspace
            steps = [int(round(v)) for v in torch.linspace(0, total - 1, n, dtype=torch.float64).tolist()][::-1]
        return steps

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, num_inference_steps: int):
        """One DDIM update; returns ``(prev_sample, pred_original_sample)``."""
        prev_timestep = timestep - self.num_train_timesteps // num_inference_steps
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        if self.prediction_type == "epsilon":
            x0 = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
            eps = model_output
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (sample - alpha_prod_t**0.5 * x0) / beta_prod_t**0.5
        else:
            x0 = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
            eps = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
        prev = alpha_prod_prev**0.5 * x0 + (1 - alpha_prod_prev) ** 0.5 * eps
        return prev, x0
