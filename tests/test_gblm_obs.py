"""gblm_obs on whole (tiny) models: its two limits are the methods it slides between."""

import pytest
import torch
from conftest import tiny_model, weights_of

from optimum_gblm import GBLMConfig, GBLMPruner
from optimum_gblm.methods.gblm_obs import GBLMOBS, listed
from optimum_gblm.structure import prunable_modules, weight_matrix


def pruned(method, calibration_ids, pattern="unstructured", alpha=None, **options):
    model = tiny_model("llama")
    options = options if alpha is None else {**options, "alpha": alpha}
    config = GBLMConfig(method=method, pattern=pattern, method_options=options)
    GBLMPruner(config, use_cache=False, show_progress=False).prune(model, calibration_ids)
    return model


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("score", ["wanda", "gblm"])
def test_without_update_it_is_the_score_method(pattern, score):
    # mu -> inf: U_jk / U_jj -> 0, no compensation: exactly the score method's mask and (to rounding) its weights.
    # One sequence of two tokens (the least prune accepts): the score method's activation mean (a sum of squares)
    # and gblm_obs's (the Hessian's diagonal, a matrix product) are then x_1j^2 + x_2j^2 summed two ways, at most
    # one rounding (~6e-8) apart, where many sequences put ~1e-6 between them and can flip a near-tied mask choice
    # on another machine's BLAS. The 1/mu-sized update (~1e-9) leaves later blocks' inputs as good as equal.
    calibration_ids = torch.randint(0, 96, (1, 2), generator=torch.Generator().manual_seed(1))
    reference = weights_of(pruned(score, calibration_ids, pattern, alpha=100.0 if score == "gblm" else None))  # wanda has no alpha
    model = pruned("gblm_obs", calibration_ids, pattern, alpha=100.0, score=score, selection="score", mu=1e9)
    for name, value in weights_of(model).items():
        assert torch.equal(value == 0, reference[name] == 0), name
        torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_joint_selection_at_mu_zero_without_gradients_is_sparsegpt(pattern):
    # One calibration sequence: SparseGPT's running Hessian and gblm_obs's fold sums are then the same single product
    # X^T X (their scalings are exact), so float noise from two summation orders cannot flip a near-tied choice of
    # the sequential sweep (it did on another machine's BLAS with several sequences).
    calibration_ids = torch.randint(0, 96, (1, 64), generator=torch.Generator().manual_seed(1))
    reference = weights_of(pruned("sparsegpt", calibration_ids, pattern))
    # SparseGPT's update is the sweep's; refit_steps (on by default) would then solve the kept weights exactly
    model = pruned("gblm_obs", calibration_ids, pattern, score="wanda", selection="joint", mu=0.0, refit_steps=0)
    for name, value in weights_of(model).items():  # one Hessian, one sweep
        assert torch.equal(value == 0, reference[name] == 0), name
        torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-6)


def test_auto_mu_is_chosen_per_layer_and_recorded(calibration_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    model = pruned("gblm_obs", calibration_ids, mu="auto", mu_candidates=[0.1, 1.0, 10.0], folds=2)
    record = model.config.quantization_config.record
    mus = record.layer_settings["mu"]
    assert set(mus) == set(prunable_modules(model)) and set(mus.values()) <= {0.1, 1.0, 10.0}
    assert record.global_sparsity == 0.5
    dense = tiny_model("llama")
    updated = [n for n, m in prunable_modules(model).items() if mus[n] < 10.0]
    kept_changed = [
        n for n in updated
        if not torch.equal(weight_matrix(prunable_modules(model)[n])[weight_matrix(prunable_modules(model)[n]) != 0],
                           weight_matrix(prunable_modules(dense)[n])[weight_matrix(prunable_modules(model)[n]) != 0])
    ]
    assert kept_changed == updated, "a finite mu updates the kept weights"
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.quantization_config.record.layer_settings["mu"] == mus


def test_options_are_checked():
    with pytest.raises(ValueError, match="gblm_obs score must be one of"):
        GBLMConfig(method="gblm_obs", method_options={"score": "sparsegpt"})
    with pytest.raises(ValueError, match="folds=3 needs at least that many"):
        GBLMConfig(method="gblm_obs", num_samples=2, method_options={"mu": "auto"})
    GBLMConfig(method="gblm_obs", num_samples=2)  # a fixed mu needs no folds
    with pytest.raises(ValueError, match="gblm_obs gradient_form must be one of"):
        GBLMConfig(method="gblm_obs", method_options={"gradient_form": "sum"})
    with pytest.raises(ValueError, match="update_mu replaces the update whose mu 'auto' would choose"):
        GBLMConfig(method="gblm_obs", method_options={"mu": "auto", "update_mu": 0.0})
    with pytest.raises(ValueError, match="gblm_obs update_mu must be a number"):
        GBLMConfig(method="gblm_obs", method_options={"update_mu": -1})
    with pytest.raises(ValueError, match="gblm_obs mu must be a number >= 0 or 'auto'"):
        GBLMConfig(method="gblm_obs", method_options={"mu": -1})
    assert not GBLMConfig(method="gblm_obs", method_options={"score": "wanda"}).method_settings().score == "gblm"


def test_too_few_sequences_for_the_folds_are_refused_before_any_weight_changes():
    model = tiny_model("llama")
    before = weights_of(model)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))  # 2 sequences, 3 folds
    with pytest.raises(ValueError, match="folds=3 needs at least that many calibration sequences, num_samples is 2"):
        GBLMPruner(GBLMConfig(method="gblm_obs", method_options={"score": "wanda", "mu": "auto"}), show_progress=False).prune(
            model, ids
        )
    assert all(torch.equal(before[k], v) for k, v in weights_of(model).items())
    assert getattr(model.config, "quantization_config", None) is None


