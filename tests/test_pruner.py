import pytest
import torch
from conftest import tiny_model, weights_of

from optimum_gblm import GBLMConfig, GBLMPruner, prune
from optimum_gblm.gradients import compute_gradient_norms
from optimum_gblm.structure import prunable_modules


def unchanged(model, before):
    return all(torch.equal(before[k], v) for k, v in weights_of(model).items())


def test_too_short_calibration_leaves_the_model_untouched(tokenizer):
    model = tiny_model("llama")
    before = weights_of(model)
    with pytest.raises(ValueError, match="found 3 tokens, need at least 17"):
        GBLMPruner(GBLMConfig(num_samples=2, seqlen=16)).prune(model, ["a single man"], tokenizer=tokenizer)
    assert unchanged(model, before) and getattr(model.config, "quantization_config", None) is None


def test_missing_calibration_is_explained():
    with pytest.raises(ValueError, match="needs calibration data"):
        GBLMPruner(GBLMConfig(method="wanda")).prune(tiny_model("llama"))


def test_precomputed_gradient_norms_are_used(calibration_ids):
    a, b = tiny_model("llama"), tiny_model("llama")
    norms = compute_gradient_norms(a, calibration_ids, prunable_modules(a), show_progress=False)
    GBLMPruner(GBLMConfig(), use_cache=False, show_progress=False).prune(a, calibration_ids)
    GBLMPruner(GBLMConfig(), show_progress=False).prune(b, calibration_ids, gradient_norms=norms)
    assert unchanged(a, weights_of(b))


def test_gblm_differs_from_wanda_and_reduces_to_it_without_gradients(calibration_ids):
    wanda, gblm, zero_grad = tiny_model("llama"), tiny_model("llama"), tiny_model("llama")
    prune(wanda, calibration_ids, method="wanda", show_progress=False)
    prune(gblm, calibration_ids, method="gblm", use_cache=False, show_progress=False)
    zeros = {n: torch.zeros_like(m.weight) for n, m in prunable_modules(zero_grad).items()}
    prune(zero_grad, calibration_ids, gradient_norms=zeros, show_progress=False)  # the functional form takes them too
    assert unchanged(zero_grad, weights_of(wanda))
    assert not unchanged(gblm, weights_of(wanda))


def test_alpha_weighs_the_gradient_term_linearly(calibration_ids):
    # alpha=1000 with norms G must prune exactly as alpha=1 with norms 1000 G (and not as alpha=100 does).
    a, b, c = tiny_model("llama"), tiny_model("llama"), tiny_model("llama")
    norms = compute_gradient_norms(a, calibration_ids, prunable_modules(a), show_progress=False)
    GBLMPruner(GBLMConfig(method_options={"alpha": 1000}), show_progress=False).prune(a, calibration_ids, gradient_norms=norms)
    scaled = {n: g * 1000 for n, g in norms.items()}
    GBLMPruner(GBLMConfig(method_options={"alpha": 1}), show_progress=False).prune(b, calibration_ids, gradient_norms=scaled)
    GBLMPruner(GBLMConfig(method_options={"alpha": 100}), show_progress=False).prune(c, calibration_ids, gradient_norms=norms)
    assert unchanged(a, weights_of(b))
    assert not unchanged(a, weights_of(c))


def test_alpha_zero_and_auto_without_gradients_are_exactly_wanda(calibration_ids):
    wanda, alpha_zero, auto_zero = tiny_model("llama"), tiny_model("llama"), tiny_model("llama")
    prune(wanda, calibration_ids, method="wanda", pattern="2:4", show_progress=False)
    norms = compute_gradient_norms(alpha_zero, calibration_ids, prunable_modules(alpha_zero), show_progress=False)
    GBLMPruner(GBLMConfig(method_options={"alpha": 0}, pattern="2:4"), show_progress=False).prune(alpha_zero, calibration_ids, gradient_norms=norms)
    zeros = {n: torch.zeros_like(g) for n, g in norms.items()}
    GBLMPruner(GBLMConfig(method_options={"alpha": "auto"}, pattern="2:4"), show_progress=False).prune(auto_zero, calibration_ids, gradient_norms=zeros)
    assert unchanged(alpha_zero, weights_of(wanda))
    assert unchanged(auto_zero, weights_of(wanda))
    assert set(auto_zero.config.quantization_config.record.layer_settings["alpha"].values()) == {0.0}


def test_auto_alpha_is_deterministic_and_travels_with_the_checkpoint(calibration_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    runs = []
    for _ in range(2):
        model = tiny_model("llama")
        GBLMPruner(GBLMConfig(method_options={"alpha": "auto"}), use_cache=False, show_progress=False).prune(model, calibration_ids)
        runs.append(model)
    first, second = (m.config.quantization_config.record for m in runs)
    first_alpha = first.layer_settings["alpha"]
    assert first_alpha == second.layer_settings["alpha"] and first.masks_checksum == second.masks_checksum
    assert unchanged(runs[0], weights_of(runs[1]))
    assert set(first_alpha) == set(prunable_modules(runs[0]))
    assert all(value > 0 for value in first_alpha.values())
    # the balance differs between layers: one global alpha could not reproduce it
    assert len({round(v, 6) for v in first_alpha.values()}) > 1
    runs[0].save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.quantization_config.record.layer_settings["alpha"] == first_alpha
    assert loaded.config.quantization_config.method_settings().alpha == "auto"


def test_config_and_kwargs_are_exclusive():
    with pytest.raises(ValueError, match="either a GBLMConfig or its fields"):
        GBLMPruner(GBLMConfig(), sparsity=0.5)
    assert GBLMPruner(method="wanda", pattern="2:4").config.pattern == "2:4"


def test_repruning_a_restored_model_forgets_the_old_masks(calibration_ids):
    """Restoring dense weights and pruning again must give the same result as pruning a fresh model."""
    fresh, reused = tiny_model("llama"), tiny_model("llama")
    dense = weights_of(reused)
    GBLMPruner(GBLMConfig(pattern="2:4"), use_cache=False, show_progress=False).prune(reused, calibration_ids)
    reused.load_state_dict(dense)
    GBLMPruner(GBLMConfig(), use_cache=False, show_progress=False).prune(reused, calibration_ids)
    GBLMPruner(GBLMConfig(), use_cache=False, show_progress=False).prune(fresh, calibration_ids)
    assert unchanged(reused, weights_of(fresh))
    assert reused.config.quantization_config.pattern == "unstructured"


def test_token_ids_from_another_tokenizer_are_refused_before_anything_changes():
    model = tiny_model("llama")
    before = weights_of(model)
    ids = torch.full((2, 16), 500)  # the tiny vocabulary has 96 entries
    with pytest.raises(ValueError, match="vocabulary has 96 entries: the ids come from another tokenizer"):
        prune(model, ids, method="wanda")
    assert unchanged(model, before)
