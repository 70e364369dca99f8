"""One device and precision resolver (dinomed.runtime) for every command: devices, autocast dtypes."""
from __future__ import annotations

import pytest
import torch

from dinomed.errors import DinomedError
from dinomed.runtime import autocast, autocast_dtype, resolve_device


def test_precision_follows_the_device_and_the_setting():
    cpu = torch.device("cpu")
    for amp in ("auto", "bf16", "fp16", "off", False, None):
        assert autocast_dtype(cpu, amp) is None  # fp32 on the CPU whatever is asked: autocast there does not pay
    assert autocast_dtype(torch.device("mps"), "auto") is None
    if torch.cuda.is_available():
        gpu = torch.device("cuda", 0)
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        assert autocast_dtype(gpu, "auto") == autocast_dtype(gpu, "bf16") == expected  # bf16 only where supported
        assert autocast_dtype(gpu, "fp16") == torch.float16 and autocast_dtype(gpu, "off") is None
    with autocast(cpu, None):
        assert torch.ones(2).dtype == torch.float32


def test_every_command_uses_the_one_resolver():
    """The classification probes (as features and embeddings) name devices as segmentation and training do."""
    from dinomed.classify.probes import linear_probe

    with pytest.raises(DinomedError, match="unknown device 'tpu'"):
        linear_probe(torch.zeros(4, 3).numpy(), torch.zeros(4, 2).numpy(), [], device="tpu")
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        with pytest.raises(DinomedError, match="Apple MPS is not available"):
            resolve_device("mps")