def test_default_is_joint_selection_at_mu_half_with_the_gradient_factor_and_refit(calibration_ids):
    # The default recipe is the measured one (docs/results.md#gblm_obs): joint mask on H + Diag(H), gradient factor.
    options = GBLMConfig(method="gblm_obs").method_settings()
    assert (options.selection, options.mu, options.update_mu, options.gradient_form, options.refit_steps) == (
        "joint", 0.5, None, "scale", 10
    )
    default = weights_of(pruned("gblm_obs", calibration_ids))
    without_gradients = weights_of(pruned("gblm_obs", calibration_ids, score="wanda"))
    as_bonus = weights_of(pruned("gblm_obs", calibration_ids, gradient_form="bonus"))
    assert any(not torch.equal(default[n] == 0, without_gradients[n] == 0) for n in default), "the gradient term picks"
    assert any(not torch.equal(default[n] == 0, as_bonus[n] == 0) for n in default), "the two forms differ"


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_update_mu_refits_the_chosen_mask(calibration_ids, pattern):
    joint = weights_of(pruned("gblm_obs", calibration_ids, pattern))
    refit = weights_of(pruned("gblm_obs", calibration_ids, pattern, update_mu=0.0))
    # Block 0 sees the same inputs in both runs (later blocks see the re-fitted outputs): there the re-fit keeps the
    # joint mask exactly and changes only the kept values.
    first_block = [n for n, v in refit.items() if n.startswith("model.layers.0.") and v.dim() == 2]
    assert first_block
    for name in first_block:
        assert torch.equal(refit[name] == 0, joint[name] == 0), name
        assert not torch.allclose(refit[name], joint[name]), f"{name}: update_mu=0 re-fits the kept weights"


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_refit_steps_solve_the_kept_weights_on_the_same_mask(calibration_ids, pattern):
    swept = weights_of(pruned("gblm_obs", calibration_ids, pattern, refit_steps=0))
    refit = weights_of(pruned("gblm_obs", calibration_ids, pattern, refit_steps=5))
    first_block = [n for n, v in refit.items() if n.startswith("model.layers.0.") and v.dim() == 2]
    assert first_block
    for name in first_block:  # block 0 sees the same inputs in both runs, so the same joint mask
        assert torch.equal(refit[name] == 0, swept[name] == 0), name
        assert not torch.allclose(refit[name], swept[name]), f"{name}: the refit moves the kept weights"


def test_refit_modules_refits_those_layers_only(calibration_ids):
    swept = weights_of(pruned("gblm_obs", calibration_ids, refit_steps=0))
    refit = weights_of(pruned("gblm_obs", calibration_ids, refit_steps=5))
    some = weights_of(pruned("gblm_obs", calibration_ids, refit_steps=5, refit_modules="self_attn.q_proj"))
    # q, k and v take block 0's input, the same in all three runs: q_proj as the full refit left it, k and v as swept
    assert torch.equal(some["model.layers.0.self_attn.q_proj.weight"], refit["model.layers.0.self_attn.q_proj.weight"])
    for name in ("k_proj", "v_proj"):
        key = f"model.layers.0.self_attn.{name}.weight"
        assert torch.equal(some[key], swept[key]) and not torch.equal(some[key], refit[key]), key


