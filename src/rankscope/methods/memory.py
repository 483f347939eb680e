"""Equal optimiser memory across methods, for comparisons under the same budget.

`measured_state_bytes(cfg)` builds the model, method and optimiser and counts the optimiser-state
bytes after one zero-gradient step; `match_memory(cfg, target)` returns a copy of the config with
method.rank (LoRA family, GaLore) or method.density (so, so_single) set to the largest value whose optimiser
state fits in `target` bytes; the study option `match_memory: relora` (or a byte count) applies it
to every point (`apply_memory_match`).
"""

from __future__ import annotations

import copy

import torch

from rankscope.core.errors import ConfigError
from rankscope.methods.common import target_linears


def measured_state_bytes(cfg) -> int:
    """Optimiser-state bytes of `cfg`'s method on its model, after one zero-gradient step (lr 0)."""
    from rankscope.methods import build_method
    from rankscope.model import Decoder
    from rankscope.optim import optimizer_state_bytes

    torch.manual_seed(cfg.train.seed)
    model = Decoder(cfg.model)
    method = build_method(cfg)
    method.prepare_model(model)
    opt = method.build_optimizer(model, torch.device("cpu"))
    for g in opt.param_groups:
        g["lr"] = 0.0
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    return optimizer_state_bytes(opt)


def memory_knob(name: str) -> str | None:
    """The option a method declares for memory matching (`Method.memory_knob`: rank, density or None)."""
    from rankscope.methods import method_class

    return method_class(name).memory_knob


def matchable() -> list[str]:
    from rankscope.methods import METHODS

    return [n for n, cls in METHODS.items() if cls.memory_knob]


def match_memory(cfg, target_bytes: int):
    """A copy of `cfg` whose optimiser state is the largest that fits in `target_bytes`: method.rank
    (LoRA family, GaLore; bisection over integer ranks, state grows with the rank) or
    method.density (so, so_single: state = fixed part + the bytes each sparse weight allocates,
    the method's `state_bytes`: so's min(2k, numel) slots of int64 index + m + v, and the k indices of G,
    or so_single's k of index + m + v; solved by bisection on the exact support sizes, from the method's
    `smallest_density`). Other methods raise ConfigError."""
    out = copy.deepcopy(cfg)
    name = cfg.method.name
    knob = memory_knob(name)
    if knob == "rank":
        from rankscope.model import Decoder

        lo, hi = 1, max(min(lin.in_features, lin.out_features) for lin in target_linears(Decoder(cfg.model), cfg.method.options.targets).values())

        def bytes_at(r: int) -> int:
            out.method.options.rank = r
            if hasattr(out.method.options, "rank_min"):
                out.method.options.rank_min = min(out.method.options.rank_min, r)
            return measured_state_bytes(out)

        if bytes_at(lo) > target_bytes:
            raise ConfigError(f"{target_bytes} optimiser-state bytes are below what {name} needs at rank 1 ({bytes_at(1)})")
        while lo < hi:
            mid = (lo + hi + 1) // 2
            try:
                fits = bytes_at(mid) <= target_bytes
            except Exception:  # a rank above some layer's min(m, n)
                fits = False
            lo, hi = (mid, hi) if fits else (lo, mid - 1)
        bytes_at(lo)
        return out
    if knob == "density":
        from rankscope.methods import method_class
        from rankscope.model import Decoder
        from rankscope.optim import targeted_weights

        weights = targeted_weights(Decoder(cfg.model), cfg.method.options.targets)
        sizes, element = [p.numel() for p in weights], weights[0].element_size()
        cls = method_class(name)
        state_bytes, lo = cls.state_bytes, cls.smallest_density(sizes)
        probe = copy.deepcopy(cfg)
        probe.method.options.density = max(cfg.method.options.density, lo)  # a density the method accepts
        fixed = measured_state_bytes(probe) - sum(state_bytes(n, probe.method.options.density, element) for n in sizes)
        need = lambda d: fixed + sum(state_bytes(n, d, element) for n in sizes)  # noqa: E731
        if need(lo) > target_bytes:
            raise ConfigError(f"{target_bytes} optimiser-state bytes are below what {name} needs at its smallest density "
                              f"{lo:.3g} ({need(lo)})")
        hi = 1.0
        if need(hi) <= target_bytes:
            lo = hi
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if need(mid) <= target_bytes else (lo, mid)
        out.method.options.density = lo
        assert measured_state_bytes(out) == need(lo), "sparse state accounting differs from what the optimiser allocates"
        return out
    raise ConfigError(f"method.name={name} has no memory knob; match_memory works for {', '.join(matchable())}")


def apply_memory_match(cfg, target: int | str):
    """The study option `match_memory: <bytes | method name>`: a copy of `cfg` with its rank or
    density matched (`match_memory`) to `target` bytes, or to the optimiser state of the named
    method on the same config. Points whose method has no knob (full) or that are the reference
    method itself are returned unchanged."""
    name = cfg.method.name
    if isinstance(target, str) and not target.isdigit():
        if target == name:
            return cfg
        from rankscope.methods import switch_method

        target_bytes = measured_state_bytes(switch_method(cfg, target))
    else:
        target_bytes = int(target)
    if memory_knob(name) is None:
        return cfg
    return match_memory(cfg, target_bytes)
