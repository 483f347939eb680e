"""The shard helpers on plain tensors (one process); their DTensor side is exercised by the
2-process FSDP tests in test_distributed.py."""

import torch

from rankscope.parallel import distributed
from rankscope.parallel.sharding import assign_, full, local, model_is_sharded, shard_of


def test_plain_tensors_pass_through_and_move_to_the_target_device():
    x = torch.arange(6.0).view(2, 3)
    assert torch.equal(full(x), x) and local(x) is x
    # the full value moves to where the target lives (a CUDA moment given a CPU mask, say)
    assert shard_of(x, torch.empty(2, 3, device="meta")).device.type == "meta"
    target = torch.zeros(2, 3)
    assign_(target, x)
    assert torch.equal(target, x)


def test_full_detaches():
    w = torch.nn.Parameter(torch.ones(2))
    assert not full(w * 2).requires_grad


def test_single_process_flags_and_models():
    assert distributed.all_ranks_true(True, torch.device("cpu")) and not distributed.any_rank_true(False, torch.device("cpu"))
    assert distributed.is_main_process()
    assert not model_is_sharded(torch.nn.Linear(2, 2))
