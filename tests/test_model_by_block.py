"""The model loss's gradients taken one block at a time (gradient_loss="model_by_block"): each block's weight
gradients from the loss's gradient at its output, in the block's turn; by the chain rule the full-model gradients."""

import json

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

from optimum_gblm import GBLMConfig, GBLMPruner
from optimum_gblm import pruner as pruner_module
from optimum_gblm.gradients import blockwise_gradient_norms, compute_gradient_norms, loss_gradients_at_blocks
from optimum_gblm.methods import base as methods_base
from optimum_gblm.structure import find_decoder_blocks, layers_by_block, prunable_modules


def by_block_config(method="gblm_obs", pattern="2:4", **options):
    return GBLMConfig(method=method, pattern=pattern, sparsity=0.5, method_options={"gradient_loss": "model_by_block", **options})


def assert_norms_close(actual, expected):
    assert set(actual) == set(expected)
    for name, value in expected.items():
        # the same float32 products, summed in another order where the backward meets the residual stream: rounding
        # is a few ulps of the largest entries, far below 1e-4 of them
        torch.testing.assert_close(actual[name], value, rtol=1e-4, atol=1e-5 * value.abs().max().item(), msg=name)


def blockwise_norms(model, input_ids, norm="l1"):
    _, blocks = find_decoder_blocks(model)
    recorded = loss_gradients_at_blocks(model, blocks, input_ids, show_progress=False)
    norms = {}
    for block, layers in zip(blocks, layers_by_block(model)):
        norms.update(blockwise_gradient_norms(block, layers, recorded, norm))
    return norms


# llama: pre-norm residual blocks; gemma3: a sliding-window block and a global one (each its own mask and rotary
# tables); gpt2 and opt: other block signatures and heads
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "opt"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_blockwise_norms_are_the_full_model_gradient_norms(family, norm, calibration_ids):
    model = tiny_model(family)
    expected = compute_gradient_norms(model, calibration_ids, prunable_modules(model), norm=norm, show_progress=False)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert_norms_close(blockwise_norms(model, calibration_ids, norm), expected)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    assert not model.training


def test_the_recorded_gradients_are_hidden_state_sized(calibration_ids):
    model = tiny_model("llama")
    _, blocks = find_decoder_blocks(model)
    recorded = loss_gradients_at_blocks(model, blocks, calibration_ids[:3], show_progress=False)
    assert recorded.num_sequences == 3
    assert list(recorded.inputs) == [blocks[0]]  # later blocks' inputs come from the previous block's turn
    assert recorded.inputs[blocks[0]].shape == (3, 16, 32)
    for block in blocks:
        assert recorded.output_gradients[block].shape == (3, 16, 32)
        assert recorded.output_gradients[block].abs().sum() > 0


def test_the_blocks_pass_the_dense_stream_on_and_drop_what_they_used(calibration_ids):
    model = tiny_model("llama")
    _, blocks = find_decoder_blocks(model)
    dense_inputs = []
    handle = blocks[1].register_forward_pre_hook(lambda module, args: dense_inputs.append(args[0].detach().clone()))
    with torch.no_grad():
        for n in range(3):
            model(input_ids=calibration_ids[n : n + 1], use_cache=False)
    handle.remove()
    recorded = loss_gradients_at_blocks(model, blocks, calibration_ids[:3], show_progress=False)
    layers = layers_by_block(model)
    blockwise_gradient_norms(blocks[0], layers[0], recorded, "l1")
    assert list(recorded.inputs) == [blocks[0], blocks[1]]  # the first block's stay, for a pass that starts again
    # the dense model's own inputs to block 1 (one computation order: rounding-level differences only)
    torch.testing.assert_close(recorded.inputs[blocks[1]], torch.cat(dense_inputs), rtol=1e-5, atol=1e-6)
    blockwise_gradient_norms(blocks[1], layers[1], recorded, "l1")
    assert list(recorded.inputs) == [blocks[0]]  # the last block passes nothing on
    with pytest.raises(RuntimeError, match="model's order"):
        blockwise_gradient_norms(blocks[1], layers[1], recorded, "l1")


