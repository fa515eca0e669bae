"""gradient_samples: the gradients are taken on the first n calibration sequences only (the stage's cost), the layer
pass still sees all of them, and the norms are rescaled to all sequences."""

import pytest
import torch
from conftest import tiny_model

from optimum_gblm import GBLMConfig, GBLMPruner
from optimum_gblm.engine import BlockInputs, capture_block_inputs
from optimum_gblm.gradients import block_gradient_norms, compute_gradient_norms, rescaled_to_all_sequences
from optimum_gblm.methods import base as methods_base
from optimum_gblm.structure import find_decoder_blocks, layers_by_block, prunable_modules


def config(gradient_loss="model", norm="l1", **options):
    # a fixed alpha, so that the rescaling shows in the mask; 2 of the 4 calibration sequences
    return GBLMConfig(method="gblm", pattern="2:4", method_options={
        "alpha": 100.0, "gradient_norm": norm, "gradient_loss": gradient_loss, "gradient_samples": 2, **options,
    })


def test_rescaling_to_all_sequences_by_norm():
    norms = {"w": torch.tensor([1.0, 4.0])}
    assert rescaled_to_all_sequences(norms, "l1", 4, 4) is norms
    torch.testing.assert_close(rescaled_to_all_sequences(norms, "l1", 2, 8)["w"], torch.tensor([4.0, 16.0]))
    torch.testing.assert_close(rescaled_to_all_sequences(norms, "l2", 2, 8)["w"], torch.tensor([2.0, 8.0]))


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_the_model_loss_takes_the_first_sequences_and_rescales(norm, calibration_ids):
    # The same prune as one given the first two sequences' norms, scaled by 2 (l1) or sqrt 2 (l2), with every
    # sequence in the layer pass: the weights match exactly (the same computation; x2 is exact in float).
    model = tiny_model("llama")
    modules = prunable_modules(model)
    first_two = compute_gradient_norms(model, calibration_ids[:2], modules, norm, show_progress=False)
    factor = 2.0 if norm == "l1" else 2.0**0.5
    given = {name: value * factor for name, value in first_two.items()}
    reference = tiny_model("llama")
    plain = config(norm=norm)
    plain.method_options["gradient_samples"] = None
    GBLMPruner(plain, show_progress=False).prune(reference, calibration_ids, gradient_norms=given)
    GBLMPruner(config(norm=norm), use_cache=False, show_progress=False).prune(model, calibration_ids)
    for name, module in prunable_modules(model).items():
        assert torch.equal(module.weight, prunable_modules(reference)[name].weight), name
    assert model.config.quantization_config.method_options["gradient_samples"] == 2


def test_the_block_loss_takes_a_backward_on_the_first_sequences_only(calibration_ids):
    model = tiny_model("llama")
    _, blocks = find_decoder_blocks(model)
    hidden, args, kwargs = capture_block_inputs(model, blocks, calibration_ids)
    layers = layers_by_block(model)[0]
    seen = {name: 0 for name in layers}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=name: seen.__setitem__(n, seen[n] + 1)) for name, m in layers.items()]
    norms = block_gradient_norms(blocks[0], layers, BlockInputs(hidden, args[0], kwargs[0]), "l1", num_sequences=2)
    for hook in hooks:
        hook.remove()
    assert set(seen.values()) == {4}, "every sequence reaches the layers (their statistics need them)"
    first_two = block_gradient_norms(blocks[0], layers, BlockInputs(hidden[:2], args[0], kwargs[0]), "l1")
    for name in layers:
        torch.testing.assert_close(norms[name], 2 * first_two[name], rtol=1e-6, atol=0)


def test_the_block_loss_passes_gradient_samples_on(calibration_ids, monkeypatch):
    asked = []

    def spy(block, layers, inputs, norm, num_sequences):
        asked.append((inputs.hidden.shape[0], num_sequences))
        return block_gradient_norms(block, layers, inputs, norm, num_sequences)

    monkeypatch.setattr(methods_base, "block_gradient_norms", spy)
    GBLMPruner(config("block"), show_progress=False).prune(tiny_model("llama"), calibration_ids)
    assert asked == [(4, 2), (4, 2)]


def test_bad_gradient_samples_are_refused_with_the_fix(calibration_ids):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="gradient_samples must be a whole number >= 1"):
            config(gradient_samples=bad)
    with pytest.raises(ValueError, match=r"gradient_samples=16 asks for more calibration sequences than there are \(8\)"):
        GBLMConfig(method="gblm_obs", num_samples=8, method_options={"gradient_samples": 16})
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"more calibration sequences than there are \(4\)"):
        # num_samples 128 asked, but the tensor given holds 4 sequences: refused before the model changes
        GBLMPruner(config(gradient_samples=8), show_progress=False).prune(model, calibration_ids)
    norms = {name: torch.ones_like(m.weight) for name, m in prunable_modules(model).items()}
    with pytest.raises(ValueError, match="drop gradient_samples"):
        GBLMPruner(config(), show_progress=False).prune(model, calibration_ids, gradient_norms=norms)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="gradient_samples"):
        GBLMConfig(method="wanda", method_options={"gradient_samples": 2})
