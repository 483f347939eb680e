"""What the rank metrics are computed on, read from checkpoint tensors (state-dict keys only).

Components per layer i (module `blocks.i.attn.*` / `blocks.i.mlp.*`): attention wq, wk, wv, wo;
SwiGLU w1 (gate), w3 (up), w2 (down); optionally embed, lm_head. Weights are torch Linear weights,
(out, in): W_V is (n_kv_heads*hd, d), W_O is (d, n_heads*hd). With g = h // (n_heads / n_kv_heads)
(GQA), V_g = W_V[g*hd:(g+1)*hd, :] (hd, d) and O_h = W_O[:, h*hd:(h+1)*hd] (d, hd), three OV forms:

  ov          V_g @ O_h                (hd, hd), head = h   pico-analyze's per-head OV circuit
  ov_layer    [ov_0 | ov_1 | ... ]     (hd, n_heads*hd) = (hd, d), head = -1: pico-analyze's
                                       per-layer form, the heads concatenated along dim 1
  ov_product  O_h @ V_g                (d, d), rank <= hd, head = h: the map the head applies to
                                       the residual stream (Elhage et al. 2021), kept factored

`ov` and `ov_product` are the two orders of the same two factors: they share their non-zero
eigenvalues, not their singular values, so their PER differ (PER divides by hd for ov, by d for
ov_product) and ov_product's condition number is inf (d - hd exact zero singular values).
See docs/metrics.md.

Kinds of matrix (the `kind` column):
  weight             the effective weight: W, or for a LoRA-wrapped linear W0 + (alpha/r) B A
  lora_update        (alpha/r) B A of a LoRA-wrapped linear (kept factored: rank <= r)
  grad               the gradient stored in grads.safetensors (checkpoint.save_grads); for a
                     LoRA-wrapped linear the gradient with respect to the effective weight
                     (stored under X.base.weight), the same quantity as a dense weight's gradient
  update             W_t - W_prev between consecutive checkpoints (effective weights)
  cumulative_update  W_t - W_0 (the re-created initialisation, else the first checkpoint)
  cycle_update       a ReLoRA cycle's merged dW from RUN/relora_updates/
OV circuits are computed for weights, and as the circuit's change for `update` and `cumulative_update`
(ov(W_t) - ov(W_prev) etc.: `delta_ov_items`); not for gradients, adapters or cycle updates.

Each item carries `rank_bound`, the rank its construction allows (r for a LoRA or cycle update,
k*r for an update made of k rank-r pieces, hd for ov_product, the token count for a gradient,
else min(m, n)); the `rank_bound` metric reports it divided by min(m, n), the ceiling of PER.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors import safe_open

from rankscope.spectral import AnalysisError
from rankscope.names import EMBEDDINGS, OV_FORMS, TARGETS  # the one table of matrix and component names
# the order tables and figures show components in: the paper's first (Weiss et al. 2025, §4: attention V, O, the OV
# circuit, SwiGLU down), then the rest of the table above in its order
PAPER_COMPONENTS = ("wv", "wo", "ov", "ov_layer", "w2")
COMPONENT_ORDER = (*PAPER_COMPONENTS, *(c for c in (*TARGETS, *OV_FORMS, *EMBEDDINGS) if c not in PAPER_COMPONENTS))


def order_components(components) -> list[str]:
    """`components` in COMPONENT_ORDER; names outside the table last, sorted."""
    comps = set(components)
    return [c for c in COMPONENT_ORDER if c in comps] + sorted(comps - set(COMPONENT_ORDER))
OV_KINDS = ("weight", "update", "cumulative_update")  # kinds whose OV circuits analyze forms (rankscope.studies.preflight reads it)
_MODULE = re.compile(r"^blocks\.(\d+)\.(?:attn|mlp)\.(\w+)$")


@dataclass
class Item:
    """One matrix to analyse: dense `mat` (m, n) or the factors `A` (m, r) @ `B` (r, n)."""

    layer: int  # -1 for embeddings
    component: str  # wq ... w3, ov, ov_layer, ov_product, embed, lm_head
    head: int  # OV head index (ov, ov_product), else -1
    kind: str
    mat: torch.Tensor | None = None
    factors: tuple[torch.Tensor, torch.Tensor] | None = None
    rank_bound: int | None = None  # rank allowed by construction; None: r for factors, else min(m, n)

    @property
    def bound(self) -> int:
        m, n = self.shape
        own = self.rank_bound if self.rank_bound is not None else (self.factors[0].shape[1] if self.factors is not None else m)
        return min(own, m, n)

    @property
    def shape(self) -> tuple[int, int]:
        if self.mat is not None:
            return tuple(self.mat.shape)
        return self.factors[0].shape[0], self.factors[1].shape[1]

    @property
    def key(self) -> tuple[int, str, int, str]:
        return self.layer, self.component, self.head, self.kind


def parse_module(name: str) -> tuple[int, str] | None:
    """`blocks.3.attn.wv` -> (3, 'wv'); `embed`/`lm_head` -> (-1, name); anything else None."""
    if name in EMBEDDINGS:
        return -1, name
    m = _MODULE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def wanted(name: str, include_embeddings: bool) -> bool:
    parsed = parse_module(name)
    if parsed is None:
        return False
    return parsed[1] in TARGETS or (include_embeddings and parsed[1] in EMBEDDINGS)


def _module_of(key: str) -> tuple[str, str] | None:
    """state-dict key -> (module name, role) with role weight, base, lora_A, lora_B."""
    for suffix, role in ((".base.weight", "base"), (".lora_A", "lora_A"), (".lora_B", "lora_B"), (".weight", "weight")):
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


# --------------------------------------------------------------------------- reading
def read_tensors(path: Path, include_embeddings: bool = False, aliases: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The 2-D tensors of target modules in one safetensors file, read lazily (only those keys)."""
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
        for key in keys:
            mod = _module_of(key)
            if mod and wanted(mod[0], include_embeddings):
                out[key] = fh.get_tensor(key)
        for alias, target in (aliases or {}).items():  # tied embeddings are stored once
            mod = _module_of(alias)
            if mod and wanted(mod[0], include_embeddings) and target in keys:
                out[alias] = out[target] if target in out else fh.get_tensor(target)
    return out


