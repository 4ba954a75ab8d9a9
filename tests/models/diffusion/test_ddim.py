import pytest
import torch
from pydantic import ValidationError

from models.diffusion.ddim import DDIMSampler, make_scheduler
from models.request.params import MAX_STEPS, EditParams


def test_inversion_then_sampling_is_exact_for_analytic_predictor():
    # For Gaussian data the optimal noise predictor is eps = sqrt(1 - alpha_bar_t) * x.
    sampler = DDIMSampler(make_scheduler(), 50)
    x0 = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def eps(x: torch.Tensor, t: int) -> torch.Tensor:
        return (1 - sampler.alpha(t)) ** 0.5 * x

    x = x0.clone()
    for t in reversed(sampler.timesteps):
        x = sampler.invert_step(eps(x, t), t, x)
    assert not torch.allclose(x, x0)
    for t in sampler.timesteps:
        x = sampler.step(eps(x, t), t, x)
    assert torch.mean((x - x0) ** 2).item() < 1e-5


def test_schedule_matches_prism_defaults():
    scheduler = make_scheduler({"beta_start": 0.00085, "beta_end": 0.012, "clip_sample": True})
    assert scheduler.config.clip_sample is False
    assert scheduler.config.set_alpha_to_one is False
    sampler = DDIMSampler(scheduler, 50)
    assert sampler.timesteps[0] == 981 and sampler.timesteps[-1] == 1
    assert sampler.alpha(-19) == float(scheduler.alphas_cumprod[0])


@pytest.mark.parametrize("steps", [1, 50, 500, 501, MAX_STEPS])
def test_every_allowed_step_count_stays_inside_the_schedule(steps):
    sampler = DDIMSampler(make_scheduler(), steps)
    assert len(sampler.timesteps) == steps and max(sampler.timesteps) <= 999
    x = torch.zeros(1, 4, 2, 2)
    for t in sampler.timesteps:
        assert torch.isfinite(sampler.step(x, t, x)).all() and torch.isfinite(sampler.invert_step(x, t, x)).all()
    with pytest.raises(ValidationError):
        EditParams(steps=MAX_STEPS + 1)
