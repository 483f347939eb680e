import torch

from rankscope import runtime


def test_auto_precision_follows_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert runtime.pick_precision(cpu, "auto") == "fp32"  # AVX2 only: bf16 ~100x slower
    assert runtime.pick_precision(cpu, "bf16") == "bf16"  # an explicit choice is kept
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert runtime.pick_precision(cpu, "auto") == "bf16"
    assert runtime.pick_precision(cpu, "fp32") == "fp32"
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert runtime.pick_precision(cpu, "auto") == "bf16"


def test_no_peak_is_guessed_for_cpus():
    assert runtime.peak_flops(torch.device("cpu"), "fp32") is None
