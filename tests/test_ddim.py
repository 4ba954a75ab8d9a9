import torch

from models.ddim import DDIMSampler, make_scheduler


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
