"""GaLore (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection"), Algorithm 1, for the 2-D weights of the targeted linears; everything else AdamW.

For a weight W (m x n) with gradient G, rank r = method.rank, every T = method.update_proj_gap
steps (at steps 0, T, 2T, ... counted per parameter) the projector P is refreshed from the SVD
G = U S V^T of the current gradient, on the side that gives the smaller projected state (the
"std" projection of the reference code, galore-torch 1.0):
  m >= n  (right)  P = V[:, :r]^T  (r x n)   R = G P^T  (m x r)   back(N) = N P
  m <  n  (left)   P = U[:, :r]    (m x r)   R = P^T G  (r x n)   back(N) = P N
Adam runs on R (moments of R's shape; they are NOT reset when P changes, as in the reference code):
  M <- b1 M + (1 - b1) R,   V <- b2 V + (1 - b2) R^2,   N = M / (sqrt(V) + eps)
  W <- W - lr * sqrt(1 - b2^t) / (1 - b1^t) * alpha * back(N)      (alpha = method.galore_scale)
  W <- W - lr * weight_decay * W                                     (decoupled decay, after the update)
galore-torch itself is not used: its package imports bitsandbytes at import time, and it keeps a
Python projector object in the optimiser state, which a tensor checkpoint cannot hold. Here the
projector is a plain tensor `projector` in the state, so checkpoints resume bit-exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from rankscope.core.schema import check, option
from rankscope.methods.base import Method, Notify, StepEvents, schedule_must_fit
from rankscope.model import DEFAULT_TARGETS
from rankscope.optim import SplitAdamW, optimizer_state_bytes, targeted_groups


@dataclass
class GaLoreConfig:
    rank: int = option(16, "rank of the gradient projection")
    targets: list[str] = option(DEFAULT_TARGETS, "linear layers whose weights get projected gradients (by name)")
    update_proj_gap: int = option(200, "steps between SVD refreshes of the gradient projector")
    galore_scale: float = option(0.25, "scale of the projected-back update")

    def validate(self) -> None:
        check(self.rank > 0, f"method.galore.rank must be positive, got {self.rank}")
        check(self.update_proj_gap > 0 and self.galore_scale > 0,
              f"method.update_proj_gap={self.update_proj_gap} and method.galore_scale={self.galore_scale} must be positive")


def projection_side(shape: torch.Size) -> str:
    return "right" if shape[0] >= shape[1] else "left"


@torch.no_grad()
def galore_projector(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal projector from the fp32 SVD of `grad`: V[:, :r]^T (right) or U[:, :r] (left)."""
    U, _, Vh = torch.linalg.svd(grad.float(), full_matrices=False)
    P = Vh[:rank] if projection_side(grad.shape) == "right" else U[:, :rank]
    return P.to(grad.dtype).contiguous()


def project(grad: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    return grad @ P.T if projection_side(grad.shape) == "right" else P.T @ grad


def project_back(low: torch.Tensor, P: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return low @ P if projection_side(shape) == "right" else P @ low


class GaLoreAdamW(SplitAdamW):
    """AdamW; groups with `galore=True` run Adam in a rank-`rank` gradient subspace (see module)."""

    flag = "galore"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 rank: int = 16, update_proj_gap: int = 200, scale: float = 0.25):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, galore=False,
                        rank=rank, update_proj_gap=update_proj_gap, scale=scale)
        super().__init__(params, defaults)

    def special_step(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], index: int) -> None:
        """Adam in the rank-r subspace of the gradient, projected back; the projector is
        refreshed from the gradient's SVD every `update_proj_gap` steps."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        done = int(state["step"].item())
        grad = p.grad
        if done % group["update_proj_gap"] == 0:
            state["projector"] = galore_projector(grad, min(group["rank"], *grad.shape))
        low = project(grad, state["projector"])
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(low)
            state["exp_avg_sq"] = torch.zeros_like(low)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(low, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(low, low, value=1 - beta2)
        state["step"] += 1
        t = done + 1
        step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        update = project_back(m / (v.sqrt() + eps), state["projector"], p.shape)
        p.add_(update, alpha=-step_size * group["scale"])
        if wd > 0:
            p.add_(p, alpha=-lr * wd)


class GaLoreMethod(Method):
    """GaLore on the targeted linears' weights (rank method.rank); embeddings, norms, head: AdamW."""

    name = "galore"
    config_class = GaLoreConfig
    supports_fsdp = False
    memory_knob = "rank"

    @classmethod
    def check_schedule(cls, cfg) -> None:
        schedule_must_fit(cfg, "update_proj_gap", cfg.method.options.update_proj_gap, cfg.train.max_steps,
                          "the projector would be computed once, from the first step's gradient, and never refreshed")

    def build_optimizer(self, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
        t, m = self.cfg.train, self.config
        groups = targeted_groups(model, t, m.targets, "galore", galore=True)
        return GaLoreAdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, rank=m.rank,
                           update_proj_gap=m.update_proj_gap, scale=m.galore_scale)

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, notify: Notify | None = None) -> StepEvents:
        gap = self.config.update_proj_gap
        return StepEvents({"galore_projector_refresh": step // gap} if step % gap == 0 else {})

    def report(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        low = [p for g in optimizer.param_groups if g.get("galore") for p in g["params"]]
        proj = sum(optimizer.state[p]["projector"].numel() * optimizer.state[p]["projector"].element_size() for p in low if "projector" in optimizer.state.get(p, {}))
        return {"method": self.name, "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "optimizer_state_bytes": optimizer_state_bytes(optimizer), "galore_rank": self.config.rank,
                "galore_projector_bytes": proj, "galore_params": sum(p.numel() for p in low)}