@pytest.mark.parametrize("score", ["wanda", "gblm"])
def test_mask_only_everywhere_is_the_score_method(score):
    # Two tokens, as in test_without_update_it_is_the_score_method: the two activation means are then at most one
    # rounding apart, so the masks are equal; with no update at all the weights are the dense ones under the mask.
    calibration_ids = torch.randint(0, 96, (1, 2), generator=torch.Generator().manual_seed(1))
    reference = weights_of(pruned(score, calibration_ids, alpha=100.0 if score == "gblm" else None))
    model = pruned("gblm_obs", calibration_ids, alpha=100.0, score=score, mask_only_modules=[".*"])
    for name, value in weights_of(model).items():
        assert torch.equal(value, reference[name]), name


def test_mask_only_modules_leave_those_layers_kept_weights_as_they_were(calibration_ids):
    dense = weights_of(tiny_model("llama"))
    model = pruned("gblm_obs", calibration_ids, mask_only_modules=[r"model\.layers\.1\..*"])
    for name, value in weights_of(model).items():
        if not name.endswith("proj.weight"):
            continue
        kept = value != 0
        if name.startswith("model.layers.1."):  # the score's mask: 50% of every row, the dense weights
            assert kept.sum(1).tolist() == [value.shape[1] // 2] * value.shape[0], name
            assert torch.equal(value[kept], dense[name][kept]), f"{name} was updated"
        else:  # the joint mask: 50% of the layer, updated weights
            assert kept.sum().item() == value.numel() // 2, name
            assert not torch.equal(value[kept], dense[name][kept]), f"{name} was not updated"


def test_score_mask_everywhere_is_selection_score(calibration_ids):
    reference = weights_of(pruned("gblm_obs", calibration_ids, selection="score", refit_steps=3))
    model = pruned("gblm_obs", calibration_ids, score_mask_modules=[".*"], refit_steps=3)
    for name, value in weights_of(model).items():
        assert torch.equal(value, reference[name]), name


def test_score_mask_modules_take_the_score_mask_and_update_it(calibration_ids):
    dense = weights_of(tiny_model("llama"))
    model = pruned("gblm_obs", calibration_ids, score_mask_modules=[r"model\.layers\.1\..*"],
                   mask_only_modules=["model.layers.1.mlp.down_proj"])
    for name, value in weights_of(model).items():
        if not name.endswith("proj.weight"):
            continue
        kept = value != 0
        if name.startswith("model.layers.1."):  # the score's mask: 50% of every row
            assert kept.sum(1).tolist() == [value.shape[1] // 2] * value.shape[0], name
            updated = not torch.equal(value[kept], dense[name][kept])
            assert updated == (name != "model.layers.1.mlp.down_proj.weight"), f"{name}: mask_only_modules wins"
        else:  # the joint mask: 50% of the layer, not of every row
            assert kept.sum().item() == value.numel() // 2, name
            assert kept.sum(1).tolist() != [value.shape[1] // 2] * value.shape[0], name


def test_refit_modules_are_module_name_suffixes():
    options = GBLMConfig(method="gblm_obs", method_options={"refit_modules": "down_proj"}).method_settings()
    assert options.refit_modules == ["down_proj"]
    with pytest.raises(ValueError, match="refit_modules must be a list of module-name suffixes"):
        GBLMConfig(method="gblm_obs", method_options={"refit_modules": ["q_proj", ""]})
    with pytest.raises(ValueError, match=r"gblm_obs mask_only_modules entry '\(' is neither a module name nor a valid regex"):
        GBLMConfig(method="gblm_obs", method_options={"mask_only_modules": ["("]})


def test_no_opt_in_list_names_no_layer_while_no_refit_list_names_every_layer():
    name = "model.layers.3.mlp.down_proj"
    assert not listed(name, None)
    assert listed(name, ["down_proj"]) and not listed(name, ["up_proj"])
    assert listed(name, [r"model\.layers\.[0-3]\..*"]) and not listed(name, [r"model\.layers\.[4-7]\..*"])
    method = GBLMOBS(GBLMConfig(method="gblm_obs", method_options={"refit_steps": 2}))
    assert method.refit_steps(name) == 2 and method.selection(name) == "joint"


def test_a_checkpoint_written_before_refit_steps_existed_loads_without_refit():
    # written with the gradient factor and update_mu, before refit_steps: it keeps its factor and does not refit
    config = GBLMConfig(method="gblm_obs", method_options={"mu": 1.0, "refit_steps": 0})
    stored = config.to_dict()
    for added in ("refit_steps", "gradient_loss", "gradient_samples"):
        del stored["method_options"][added]
    loaded = GBLMConfig.from_dict(stored)
    assert (loaded.method_settings().gradient_form, loaded.method_settings().refit_steps, loaded.method_settings().mu) == ("scale", 0, 1.0)
    assert {**config.recipe(), "method_options": stored["method_options"]} in loaded.checksum_recipes()


def test_a_hand_written_partial_recipe_gets_todays_defaults():
    # Not a stored recipe (it does not list every option of any day): nothing is filled as "absent".
    loaded = GBLMConfig.from_dict({"method": "gblm_obs", "method_options": {"mu": 0.3}})
    assert (loaded.method_settings().gradient_form, loaded.method_settings().refit_steps, loaded.method_settings().mu) == ("scale", 10, 0.3)


def test_auto_mu_scores_the_update_it_will_use(monkeypatch):
    # cross-validation must score the sweep followed by the refit when the method refits
    import optimum_gblm.methods.gblm_obs as module

    seen = []
    real = module.cross_validated_mu
    monkeypatch.setattr(module, "cross_validated_mu", lambda *a, **k: seen.append(k.get("refit_steps")) or real(*a, **k))
    model = tiny_model("llama")
    GBLMPruner(GBLMConfig(method="gblm_obs", method_options={"mu": "auto", "folds": 2, "refit_steps": 3}),
               use_cache=False, show_progress=False).prune(model, torch.randint(0, 96, (4, 16)))
    assert seen and set(seen) == {3}


def test_a_checkpoint_written_before_gradient_form_existed_loads_as_the_bonus_it_used():
    # Such a config.json lists every option of its day; gradient_form, update_mu, refit_steps, gradient_loss and
    # gradient_samples were added later.
    # Its masks checksum covers the recipe as written then; its joint selection added the gradient term as a bonus
    # and did not refit.
    config = GBLMConfig(method="gblm_obs", method_options={"gradient_form": "bonus", "refit_steps": 0})
    stored = config.to_dict()
    for added in ("gradient_form", "update_mu", "refit_steps", "gradient_loss", "gradient_samples"):
        del stored["method_options"][added]
    recipe_then = {**config.recipe(), "method_options": dict(stored["method_options"])}
    loaded = GBLMConfig.from_dict(stored)
    assert loaded.method_settings().gradient_form == "bonus" and loaded.method_settings().update_mu is None
    assert loaded.method_settings().refit_steps == 0, "no checkpoint before the option refitted"
    assert recipe_then in loaded.checksum_recipes()
    assert config.recipe() in loaded.checksum_recipes()
    # a config written today keeps its own recipe, and today's default
    assert GBLMConfig.from_dict(GBLMConfig(method="gblm_obs").to_dict()).method_settings().gradient_form == "scale"
    assert recipe_then not in GBLMConfig.from_dict(config.to_dict()).checksum_recipes()


def test_the_gradient_factor_is_one_plus_alpha_g_over_sqrt_a_squared(calibration_ids, monkeypatch):
    import optimum_gblm.methods.gblm_obs as module
    from optimum_gblm.gradients import compute_gradient_norms

    seen = {}
    real = module.obs_prune

    def spy(weight, hessian, *args, name="layer", saliency_scale=None, **kwargs):
        seen[name] = (hessian.clone(), saliency_scale)
        return real(weight, hessian, *args, name=name, saliency_scale=saliency_scale, **kwargs)

    monkeypatch.setattr(module, "obs_prune", spy)
    model = tiny_model("llama")
    norms = compute_gradient_norms(model, calibration_ids, prunable_modules(model), show_progress=False)
    config = GBLMConfig(method="gblm_obs", method_options={"alpha": 2.0})
    GBLMPruner(config, use_cache=False, show_progress=False).prune(model, calibration_ids, gradient_norms=norms)
    assert set(seen) == set(norms)
    for name, (hessian, scale) in seen.items():
        sq_mean = torch.diagonal(hessian) / 2  # H = (2/N) sum X^T X, so diag(H) / 2 is a = ||X_j||^2 / N
        expected = (1 + 2.0 * norms[name].float() / sq_mean.sqrt()) ** 2
        expected = torch.where(sq_mean > 0, expected, torch.ones_like(expected))
        torch.testing.assert_close(scale, expected, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("folds", [1, 3])
def test_fold_hessians_give_h_and_the_activation_means_of_all_sequences(folds):
    from optimum_gblm.methods.gblm_obs import FoldHessians

    inputs = torch.randn(5, 7, 4, generator=torch.Generator().manual_seed(0))
    stats = FoldHessians(4, folds, torch.device("cpu"))
    stats.add_batch(inputs[:2])
    stats.add_batch(inputs[2:])
    rows = inputs.reshape(-1, 4)
    torch.testing.assert_close(stats.hessian, 2 / 5 * rows.t() @ rows)
    torch.testing.assert_close(stats.sq_mean, (rows**2).sum(0) / 5)
    assert stats.hessian.data_ptr() != stats.sums.data_ptr(), "a copy: obs_prune may overwrite it"