def lora_scaling(config: Mapping[str, Any] | None) -> float | None:
    """alpha / rank from a run config dict (either method form), None when absent: one scaling for
    every layer, as runs with a fixed rank store it (per-layer facts: adapters.stored.stored_adapters)."""
    from rankscope.config import method_options

    opts = method_options(dict((config or {}).get("method") or {}))
    if "alpha" in opts and "rank" in opts:
        return float(opts["alpha"]) / float(opts["rank"])
    return None


def effective_weights(state: Mapping[str, torch.Tensor], adapters: Mapping[str, Mapping[str, float]] | float | None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """module -> effective weight (fp32), and module -> LoRA update factors (scaling B, A).

    A LoRA-wrapped linear (keys X.base.weight, X.lora_A (r x in), X.lora_B (out x r)) with its rank
    and scaling in `adapters` (rankscope.adapters.stored.stored_adapters / adapter_layout) has the
    effective weight W0 + dW, merged by rankscope.adapters.stored.merged_state_dict (the one ΔW code)."""
    from rankscope.adapters.stored import merged_state_dict, update_factors

    if adapters is None or isinstance(adapters, (int, float)):  # one scaling for every wrapped layer (or none known)
        ranks = {k[: -len(".lora_A")]: int(t.shape[0]) for k, t in state.items() if k.endswith(".lora_A")}
        adapters = {} if adapters is None else {n: {"rank": r, "scaling": float(adapters)} for n, r in ranks.items()}
    present = {n: f for n, f in adapters.items() if f"{n}.base.weight" in state}
    loose = sorted({k.rsplit(".lora_", 1)[0] for k in state if ".lora_" in k} - set(present))
    if loose:
        raise AnalysisError(f"{loose[0]} has LoRA adapters but the checkpoint records no rank/scaling for it (method.alpha/method.rank)")
    plain = {(k[: -len(".base.weight")] + ".weight" if k.endswith(".base.weight") and k[: -len(".base.weight")] not in present else k): t
             for k, t in state.items() if t.dim() == 2}
    weights = {}
    for key, t in merged_state_dict(plain, present).items():
        mod = _module_of(key)
        if mod is not None and mod[1] == "weight":
            weights[mod[0]] = t.float()
    return weights, update_factors(plain, present)


# --------------------------------------------------------------------------- items
def head_layout(config: Mapping[str, Any] | None, weights: Mapping[str, torch.Tensor]) -> tuple[int, int, int] | None:
    """(n_heads, n_kv_heads, head_dim) from the run config's model section; None when unknown."""
    model = (config or {}).get("model") or {}
    if not {"n_heads", "n_kv_heads", "d_model"} <= model.keys():
        return None
    return int(model["n_heads"]), int(model["n_kv_heads"]), int(model["d_model"]) // int(model["n_heads"])


def ov_factors(wo: torch.Tensor, wv: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per query head h: (W_O[:, h cols] (d, hd), W_V[g rows] (hd, d)), g = h // (n_heads / n_kv_heads).
    O @ V is `ov_product` (d, d); V @ O is pico-analyze's `ov` (hd, hd)."""
    group = n_heads // n_kv_heads
    if wo.shape[1] != n_heads * head_dim or wv.shape[0] != n_kv_heads * head_dim:
        raise AnalysisError(f"OV circuit: wo {tuple(wo.shape)} / wv {tuple(wv.shape)} do not fit {n_heads} heads, {n_kv_heads} KV heads of dim {head_dim}")
    out = []
    for h in range(n_heads):
        g = h // group
        out.append((wo[:, h * head_dim:(h + 1) * head_dim], wv[g * head_dim:(g + 1) * head_dim, :]))
    return out


def _named(name: str) -> tuple[int, str]:
    parsed = parse_module(name)
    assert parsed is not None, name
    return parsed


def ov_heads(wo: torch.Tensor, wv: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    """pico-analyze's per-head OV circuits, (n_heads, hd, hd): ov_h = W_V[g rows] (hd, d) @ W_O[:, h cols] (d, hd)."""
    return torch.stack([V @ O for O, V in ov_factors(wo, wv, n_heads, n_kv_heads, head_dim)])


def ov_layer(heads: torch.Tensor) -> torch.Tensor:
    """pico-analyze's per-layer OV circuit: the heads' (hd, hd) circuits side by side, (hd, n_heads * hd)."""
    return torch.cat(list(heads), dim=1)


def weight_items(weights: Mapping[str, torch.Tensor], layout: tuple[int, int, int] | None, ov: Iterable[str] = OV_FORMS) -> list[Item]:
    """The effective weights as items, plus the OV forms named in `ov` (see the module docstring)."""
    items = [Item(*_named(n), -1, "weight", mat=w) for n, w in sorted(weights.items())]
    ov = set(ov)
    if ov and layout is not None:
        layers = sorted({it.layer for it in items if it.component in ("wo", "wv")})
        for i in layers:
            wo, wv = weights.get(f"blocks.{i}.attn.wo"), weights.get(f"blocks.{i}.attn.wv")
            if wo is None or wv is None:
                continue
            if ov & {"ov", "ov_layer"}:
                heads = ov_heads(wo, wv, *layout)  # (n_heads, hd, hd)
                if "ov" in ov:
                    items += [Item(i, "ov", h, "weight", mat=m) for h, m in enumerate(heads)]
                if "ov_layer" in ov:
                    items.append(Item(i, "ov_layer", -1, "weight", mat=ov_layer(heads)))
            if "ov_product" in ov:
                for h, (O, V) in enumerate(ov_factors(wo, wv, *layout)):
                    items.append(Item(i, "ov_product", h, "weight", factors=(O, V), rank_bound=layout[2]))
    return items


def lora_items(lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> list[Item]:
    return [Item(*_named(n), -1, "lora_update", factors=f) for n, f in sorted(lora.items())]


def delta_items(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor], kind: str,
                bounds: Mapping[str, int] | None = None) -> list[Item]:
    """new - old for every module in both, of the same shape; `bounds` holds known rank bounds by module."""
    bounds = bounds or {}
    return [Item(*_named(n), -1, kind, mat=new[n] - old[n], rank_bound=bounds.get(n))
            for n in sorted(new) if n in old and old[n].shape == new[n].shape]


def delta_ov_items(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor], layout: tuple[int, int, int] | None,
                   kind: str, ov: Iterable[str] = OV_FORMS) -> list[Item]:
    """The change of each OV form between two sets of weights (an `update` or `cumulative_update` of the circuit):
    ov_h(new) - ov_h(old) (hd, hd), ov_layer(new) - ov_layer(old) (hd, d), and O_h V_g (new) - O_h V_g (old)
    (d, d), kept factored as [O_new | -O_old] @ [V_new ; V_old], rank <= 2 hd. The OV circuit is bilinear in
    (W_V, W_O), so this is not the OV circuit of the weight updates dW_V, dW_O; it is how the circuit moved."""
    ov = set(ov)
    if not ov or layout is None:
        return []
    items: list[Item] = []
    layers = sorted({_named(n)[0] for n in new if parse_module(n) and parse_module(n)[1] in ("wo", "wv")})
    for i in layers:
        names = (f"blocks.{i}.attn.wo", f"blocks.{i}.attn.wv")
        if not all(n in new and n in old and new[n].shape == old[n].shape for n in names):
            continue
        (wo1, wv1), (wo0, wv0) = (new[names[0]], new[names[1]]), (old[names[0]], old[names[1]])
        if ov & {"ov", "ov_layer"}:
            heads = ov_heads(wo1, wv1, *layout) - ov_heads(wo0, wv0, *layout)  # (n_heads, hd, hd)
            if "ov" in ov:
                items += [Item(i, "ov", h, kind, mat=m) for h, m in enumerate(heads)]
            if "ov_layer" in ov:
                items.append(Item(i, "ov_layer", -1, kind, mat=ov_layer(heads)))
        if "ov_product" in ov:
            for h, ((O1, V1), (O0, V0)) in enumerate(zip(ov_factors(wo1, wv1, *layout), ov_factors(wo0, wv0, *layout))):
                items.append(Item(i, "ov_product", h, kind, factors=(torch.cat([O1, -O0], 1), torch.cat([V1, V0], 0)),
                                  rank_bound=2 * layout[2]))
    return items


def grad_items(grads: Mapping[str, torch.Tensor], include_embeddings: bool = False, tokens: int | None = None) -> list[Item]:
    """Gradients of the plain weights, and of LoRA-wrapped linears' effective weights (key X.base.weight);
    LoRA factor gradients are not a dW and are skipped. A linear's gradient is a sum of one outer
    product per token, so its rank is at most `tokens` (the tokens of the step), where known."""
    items = []
    for key, g in sorted(grads.items()):
        mod = _module_of(key)
        if mod and mod[1] in ("weight", "base") and g.dim() == 2 and wanted(mod[0], include_embeddings):
            items.append(Item(*_named(mod[0]), -1, "grad", mat=g.float(), rank_bound=tokens))
    return items


def dense_items(tensors: Mapping[str, torch.Tensor], kind: str, include_embeddings: bool = False, rank: int | None = None) -> list[Item]:
    """Module-name keyed matrices (ReLoRA cycle updates) as items of `kind`, of known rank bound `rank`."""
    return [Item(*_named(n), -1, kind, mat=t.float(), rank_bound=rank)
            for n, t in sorted(tensors.items()) if t.dim() == 2 and wanted(n, include_embeddings)]


def init_weights(config: Mapping[str, Any], include_embeddings: bool = False) -> dict[str, torch.Tensor]:
    """The run's initial weights, re-created exactly as the trainer does (seed, then Decoder)."""
    from rankscope.methods import config_from_dict
    from rankscope.model import Decoder

    cfg = config_from_dict(dict(config), schedule=False)  # a trained run's config
    torch.manual_seed(cfg.train.seed)
    with torch.no_grad():
        model = Decoder(cfg.model)
    out = {}
    for key, t in model.state_dict().items():
        mod = _module_of(key)
        if mod and mod[1] == "weight" and t.dim() == 2 and wanted(mod[0], include_embeddings):
            out[mod[0]] = t.float()
    return out


def modules_of(items: Iterable[Item]) -> set[tuple[int, str]]:
    return {(it.layer, it.component) for it in items}
