"""The worked examples of docs/adding-a-method.md beyond `ToyMethod` (tests/integration/test_components.py):
an adapter family built on rankscope.adapters and a sparse family built on optim.SplitAdamW, each one class
in one file, registered from outside the package and trained end to end. The doc's code blocks are excerpts
of this file (tests/unit/test_adding_a_method_doc.py checks it)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers import assert_same_final_weights, crash_and_resume, final_weights, tiny_config, tiny_overrides

from rankscope.adapters.common import seeded_generator
from rankscope.adapters.lora import capture_effective_grads, effective_grads, lora_parameters, wrap_linears
from rankscope.adapters.stored import adapter_layout, merged_state_dict
from rankscope.analysis.bounds import low_rank_updates
from rankscope.core.errors import ConfigError
from rankscope.core.schema import check, option
from rankscope.methods import METHODS, build_model, load_config, register_method
from rankscope.methods.base import Method
from rankscope.methods.memory import match_memory, measured_state_bytes
from rankscope.model import Decoder
from rankscope.optim import SplitAdamW, adamw_update_, build_adamw, check_coverage, targeted_groups, targeted_weights
from rankscope.store.checkpoint import list_checkpoints, open_checkpoint
from rankscope.train.loop import train


# --------------------------------------------------------------------------- an adapter family
@dataclass
class ToyAdapterConfig:
    rank: int = option(4, "adapter rank r")
    alpha: float = option(8.0, "the update is scaled by alpha / rank")
    targets: list[str] = option(["wq", "wv"], "linears that get adapters (by name)")

    def validate(self) -> None:
        check(self.rank > 0 and self.alpha > 0, "method.toy_adapter.rank and alpha must be positive")


class ToyAdapterMethod(Method):
    """LoRA factors on the targeted linears; every other weight frozen, so only the factors train."""

    name = "toy_adapter"
    config_class = ToyAdapterConfig
    supports_fsdp = False  # not tested under train.parallel=fsdp
    low_rank_updates = True  # one fixed rank per layer: analysis bounds each update's rank by r

    def prepare_model(self, model):
        for p in model.parameters():
            p.requires_grad_(False)  # the base: embeddings, norms, head, every linear
        c = self.config
        wrap_linears(model, c.targets, c.rank, c.alpha, 0.0, self.cfg.train.seed)  # A, B trainable; A seeded

    def build_optimizer(self, model, device):
        groups = [{"params": lora_parameters(model), "weight_decay": self.cfg.train.weight_decay, "name": "adapters"}]
        check_coverage(model, groups)  # every trainable parameter in exactly one group
        return build_adamw(groups, self.cfg.train, device)

    def adapter_facts(self, model):
        return adapter_layout(model)  # {layer: {rank, scaling}}: each checkpoint's meta `adapters`

    def capture_grads(self, model, on):
        capture_effective_grads(model, on)  # checkpoint.save_grads: the gradient of W0 + (alpha/r) B A

    def captured_grads(self, model):
        return effective_grads(model)


@pytest.fixture
def toy_adapter():
    register_method(ToyAdapterMethod)
    yield ToyAdapterMethod
    METHODS.pop(ToyAdapterMethod.name, None)


def test_toy_adapter_method_trains_only_its_factors_and_is_read_as_a_dense_model(data_dir, tmp_path, toy_adapter):
    cfg = load_config(None, tiny_overrides(data_dir, "method.name=toy_adapter", "train.max_steps=4", "checkpoint.every=4",
                                           "checkpoint.save_grads=true"))
    summary = train(cfg, tmp_path / "run", log=lambda s: None)
    assert summary["steps"] == 4 and summary["method"] == "toy_adapter"
    ck = open_checkpoint(tmp_path / "run" / "checkpoints" / "step_000004")
    names = [f"blocks.{i}.attn.{t}" for i in range(cfg.model.n_layers) for t in ("wq", "wv")]
    assert ck.meta["adapters"] == {n: {"rank": 4, "scaling": 2.0} for n in names}

    # only the adapter factors moved: every other tensor is bit-identical to the initial model's
    init = build_model(cfg)[0].state_dict()
    trained = ck.load("model")
    assert trained.keys() == init.keys()
    factors = {k for k in trained if k.endswith((".lora_A", ".lora_B"))}
    assert len(factors) == 2 * len(names)
    assert all(torch.equal(trained[k], init[k]) for k in trained.keys() - factors)
    assert all(not torch.equal(trained[k], init[k]) for k in factors)
    assert set(ck.load("grads")) >= {f"{n}.base.weight" for n in names}  # captured_grads, under the stored key

    # the stored format merges into a plain Decoder that computes what the adapted model computes
    adapted, _ = build_model(cfg)
    adapted.load_state_dict(trained)
    dense = Decoder(cfg.model)
    dense.load_state_dict(merged_state_dict(trained, ck.meta["adapters"]))
    idx = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dense.eval()(idx), adapted.eval()(idx), rtol=0, atol=1e-5)
    assert low_rank_updates("toy_adapter")  # analysis bounds its updates' rank by what the method declares


# --------------------------------------------------------------------------- a sparse family
@dataclass
class ToySparseConfig:
    density: float = option(0.1, "fraction of each targeted weight's entries that train (a fixed random support)")
    targets: list[str] = option(["wq", "wv"], "linears whose weights train sparsely (by name)")

    def validate(self) -> None:
        check(0 < self.density <= 1, f"method.toy_sparse.density={self.density} must be in (0, 1]")


def support_size(numel: int, density: float) -> int:
    return max(1, int(density * numel))  # int() rounds down: at most density * numel entries move


class FixedSupportAdamW(SplitAdamW):
    """AdamW; in groups with `sparse=True` each weight moves only on a random support of `density` of
    its entries, drawn at its first step from (seed, parameter index) and kept for the whole run."""

    flag = "sparse"
    index_keys = ("support",)  # int64 indices stay int64 through a checkpoint

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, density=1.0, seed=0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, sparse=False,
                                      density=density, seed=seed))

    def special_step(self, p, state, group, index):
        if "support" not in state:  # the moments exist for the support only: that is the memory saved
            k = support_size(p.numel(), group["density"])
            perm = torch.randperm(p.numel(), generator=seeded_generator(group["seed"], 7, 0, index))
            state["support"] = torch.sort(perm[:k]).values.to(p.device)
            state["exp_avg"] = torch.zeros(k, dtype=p.dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(k, dtype=p.dtype, device=p.device)
        idx, flat = state["support"], p.view(-1)
        value = flat[idx]
        state["step"] += 1
        beta1, beta2 = group["betas"]
        adamw_update_(value, p.grad.reshape(-1)[idx], state["exp_avg"], state["exp_avg_sq"], int(state["step"].item()),
                      group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
        flat.index_copy_(0, idx, value)


class ToySparseMethod(Method):
    """The targeted linears' weights trained on a fixed random support each; everything else dense AdamW."""

    name = "toy_sparse"
    config_class = ToySparseConfig
    supports_fsdp = False  # index_copy_ on whole weights, not on FSDP2 shards
    memory_knob = "density"  # methods.memory.match_memory sets method.toy_sparse.density

    @staticmethod
    def state_bytes(numel: int, density: float, element_size: int = 4) -> int:
        return support_size(numel, density) * (8 + 2 * element_size)  # int64 index, m and v per entry

    @classmethod
    def smallest_density(cls, sizes: list[int]) -> float:
        return 1.0 / min(sizes)  # smaller, the smallest weight would keep 1 entry: above its density

    def build_optimizer(self, model, device):
        t, c = self.cfg.train, self.config
        groups = targeted_groups(model, t, c.targets, "sparse", sparse=True)  # dense groups + the targets, coverage checked
        return FixedSupportAdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, density=c.density, seed=t.seed)