def test_the_prune_uses_the_full_model_norms_without_a_full_backward(calibration_ids, monkeypatch, tmp_path):
    model = tiny_model("llama")
    expected = compute_gradient_norms(model, calibration_ids, prunable_modules(model), show_progress=False)
    used = {}

    def spy(block, layers, recorded, norm):
        norms = blockwise_gradient_norms(block, layers, recorded, norm)
        used.update(norms)
        return norms

    def no_full_backward(*args, **kwargs):
        raise AssertionError("the whole-model gradient stage ran")

    monkeypatch.setattr(methods_base, "blockwise_gradient_norms", spy)
    monkeypatch.setattr(pruner_module, "cached_gradient_norms", no_full_backward)
    GBLMPruner(by_block_config(), show_progress=False).prune(model, calibration_ids)
    assert_norms_close(used, expected)  # taken on the dense weights of each block, before it was pruned
    record = model.config.quantization_config.record
    assert record.global_sparsity == 0.5 and all(v == 0.5 for v in record.layer_sparsity.values())
    timings = record.timings_seconds
    assert timings["gradients"] > 0 and timings["prune"] > 0
    assert timings["gradients"] + timings["prune"] <= timings["total"] + 1e-3
    model.save_pretrained(tmp_path / "out")
    stored = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert stored["method_options"]["gradient_loss"] == "model_by_block"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.quantization_config.method_options["gradient_loss"] == "model_by_block"


def test_the_dense_inputs_do_not_enter_the_layer_statistics(calibration_ids):
    # alpha 0 leaves the gradient term out of the choice: the weights then depend on the Hessians alone, which must
    # come from the layer pass's inputs only (not also from the dense inputs the gradients are taken on)
    results = []
    for loss in ("model", "model_by_block"):
        model = tiny_model("llama")
        config = GBLMConfig(
            method="gblm_obs", pattern="2:4", sparsity=0.5, method_options={"gradient_loss": loss, "alpha": 0.0}
        )
        GBLMPruner(config, use_cache=False, show_progress=False).prune(model, calibration_ids)
        results.append({name: m.weight.detach().clone() for name, m in prunable_modules(model).items()})
    for name, weight in results[0].items():
        assert torch.equal(results[1][name], weight), name


def test_gradient_samples_take_the_first_sequences_and_rescale(calibration_ids, monkeypatch):
    model = tiny_model("llama")
    expected = compute_gradient_norms(model, calibration_ids[:2], prunable_modules(model), show_progress=False)
    used = {}
    real = methods_base.rescaled_to_all_sequences

    def spy(norms, norm, used_sequences, total):
        rescaled = real(norms, norm, used_sequences, total)
        used.update(rescaled)
        return rescaled

    monkeypatch.setattr(methods_base, "rescaled_to_all_sequences", spy)
    GBLMPruner(by_block_config(gradient_samples=2), show_progress=False).prune(model, calibration_ids)
    assert_norms_close(used, {name: 2 * value for name, value in expected.items()})  # l1 on 2 of 4: x 4 / 2


def test_owl_measures_and_prunes_with_the_same_recorded_gradients(calibration_ids, monkeypatch):
    calls = []

    def spy(block, layers, recorded, norm):
        calls.append(next(iter(layers)).rsplit(".", 2)[0])
        return blockwise_gradient_norms(block, layers, recorded, norm)

    monkeypatch.setattr(methods_base, "blockwise_gradient_norms", spy)
    model = tiny_model("llama")
    config = GBLMConfig(method="gblm", sparsity=0.5, sparsity_profile="owl", method_options={"gradient_loss": "model_by_block"})
    GBLMPruner(config, show_progress=False).prune(model, calibration_ids)
    assert calls == ["model.layers.0", "model.layers.1"] * 2  # the measuring pass, then the pruning pass
    assert len({round(v, 2) for v in model.config.quantization_config.record.layer_sparsity.values()}) > 1


def test_precomputed_norms_are_refused_before_anything_changes(calibration_ids):
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    norms = {name: torch.ones_like(m.weight) for name, m in prunable_modules(model).items()}
    with pytest.raises(ValueError, match=r"gradient_loss='model_by_block'.*--gradient-loss model"):
        GBLMPruner(by_block_config(), show_progress=False).prune(model, calibration_ids, gradient_norms=norms)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_method_without_activations_cannot_take_them():
    with pytest.raises(ValueError, match=r"method 'gradient' visits no calibration activations"):
        by_block_config("gradient", pattern="unstructured")


def test_offloaded_weights_get_the_full_model_gradients(calibration_ids, tmp_path):
    """The recorded pass only needs input gradients, which reach it through accelerate's onloaded copies; the weight
    gradients come in each block's turn, on the block onloaded for it: the masks of the in-memory run."""
    path = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    GBLMPruner(by_block_config(), show_progress=False).prune(reference, calibration_ids)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map=device_map, offload_folder=tmp_path / "o")
    assert model.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    GBLMPruner(by_block_config(), show_progress=False).prune(model, calibration_ids)
    expected = reference.hf_quantizer.packed_masks
    assert set(model.hf_quantizer.packed_masks) == set(expected)
    for name, packed in expected.items():
        assert torch.equal(model.hf_quantizer.packed_masks[name], packed), name
