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

    from optimum_gblm.gradients import compute_gradient_norms
    from optimum_gblm.structure import prunable_modules

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

    from optimum_gblm.gradients import compute_gradient_norms
    from optimum_gblm.structure import prunable_modules

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


# -- FSDP2: a model sharded over the ranks -----------------------------------------------------------------------
def _fsdp2_available() -> str | None:
    """Why FSDP2 on CPU with gloo cannot run here, or None when it can."""
    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with the gloo backend is not available in this torch build"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (public since torch 2.6)
    except ImportError:
        return f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2, torch >= 2.6)"
    return None


def _shard(model, world: int, wrap: str):
    """The model wrapped with FSDP2 on a CPU mesh: by hand (one unit per decoder block, then the root), or by
    accelerate's own FSDP2 preparation (`Accelerator.prepare` calls it; Accelerator itself only enables FSDP on an
    accelerator, so the CPU test calls it with the plugin directly)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if wrap == "fully_shard":
        mesh = init_device_mesh("cpu", (world,))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    from types import SimpleNamespace

    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no", is_main_process=dist.get_rank() == 0,
        device=torch.device("cpu"),
    )
    return fsdp2_prepare_model(accelerator, model)


def _fsdp_worker(rank: int, world: int, store: str, out: str, norm: str, wrap: str) -> None:
    torch.set_num_threads(1)
    from conftest import tiny_model

    from optimum_gblm.gradients import cache_key, cached_gradient_norms, is_dtensor
    from optimum_gblm.structure import prunable_modules

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = _shard(tiny_model("llama"), world, wrap)
        modules = prunable_modules(model)
        full = lambda: {n: p.full_tensor().clone() for n, p in model.named_parameters()}  # noqa: E731
        before, requires_grad = full(), {n: p.requires_grad for n, p in model.named_parameters()}
        ids = torch.randint(0, 96, (5, 16), generator=torch.Generator().manual_seed(4))
        cache = f"{out}.cache"
        norms = cached_gradient_norms(model, ids, modules, norm=norm, cache_dir=cache, show_progress=False)
        again = cached_gradient_norms(model, ids, modules, norm=norm, cache_dir=cache, show_progress=False)  # a hit
        from optimum_gblm import GBLMConfig, GBLMPruner

        try:  # the layer-wise stage needs whole weights: refused, before anything changes
            GBLMPruner(GBLMConfig(method="wanda"), show_progress=False).prune(model, ids)
            refused = ""
        except ValueError as error:
            refused = str(error)
        torch.save(
            {
                "norms": norms,
                "again": again,
                "key": cache_key(model, modules, ids, norm, 1.0),
                "before": before,
                "after": full(),
                "refused": refused,
                "requires_grad_kept": requires_grad == {n: p.requires_grad for n, p in model.named_parameters()},
                "grads_left": [n for n, p in model.named_parameters() if p.grad is not None],
                "local_rows": {n: m.weight.to_local().shape[0] for n, m in modules.items() if is_dtensor(m.weight)},
            },
            f"{out}.rank{rank}",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(_fsdp2_available() is not None, reason=str(_fsdp2_available()))
@pytest.mark.parametrize("norm,wrap", [("l1", "fully_shard"), ("l2", "fully_shard"), ("l2", "accelerate")])
def test_fsdp2_sharded_model_gradient_norms_equal_one_process(tmp_path, norm, wrap):
    """Every rank runs every sequence on its shard of the weights; the gathered norms are the single-process ones."""
    from conftest import tiny_model

    from optimum_gblm.gradients import cache_key, compute_gradient_norms
    from optimum_gblm.structure import prunable_modules

    out = str(tmp_path / "norms")
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "store"), out, norm, wrap), nprocs=2, join=True)
    model = tiny_model("llama")
    modules = prunable_modules(model)
    ids = torch.randint(0, 96, (5, 16), generator=torch.Generator().manual_seed(4))
    single = compute_gradient_norms(model, ids, modules, norm=norm, show_progress=False)
    for rank in (0, 1):
        result = torch.load(f"{out}.rank{rank}")
        # the weights really were sharded: each rank held half the rows of every prunable weight
        assert set(result["local_rows"]) == set(modules)
        assert all(rows == modules[n].weight.shape[0] // 2 for n, rows in result["local_rows"].items())
        for key in ("norms", "again"):
            assert set(result[key]) == set(single)
            for name in single:
                assert result[key][name].shape == single[name].shape
                torch.testing.assert_close(result[key][name], single[name], rtol=1e-5, atol=1e-6)
        # the weights are unchanged, and the same as the unsharded model's; nothing is left behind
        for name, weight in model.state_dict().items():
            if name in result["before"]:
                assert torch.equal(result["before"][name], weight)
                assert torch.equal(result["after"][name], weight)
        assert result["requires_grad_kept"] and result["grads_left"] == []
        assert "cannot prune a model sharded with FSDP" in result["refused"]
        # the cache key is computed from full weights: the sharded and the plain model share the cache entry
        assert result["key"] == cache_key(model, modules, ids, norm, 1.0)
        assert (tmp_path / "norms.cache" / f"{result['key']}.safetensors").is_file()


def _refusal_worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    from conftest import tiny_model
    from torch.distributed.fsdp import FullyShardedDataParallel

    from optimum_gblm.gradients import compute_gradient_norms
    from optimum_gblm.structure import prunable_modules

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    errors = {}
    try:
        model = tiny_model("llama")
        ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(rank))  # differs per rank
        for case, run in {
            "calibration": lambda: compute_gradient_norms(model, ids, prunable_modules(model), show_progress=False),
            "fsdp1": lambda: compute_gradient_norms(
                FullyShardedDataParallel(tiny_model("llama"), device_id=torch.device("cpu"), use_orig_params=True),
                ids, {}, show_progress=False),
        }.items():
            try:
                run()
            except (ValueError, NotImplementedError) as error:
                errors[case] = f"{type(error).__name__}: {error}"
        torch.save(errors, f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(_fsdp2_available() is not None, reason=str(_fsdp2_available()))
def test_distributed_refusals(tmp_path):
    """Ranks with different calibration tokens, and FSDP1 models, are refused on every rank (nothing hangs)."""
    out = str(tmp_path / "errors")
    mp.spawn(_refusal_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    for rank in (0, 1):
        errors = torch.load(f"{out}.rank{rank}")
        assert "different calibration tokens" in errors["calibration"]
        assert errors["fsdp1"].startswith("NotImplementedError") and "fsdp_version" in errors["fsdp1"]
