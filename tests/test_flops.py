"""diffattn.flops' peak rates: NVIDIA GPUs by the names torch reports, Apple M chips by MLX's
device name, and the measured matmul rate elsewhere (the FLOP count itself: test_benchmarks.py)."""
import pytest

from diffattn import flops


@pytest.mark.parametrize("name,dtype,peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4e12),
    ("NVIDIA H100 80GB HBM3", "float32", 66.9e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H100 NVL", "bfloat16", 835e12),
    ("NVIDIA H200", "float16", 989.4e12),
    ("NVIDIA GH200 480GB", "bfloat16", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("NVIDIA A100 80GB PCIe", "float32", 19.5e12),
    ("NVIDIA L40S", "bfloat16", 362e12),  # not the L4 nor the L40
    ("NVIDIA L4", "bfloat16", 121e12),
    ("NVIDIA B200", "bfloat16", 2250e12),
])
def test_nvidia_peaks_by_device_name(name, dtype, peak):
    assert flops.nvidia_peak(name, dtype) == peak
    assert flops.peak_flops(name, dtype, gpu=True) == (peak, flops.peak_flops(name, dtype, gpu=True)[1])


def test_apple_chips_by_name_and_every_dtype_at_the_fp32_rate(monkeypatch):
    monkeypatch.setattr(flops, "apple_gpu_cores", lambda: None)
    assert flops.apple_chip("Apple M3 Max") == "M3 Max" and flops.apple_chip("Apple M1") == "M1"
    assert flops.apple_chip("AMD EPYC") is None
    assert flops.peak_flops("Apple M2 Ultra", "bfloat16", "mlx", gpu=True)[0] == 27.2e12
    assert flops.peak_flops("Apple M2 Ultra", "float32", "mlx", gpu=True)[0] == 27.2e12
    # a binned chip: the figure scales with the GPU cores system_profiler reports
    monkeypatch.setattr(flops, "apple_gpu_cores", lambda: 30)
    peak, source = flops.peak_flops("Apple M3 Max", "float32", "mlx", gpu=True)
    assert peak == pytest.approx(16.4e12 * 30 / 40) and "30-core" in source


def test_unknown_devices_and_cpus_use_the_measured_matmul_rate(monkeypatch):
    monkeypatch.setattr(flops, "measured_matmul_flops", lambda framework, dtype: 1.5e11)
    assert flops.peak_flops("Apple M5", "bfloat16", "mlx", gpu=True) == \
        (1.5e11, "measured mlx bfloat16 1024^3 matmul on Apple M5")
    assert flops.peak_flops("AMD EPYC", "float32", "numpy")[0] == 1.5e11


def test_the_matmul_probe_measures_a_positive_rate_once():
    rate = flops.measured_matmul_flops("numpy", "float32", n=128, budget_s=0.05)
    assert rate > 1e6 and flops.measured_matmul_flops("numpy", "float32", n=128, budget_s=0.05) == rate
