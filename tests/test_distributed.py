"""The gradient stage sharded over processes (gloo on CPU) equals the single-process result."""

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _worker(rank: int, world: int, store: str, out: str, norm: str) -> None:
    torch.set_num_threads(1)
    from conftest import tiny_model

    from optimum_gblm.engine import prunable_modules
    from optimum_gblm.gradients import compute_gradient_norms

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = tiny_model("llama")
        ids = torch.randint(0, 96, (5, 16), generator=torch.Generator().manual_seed(4))
        norms = compute_gradient_norms(model, ids, prunable_modules(model), norm=norm, show_progress=False)
        torch.save(norms, f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_two_process_gradient_norms_equal_one_process(tmp_path, norm):
    from conftest import tiny_model

    from optimum_gblm.engine import prunable_modules
    from optimum_gblm.gradients import compute_gradient_norms

    out = str(tmp_path / "norms")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), out, norm), nprocs=2, join=True)
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (5, 16), generator=torch.Generator().manual_seed(4))
    single = compute_gradient_norms(model, ids, prunable_modules(model), norm=norm, show_progress=False)
    for rank in (0, 1):
        sharded = torch.load(f"{out}.rank{rank}")
        assert set(sharded) == set(single)
        for name in single:
            torch.testing.assert_close(sharded[name], single[name], rtol=1e-5, atol=1e-6)
