import torch

from rankscope.core import runtime


def test_static_precision_never_follows_cpu_flags(monkeypatch):
    """Without timing (short runs, torchrun) a CPU gets fp32 whatever its flags: bf16 autocast was slower than
    fp32 on an AMX Xeon and ~100x slower on AVX2-only CPUs; only rankscope.train.autotune's timing picks bf16 there."""
    cpu = torch.device("cpu")
    for flags in ({"avx2", "fma"}, {"avx512f", "avx512_bf16"}, {"amx_bf16"}):
        monkeypatch.setattr(runtime, "cpu_flags", lambda f=flags: frozenset(f))
        assert runtime.pick_precision(cpu, "auto") == "fp32"
    assert runtime.pick_precision(cpu, "bf16") == "bf16"  # an explicit choice is kept
    assert runtime.pick_precision(cpu, "fp32") == "fp32"


def test_no_peak_is_guessed_for_cpus():
    assert runtime.peak_flops(torch.device("cpu"), "fp32") is None
