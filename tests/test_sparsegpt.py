import pytest
import torch
from conftest import tiny_model, weights_of

from optimum_gblm import GBLMConfig, GBLMPruner
from optimum_gblm.masks import check_nm
from optimum_gblm.obs import sparsegpt_prune
from optimum_gblm.stats import HessianStats
from optimum_gblm.structure import prunable_modules, weight_matrix


def correlated_inputs(tokens=512, d_in=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d_in, d_in, generator=g)
    return torch.randn(tokens, d_in, generator=g) @ mixing


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_weight_update_reconstructs_better_than_masking_alone(nm):
    X = correlated_inputs()
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    stats = HessianStats(64, torch.device("cpu"))
    stats.add_batch(X.unsqueeze(0))
    updated, mask = sparsegpt_prune(W, stats.hessian, 0.5, nm, blocksize=16)
    masked = W * mask
    assert not torch.equal(updated, masked), "SparseGPT must change the weights it keeps"
    assert torch.equal(updated == 0, ~mask | (updated == 0))
    error_updated = (X @ W.T - X @ updated.T).norm()
    error_masked = (X @ W.T - X @ masked.T).norm()
    assert error_updated < 0.8 * error_masked
    if nm:
        assert check_nm(mask, *nm)
    else:
        assert (~mask).sum().item() == W.numel() // 2


def test_hessian_running_form():
    batches = [torch.randn(1, 5, 3), torch.randn(2, 5, 3)]
    stats = HessianStats(3, torch.device("cpu"))
    for b in batches:
        stats.add_batch(b)
    x = torch.cat(batches).reshape(-1, 3)
    torch.testing.assert_close(stats.hessian, 2 / 3 * x.T @ x)


def test_dead_inputs_are_zeroed():
    X = correlated_inputs(d_in=16)
    X[:, 3] = 0
    stats = HessianStats(16, torch.device("cpu"))
    stats.add_batch(X.unsqueeze(0))
    updated, _ = sparsegpt_prune(torch.randn(8, 16), stats.hessian, 0.25)
    assert torch.equal(updated[:, 3], torch.zeros(8))


def test_a_broken_hessian_names_the_layer_and_never_gives_nan():
    hessian = torch.full((8, 8), float("nan"))
    with pytest.raises(FloatingPointError, match="model.layers.3.mlp.down_proj.*larger damping"):
        sparsegpt_prune(torch.randn(4, 8), hessian, 0.5, name="model.layers.3.mlp.down_proj")
    indefinite = -torch.eye(8)
    indefinite[0, 0] = 1.0
    with pytest.raises(FloatingPointError, match="not positive definite"):
        sparsegpt_prune(torch.randn(4, 8), indefinite, 0.5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_sparsegpt_in_the_engine_gives_exact_sparsity(family, pattern):
    model = tiny_model(family)
    before = weights_of(model)
    # One calibration sequence: SparseGPT's running Hessian and gblm_obs's fold sums then come from the same single
    # product X^T X (their scalings by 2 and 1/N are exact), so the fits see one Hessian and no float noise can
    # flip a near-tied mask choice. With several sequences they sum in different orders, and on another machine's
    # BLAS that noise, grown by the sequential OBS solve, has flipped weights in later blocks.
    ids = torch.randint(0, 96, (1, 128), generator=torch.Generator().manual_seed(0))
    GBLMPruner(GBLMConfig(method="sparsegpt", pattern=pattern, sparsity=0.5), show_progress=False).prune(model, ids)
    for name, module in prunable_modules(model).items():
        weight = weight_matrix(module)
        assert (weight == 0).sum().item() == weight.numel() // 2, name
        if pattern != "unstructured":
            assert check_nm(weight != 0, *map(int, pattern.split(":"))), name
        kept = weight != 0
        assert not torch.equal(weight[kept], weight_matrix_of(before, name, module)[kept]), "kept weights are updated"
    assert torch.isfinite(torch.cat([p.flatten() for p in model.parameters()])).all()


def weight_matrix_of(state, name, module):
    weight = state[f"{name}.weight"]
    return weight.t() if weight.shape != weight_matrix(module).shape else weight


def test_seeded_sparsegpt_runs_are_deterministic(tokenizer):
    from conftest import sample_text

    results = []
    for _ in range(2):
        model = tiny_model("llama")
        config = GBLMConfig(method="sparsegpt", pattern="2:4", num_samples=4, seqlen=16, seed=7)
        GBLMPruner(config, show_progress=False).prune(model, [sample_text(500)], tokenizer=tokenizer)
        results.append(weights_of(model))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_sparsegpt_checkpoint_round_trips(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    GBLMPruner(GBLMConfig(method="sparsegpt"), show_progress=False).prune(model, torch.randint(0, 96, (4, 16)))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(v, weights_of(model)[k]) for k, v in weights_of(loaded).items())
    assert loaded.config.quantization_config.method == "sparsegpt"


def test_config_checks_sparsegpt_settings():
    with pytest.raises(ValueError, match="sparsegpt damping must be a number > 0"):
        GBLMConfig(method="sparsegpt", method_options={"damping": 0})
    with pytest.raises(ValueError, match="multiple of M=8"):
        GBLMConfig(method="sparsegpt", pattern="4:8", method_options={"blocksize": 12})


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_refit_keeps_its_mask_and_is_gblm_obs_at_mu_zero(pattern):
    # One calibration sequence: SparseGPT's running Hessian and gblm_obs's fold sums then come from the same single
    # product X^T X (their scalings by 2 and 1/N are exact), so the fits see one Hessian and no float noise can
    # flip a near-tied mask choice. With several sequences they sum in different orders, and on another machine's
    # BLAS that noise, grown by the sequential OBS solve, has flipped weights in later blocks.
    ids = torch.randint(0, 96, (1, 128), generator=torch.Generator().manual_seed(0))
    results = {}
    for label, method, options in (
        ("published", "sparsegpt", {}),
        ("refit", "sparsegpt", {"refit_steps": 8}),
        ("gblm_obs", "gblm_obs", {"score": "wanda", "mu": 0.0, "refit_steps": 8}),
    ):
        model = tiny_model("llama")
        config = GBLMConfig(method=method, pattern=pattern, sparsity=0.5, method_options=options)
        GBLMPruner(config, show_progress=False).prune(model, ids)
        results[label] = weights_of(model)
    first_block = [n for n, v in results["refit"].items() if n.startswith("model.layers.0.") and v.dim() == 2]
    for name in first_block:  # block 0 sees the same inputs in every run
        assert torch.equal(results["refit"][name] == 0, results["published"][name] == 0), name
        assert not torch.allclose(results["refit"][name], results["published"][name]), name
    for name, value in results["refit"].items():  # the same fit on the same Hessians
        assert torch.equal(value == 0, results["gblm_obs"][name] == 0), name
        torch.testing.assert_close(value, results["gblm_obs"][name], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="sparsegpt refit_steps must be an integer >= 0"):
        GBLMConfig(method="sparsegpt", method_options={"refit_steps": -1})
