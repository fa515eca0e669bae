"""Block-local gradients (gradient_loss="block"): each block's output norm back-propagated through that block only,
during its turn in the layer pass, with the inputs the pruned blocks before it give it."""

import json

import pytest
import torch
from conftest import VOCAB, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

from optimum_gblm import GBLMConfig, GBLMPruner
from optimum_gblm import pruner as pruner_module
from optimum_gblm.engine import BlockInputs, capture_block_inputs
from optimum_gblm.gradients import block_gradient_norms
from optimum_gblm.masks import unpack_mask
from optimum_gblm.methods import base as methods_base
from optimum_gblm.structure import find_decoder_blocks, layers_by_block, prunable_modules


def block_config(method="gblm", pattern="2:4", **options):
    return GBLMConfig(method=method, pattern=pattern, sparsity=0.5, method_options={"gradient_loss": "block", **options})


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_block_gradient_norms_match_a_hand_computation(norm):
    # A block that is one linear layer: f(X) = X W^T, loss ||f(X_n)||_F, so g_n = Y_n^T X_n / ||Y_n||_F.
    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=False)
    hidden = torch.randn(2, 5, 4)
    norms = block_gradient_norms(layer, {"layer": layer}, BlockInputs(hidden, (), {}), norm)
    per_sequence = []
    for x in hidden:
        y = x @ layer.weight.detach().t()
        per_sequence.append(y.t() @ x / y.norm())
    expected = sum(g.abs() for g in per_sequence) if norm == "l1" else sum(g**2 for g in per_sequence).sqrt()
    # a few float32 products of unit-scale numbers: rounding is far below 1e-5 relative
    torch.testing.assert_close(norms["layer"], expected, rtol=1e-5, atol=1e-6)
    assert norms["layer"].dtype == torch.float32


def test_block_gradients_leave_the_block_as_they_found_it(calibration_ids):
    model = tiny_model("llama")
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)  # a frozen weight stays frozen
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    _, blocks = find_decoder_blocks(model)
    hidden, args, kwargs = capture_block_inputs(model, blocks, calibration_ids)
    layers = layers_by_block(model)[0]
    norms = block_gradient_norms(blocks[0], layers, BlockInputs(hidden, args[0], kwargs[0]))
    assert set(norms) == set(layers)
    assert all(norms[name].shape == module.weight.shape and norms[name].abs().sum() > 0 for name, module in layers.items())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())


def test_each_block_gets_gradients_from_the_pruned_blocks_outputs(calibration_ids, monkeypatch):
    """Block 1's gradients are taken on the outputs of block 0 as pruned, as its statistics are."""
    seen = {}

    def spy(block, layers, inputs, *args):
        seen[next(iter(layers)).rsplit(".", 2)[0]] = inputs.hidden.clone()
        return block_gradient_norms(block, layers, inputs, *args)

    monkeypatch.setattr(methods_base, "block_gradient_norms", spy)
    model = tiny_model("llama")
    GBLMPruner(block_config(), show_progress=False).prune(model, calibration_ids)
    assert set(seen) == {"model.layers.0", "model.layers.1"}
    captured = []
    hook = model.model.layers[1].register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        for i in range(calibration_ids.shape[0]):
            model(input_ids=calibration_ids[i : i + 1])
    hook.remove()
    torch.testing.assert_close(seen["model.layers.1"], torch.cat(captured), rtol=1e-5, atol=1e-6)


def test_the_block_norms_are_the_ones_the_scores_use(calibration_ids, monkeypatch):
    # Norms huge on even input columns, zero on odd ones: at alpha 100 GBLM's 2:4 mask keeps exactly the even columns
    # (no near-ties: the gradient term dominates the activation term by orders of magnitude).
    def even_columns(block, layers, inputs, *args):
        norms = {}
        for name, module in layers.items():
            g = torch.zeros_like(module.weight, dtype=torch.float32)
            g[:, ::2] = 1e6
            norms[name] = g
        return norms

    monkeypatch.setattr(methods_base, "block_gradient_norms", even_columns)
    model = tiny_model("llama")
    GBLMPruner(block_config(alpha=100.0), show_progress=False).prune(model, calibration_ids)
    quantizer = model.hf_quantizer
    for name, packed in quantizer.packed_masks.items():
        mask = unpack_mask(packed, quantizer.mask_shapes[name])
        assert bool(mask[:, ::2].all()) and not bool(mask[:, 1::2].any()), name


