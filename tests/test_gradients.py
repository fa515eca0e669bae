import pytest
import torch
from conftest import tiny_model, weights_of

from optimum_gblm import GBLMConfig, GBLMPruner
from optimum_gblm import gradients as gradients_module
from optimum_gblm.engine import prunable_modules
from optimum_gblm.gradients import (
    cached_gradient_norms,
    compute_gradient_norms,
    load_gradient_norms,
    save_gradient_norms,
)


def naive_norms(model, ids, modules, norm, scale):
    """Per-sample autograd, the whole gradient kept, then reduced: the definition, written plainly."""
    per_sample = {name: [] for name in modules}
    for i in range(ids.shape[0]):
        model.zero_grad()
        model(input_ids=ids[i : i + 1], labels=ids[i : i + 1]).loss.backward()
        for name, module in modules.items():
            per_sample[name].append(module.weight.grad.detach().clone() * scale)
    model.zero_grad()
    if norm == "l1":
        return {n: torch.stack(g).abs().sum(0) for n, g in per_sample.items()}
    return {n: torch.stack(g).pow(2).sum(0).sqrt() for n, g in per_sample.items()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_streamed_accumulation_equals_naive_autograd(family, norm, calibration_ids):
    model = tiny_model(family)
    modules = prunable_modules(model)
    streamed = compute_gradient_norms(model, calibration_ids, modules, norm=norm, scale=100.0, show_progress=False)
    reference = naive_norms(model, calibration_ids, modules, norm, 100.0)
    assert set(streamed) == set(reference)
    for name in reference:
        assert streamed[name].dtype == torch.float32
        torch.testing.assert_close(streamed[name], reference[name], rtol=1e-5, atol=1e-6)
        assert streamed[name].abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_norms(calibration_ids):
    model = tiny_model("llama")
    modules = prunable_modules(model)
    plain = compute_gradient_norms(model, calibration_ids, modules, show_progress=False)
    checkpointed = compute_gradient_norms(model, calibration_ids, modules, gradient_checkpointing=True, show_progress=False)
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-5, atol=1e-6)
    assert not model.is_activation_checkpointing and not model.training


def test_gradient_stage_leaves_the_model_as_it_was(calibration_ids):
    model = tiny_model("llama")
    before = weights_of(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    compute_gradient_norms(model, calibration_ids, prunable_modules(model), show_progress=False)
    after = weights_of(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_nan_gradients_name_the_layer(calibration_ids):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"model\.layers\.\d\..*NaN or inf.*float32"):
        compute_gradient_norms(model, calibration_ids, prunable_modules(model), show_progress=False)


def test_cache_is_reused_and_invalidated(tmp_path, calibration_ids, monkeypatch):
    model = tiny_model("llama")
    modules = prunable_modules(model)
    calls = []
    real = gradients_module.compute_gradient_norms

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gradients_module, "compute_gradient_norms", counting)
    first = cached_gradient_norms(model, calibration_ids, modules, cache_dir=tmp_path, show_progress=False)
    second = cached_gradient_norms(model, calibration_ids, modules, cache_dir=tmp_path, show_progress=False)
    assert len(calls) == 1 and len(list(tmp_path.glob("*.safetensors"))) == 1
    assert all(torch.equal(first[n], second[n]) for n in first)
    # other data, other norm, other scale, other weights: each recomputes
    cached_gradient_norms(model, calibration_ids.flip(0), modules, cache_dir=tmp_path, show_progress=False)
    cached_gradient_norms(model, calibration_ids, modules, norm="l2", cache_dir=tmp_path, show_progress=False)
    cached_gradient_norms(model, calibration_ids, modules, scale=10.0, cache_dir=tmp_path, show_progress=False)
    other = tiny_model("llama", seed=1)
    cached_gradient_norms(other, calibration_ids, prunable_modules(other), cache_dir=tmp_path, show_progress=False)
    assert len(calls) == 5 and len(list(tmp_path.glob("*.safetensors"))) == 5
    assert not list(tmp_path.glob("*.tmp"))


def test_pruning_at_two_sparsities_computes_gradients_once(tmp_path, calibration_ids, monkeypatch):
    calls = []
    real = gradients_module.compute_gradient_norms
    monkeypatch.setattr(gradients_module, "compute_gradient_norms", lambda *a, **k: calls.append(1) or real(*a, **k))
    base = tiny_model("llama")
    for sparsity, pattern in [(0.5, "unstructured"), (0.5, "2:4"), (0.7, "unstructured")]:
        model = tiny_model("llama")
        GBLMPruner(GBLMConfig(sparsity=sparsity, pattern=pattern), cache_dir=tmp_path, show_progress=False).prune(model, calibration_ids)
    assert len(calls) == 1
    del base


def test_damaged_cache_entry_is_recomputed(tmp_path, calibration_ids):
    model = tiny_model("llama")
    modules = prunable_modules(model)
    first = cached_gradient_norms(model, calibration_ids, modules, cache_dir=tmp_path, show_progress=False)
    (entry,) = tmp_path.glob("*.safetensors")
    entry.write_bytes(b"not a safetensors file")
    again = cached_gradient_norms(model, calibration_ids, modules, cache_dir=tmp_path, show_progress=False)
    assert all(torch.equal(first[n], again[n]) for n in first)


def test_norms_from_another_model_are_refused(tmp_path, calibration_ids):
    small = tiny_model("llama")
    norms = compute_gradient_norms(small, calibration_ids, prunable_modules(small), show_progress=False)
    save_gradient_norms(norms, tmp_path / "norms.safetensors")
    import transformers

    wider = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)
    )
    before = weights_of(wider)
    with pytest.raises(ValueError, match="shape .* from another model"):
        load_gradient_norms(tmp_path / "norms.safetensors", prunable_modules(wider))
    with pytest.raises(ValueError, match="another model"):
        GBLMPruner(GBLMConfig(), show_progress=False).prune(wider, calibration_ids, gradient_norms=tmp_path / "norms.safetensors")
    assert all(torch.equal(before[k], v) for k, v in weights_of(wider).items())


def test_gradient_stage_refuses_a_model_that_still_carries_masks(calibration_ids):
    from optimum_gblm import prune
    from optimum_gblm.sparse_state import restore_dense

    model = tiny_model("llama")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    prune(model, calibration_ids, method="wanda", pattern="2:4", show_progress=False)
    model.load_state_dict(dense)  # dense weights back, but the 2:4 mask hooks remain
    modules = prunable_modules(model)
    with pytest.raises(ValueError, match="detach_masks"):
        compute_gradient_norms(model, calibration_ids, modules, show_progress=False)
    restore_dense(model, dense)
    fresh = tiny_model("llama")
    expected = compute_gradient_norms(fresh, calibration_ids, prunable_modules(fresh), show_progress=False)
    norms = compute_gradient_norms(model, calibration_ids, modules, show_progress=False)
    assert all(torch.equal(norms[n], expected[n]) for n in expected)
