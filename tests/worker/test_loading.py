import torch

from service.contract.settings import Settings
from worker.loading import bundle_from_settings


def test_the_model_is_loaded_as_configured_with_the_configured_cpu_threads(tiny_model_dir):
    before = torch.get_num_threads()
    try:
        bundle = bundle_from_settings(Settings(model_dir=str(tiny_model_dir), device="cpu", cpu_threads=1))
        assert torch.get_num_threads() == 1
        assert bundle.device.type == "cpu" and bundle.dtype == torch.float32
        bundle_from_settings(Settings(model_dir=str(tiny_model_dir), device="cpu"))
        assert torch.get_num_threads() == 1  # unset: torch's own setting is left as it is
    finally:
        torch.set_num_threads(before)