@pytest.fixture
def toy_sparse():
    register_method(ToySparseMethod)
    yield ToySparseMethod
    METHODS.pop(ToySparseMethod.name, None)


def test_toy_sparse_method_moves_only_its_support_and_resumes_bit_exactly(data_dir, tmp_path, toy_sparse):
    over = tiny_overrides(data_dir, "method.name=toy_sparse", "method.toy_sparse.density=0.05", "train.max_steps=6", "checkpoint.every=3")
    straight, resumed = crash_and_resume(over, tmp_path, crash_at=4)  # resumes from step 3
    assert_same_final_weights(straight, resumed, ("model", "optimizer"))
    assert (list_checkpoints(resumed / "checkpoints")[-1][0]) == 6

    cfg = load_config(None, over)
    init = build_model(cfg)[0].state_dict()
    trained = final_weights(straight)
    for key in init:
        if key.endswith((".wq.weight", ".wv.weight", ".w1.weight")):
            changed = (trained[key] != init[key]).float().mean().item()
            if key.endswith(".w1.weight"):
                assert changed > 0.5, (key, changed)  # a linear not targeted trains densely
            else:
                assert 0 < changed <= 0.05, (key, changed)  # its support, no entry outside it


def test_memory_matching_sets_the_toy_sparse_density(data_dir, toy_sparse):
    budget = measured_state_bytes(tiny_config(data_dir, "method.name=toy_sparse", "method.toy_sparse.density=0.1"))
    got = match_memory(tiny_config(data_dir, "method.name=toy_sparse", "method.toy_sparse.density=0.5"), budget)
    d = got.method.options.density
    assert measured_state_bytes(got) == budget  # match_memory also asserts state_bytes == what the optimiser allocates
    sizes = [p.numel() for p in targeted_weights(Decoder(got.model), got.method.options.targets)]
    assert 0.1 <= d < 0.1 + 1 / min(sizes)  # the largest density whose state fits
    with pytest.raises(ConfigError, match="smallest density"):
        match_memory(got, budget // 10)
