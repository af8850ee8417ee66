"""common.py: device and precision set-up, the GPU peak table, the options checker (the memory plan:
test_fsdp.py)."""

import pytest
import torch

import common
from common import GrafitoError, resolve_device, resolve_dtype
from configurator import check_options, integer, number


def test_devices_that_are_not_here_are_clear_errors():
    for device, message in [("cuda:99", "cuda:99"), ("tpu", "expected auto, cpu"), ("banana", "expected auto, cpu")]:
        with pytest.raises(GrafitoError, match=message):
            resolve_device(device)
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(GrafitoError, match="no CUDA GPU"):
            resolve_device("cuda")


@pytest.mark.parametrize("capability,expected", [((7, 0), "float16"), ((7, 5), "float16"), ((8, 0), "bfloat16"),
                                                 ((9, 0), "bfloat16")])
def test_auto_dtype_takes_bfloat16_only_where_gpus_run_it_natively(monkeypatch, capability, expected):
    """V100 (7.0) and T4 (7.5) report bf16 as supported, but only emulate it: no flash kernel, no compile."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda") == expected
    assert resolve_dtype("auto", "cpu") == "bfloat16"


@pytest.mark.parametrize("name,expected", [("NVIDIA L40", 181e12), ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12),
                                           ("NVIDIA H100 NVL", 835e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                           ("NVIDIA H800", 989e12), ("NVIDIA A800-SXM4-80GB", 312e12),
                                           ("NVIDIA RTX 6000 Ada Generation", 364e12), ("NVIDIA H20", 148e12)])
def test_gpu_peaks_match_the_most_specific_name(monkeypatch, name, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert common.peak_flops("cuda", "bfloat16") == expected


def test_options_are_checked_with_one_message_format():
    rules = {"steps": integer(1), "rate": number(0.0, 1.0)}
    check_options({"steps": 3, "rate": 0.5}, rules)
    for values, message in [({"steps": True, "rate": 0.5}, "config: steps = True is invalid: must be an integer"),
                             ({"steps": 2, "rate": float("inf")}, "config: rate = inf is invalid: must be a finite"),
                             ({"steps": 2, "rate": 1.5}, "config: rate = 1.5 is invalid: must be in [0.0, 1.0]")]:
        with pytest.raises(GrafitoError) as err:
            check_options(values, rules)
        assert message in str(err.value)
