"""What training reports about itself: the peak table behind MFU."""

import pytest

from gptjax import metrics
from gptjax.config import TrainConfig


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA B200", 2250e12), ("AMD Instinct MI300X", 1307.4e12), ("TPU v5", 459e12), ("TPU v5 lite", 197e12),
    ("TPU v6 lite", 918e12), ("TPU7x", 1153.5e12),
])
def test_the_peak_table_matches_device_kinds_exactly(kind, peak):
  assert metrics.peak_flops(kind) == peak


def test_an_unknown_device_kind_has_no_peak_and_the_report_names_the_setting():
  assert metrics.peak_flops("NVIDIA H100") == 0.0  # not SXM's number by a prefix
  assert metrics.peak_flops("cpu") == 0.0
  assert metrics.peak_report(TrainConfig()) == ("MFU n/a: no peak FLOP/s known for device kind 'cpu'; "
                                                 "set train.peak_flops_per_device")
  assert metrics.peak_report(TrainConfig(peak_flops_per_device=1e12)) is None