@pytest.mark.parametrize("method", ["gblm", "gblm_obs"])
def test_block_loss_runs_no_model_gradient_stage_and_records_its_time(method, calibration_ids, monkeypatch, tmp_path):
    def no_full_backward(*args, **kwargs):
        raise AssertionError("the model-loss gradient stage ran")

    monkeypatch.setattr(pruner_module, "cached_gradient_norms", no_full_backward)
    model = tiny_model("llama")
    GBLMPruner(block_config(method, alpha="auto"), show_progress=False).prune(model, calibration_ids)
    config = model.config.quantization_config
    assert config.record.global_sparsity == 0.5
    assert all(v == 0.5 for v in config.record.layer_sparsity.values())
    timings = config.record.timings_seconds
    assert timings["gradients"] > 0 and timings["prune"] > 0
    assert timings["gradients"] + timings["prune"] <= timings["total"] + 1e-3
    assert "alpha" in config.record.layer_settings  # alpha="auto" was resolved from the block norms, per layer
    model.save_pretrained(tmp_path / "out")
    stored = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert stored["method_options"]["gradient_loss"] == "block"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.quantization_config.method_options["gradient_loss"] == "block"


def test_owl_measures_the_dense_model_with_block_gradients(calibration_ids, monkeypatch):
    calls = []

    def spy(block, layers, inputs, *args):
        calls.append(next(iter(layers)).rsplit(".", 2)[0])
        return block_gradient_norms(block, layers, inputs, *args)

    monkeypatch.setattr(methods_base, "block_gradient_norms", spy)
    model = tiny_model("llama")
    config = GBLMConfig(method="gblm", sparsity=0.5, sparsity_profile="owl", method_options={"gradient_loss": "block"})
    GBLMPruner(config, show_progress=False).prune(model, calibration_ids)
    # the measuring pass over the dense model, then the pruning pass: each block's own gradients in each
    assert calls == ["model.layers.0", "model.layers.1"] * 2
    sparsity = model.config.quantization_config.record.layer_sparsity
    assert len({round(v, 2) for v in sparsity.values()}) > 1  # OWL gave the blocks different sparsities


def test_precomputed_norms_with_block_loss_are_refused_before_anything_changes(calibration_ids):
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    norms = {name: torch.ones_like(m.weight) for name, m in prunable_modules(model).items()}
    with pytest.raises(ValueError, match=r"gradient_loss='block'.*--gradient-loss model"):
        GBLMPruner(block_config(), show_progress=False).prune(model, calibration_ids, gradient_norms=norms)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_method_without_activations_cannot_take_block_gradients():
    with pytest.raises(ValueError, match=r"method 'gradient' visits no calibration activations"):
        block_config("gradient", pattern="unstructured")
    assert GBLMConfig(method="gradient").method_options["gradient_loss"] == "model"


def test_the_block_loss_works_where_the_model_loss_cannot_offloaded_weights(calibration_ids, tmp_path):
    """A disk-offloaded model has no full-model gradients (they would land on transient copies); block-local ones are
    taken on the block onloaded for its turn, and give the masks of the in-memory run."""
    path = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    GBLMPruner(block_config("gblm_obs"), show_progress=False).prune(reference, calibration_ids)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map=device_map, offload_folder=tmp_path / "o")
    assert model.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    GBLMPruner(block_config("gblm_obs"), show_progress=False).prune(model, calibration_ids)
    expected = reference.hf_quantizer.packed_masks
    assert set(model.hf_quantizer.packed_masks) == set(expected)
    for name, packed in expected.items():
        assert torch.equal(model.hf_quantizer.packed_masks[name], packed), name
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
