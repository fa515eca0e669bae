import pytest
import torch
from conftest import FAMILIES, tiny_model, weights_of
from torch import nn

from optimum_gblm import GBLMConfig, GBLMPruner
from optimum_gblm.engine import run_layerwise
from optimum_gblm.masks import check_nm
from optimum_gblm.registry import METHODS
from optimum_gblm.stats import InputStats
from optimum_gblm.structure import find_decoder_blocks, prunable_modules, weight_matrix

PATTERNS = [("unstructured", 0.5), ("unstructured", 0.75), ("2:4", 0.5), ("4:8", 0.5)]


def zero_masks(model):
    return {name: weight_matrix(m) == 0 for name, m in prunable_modules(model).items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(METHODS))  # every registered method: a new one is covered without new code
@pytest.mark.parametrize("pattern, sparsity", PATTERNS)
def test_every_family_method_and_pattern_gives_exact_sparsity(family, method, pattern, sparsity, calibration_ids, tmp_path):
    model = tiny_model(family)
    untouched = {n: p.detach().clone() for n, p in model.named_parameters() if "embed" in n or "wte" in n or "wpe" in n or "lm_head" in n or "embed_out" in n}
    GBLMPruner(GBLMConfig(method=method, sparsity=sparsity, pattern=pattern), cache_dir=tmp_path, show_progress=False).prune(model, calibration_ids)
    modules = prunable_modules(model)
    assert len(modules) >= 8
    for name, module in modules.items():
        weight = weight_matrix(module)
        # per row for masks from a score; SparseGPT-style joint selection picks over a block of rows, same total
        pruned = (weight == 0).sum(1) if "score" in METHODS[method].__module__ else (weight == 0).sum()
        expected = int(weight.shape[1] * sparsity) * (1 if pruned.dim() else weight.shape[0])
        assert (pruned == expected).all(), name
        if pattern != "unstructured":
            n, m = map(int, pattern.split(":"))
            assert check_nm(weight != 0, n, m), name
    config = model.config.quantization_config
    record = config.record
    assert record.global_sparsity == pytest.approx(sparsity, abs=1e-6)
    assert set(record.layer_sparsity) == set(modules)
    assert all(v == pytest.approx(sparsity, abs=1e-6) for v in record.layer_sparsity.values())
    # the recipe as requested, with the calibration size actually used (a tensor of token ids sets its own)
    calibrated = METHODS[method].needs_activations or METHODS[method].gradients_needed(config)
    used = {"num_samples": 4, "seqlen": 16} if calibrated else {}
    assert config.recipe() == GBLMConfig(method=method, sparsity=sparsity, pattern=pattern, **used).recipe()
    assert record.calibration == {"source": "token ids (4, 16)", "num_samples": 4, "seqlen": 16, "seed": 0} or not calibrated
    for name, value in untouched.items():
        assert torch.equal(dict(model.named_parameters())[name], value), f"{name} must never be pruned"


def test_lm_head_and_embeddings_are_never_prunable():
    model = tiny_model("llama")
    names = set(prunable_modules(model))
    assert not any("lm_head" in n or "embed" in n for n in names)
    assert all(n.startswith("model.layers.") for n in names)
    assert len(names) == 2 * 7


def test_target_modules_restricts_pruning(calibration_ids):
    model = tiny_model("llama")
    before = weights_of(model)
    GBLMPruner(GBLMConfig(method="wanda", target_modules=["q_proj", "mlp.down_proj"]), show_progress=False).prune(model, calibration_ids)
    changed = {k for k, v in weights_of(model).items() if not torch.equal(v, before[k])}
    assert changed == {f"model.layers.{i}.{p}.weight" for i in range(2) for p in ("self_attn.q_proj", "mlp.down_proj")}


def test_a_regex_over_full_names_picks_blocks(calibration_ids):
    # PEFT's convention: a regex matching the whole module name selects layers by block.
    model = tiny_model("llama")
    before = weights_of(model)
    config = GBLMConfig(method="wanda", target_modules=[r"model\.layers\.1\.(self_attn|mlp)\.(q|up)_proj"])
    GBLMPruner(config, show_progress=False).prune(model, calibration_ids)
    changed = {k for k, v in weights_of(model).items() if not torch.equal(v, before[k])}
    assert changed == {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"}


def test_no_matching_target_names_both_name_forms():
    with pytest.raises(ValueError, match=r"within a block, model\.layers\.0\.mlp\.down_proj in full"):
        GBLMPruner(GBLMConfig(method="magnitude", target_modules=["nothing_here"]), show_progress=False).prune(tiny_model("llama"))


@pytest.mark.parametrize("method", ["wanda", "gblm"])
def test_same_seed_same_masks(method, tokenizer, tmp_path):
    from conftest import sample_text

    texts = [sample_text(600)]
    masks = []
    for seed in (0, 0, 1):
        model = tiny_model("llama")
        config = GBLMConfig(method=method, num_samples=4, seqlen=16, seed=seed)
        GBLMPruner(config, cache_dir=tmp_path, show_progress=False).prune(model, texts, tokenizer=tokenizer)
        masks.append(zero_masks(model))
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])
    assert any(not torch.equal(masks[0][n], masks[2][n]) for n in masks[0])


class Recorder:
    """A layer visitor that records each layer's input statistic in `seen` (and zeroes every other input column of
    the layer when `prune_half`)."""

    collects_inputs = True
    needs_block_gradients = False

    def __init__(self, seen: dict, prune_half: bool = False):
        self.seen, self.prune_half = seen, prune_half

    def new_stats(self, name, module):
        return InputStats(weight_matrix(module).shape[1], module.weight.device)

    def visit_layer(self, name, module, stats):
        self.seen[name] = stats.sq_mean.clone()
        if self.prune_half:
            with torch.no_grad():
                weight_matrix(module)[:, ::2] = 0

    def end_block(self):
        pass


def test_later_blocks_see_the_pruned_outputs_of_earlier_ones(calibration_ids):
    """The statistic behind block 1's q_proj must come from block 0 *after* pruning."""
    model = tiny_model("llama")
    seen = {}
    run_layerwise(model, calibration_ids, Recorder(seen, prune_half=True), show_progress=False)
    # Block 1's q_proj input depends only on the (now pruned) block 0.
    captured = []
    hook = model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        for i in range(calibration_ids.shape[0]):
            model(input_ids=calibration_ids[i : i + 1])
    hook.remove()
    expected = torch.cat(captured).pow(2).sum(dim=(0, 1)) / calibration_ids.shape[0]
    torch.testing.assert_close(seen["model.layers.1.self_attn.q_proj"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_replayed_blocks_see_exactly_what_the_model_gives_them(family, calibration_ids):
    """Without pruning, every layer's input statistic from the block-by-block replay equals the plain forward's:
    each block gets its own mask and position tables (Gemma 3 mixes sliding-window and global blocks)."""
    model = tiny_model(family)
    seen = {}
    run_layerwise(model, calibration_ids, Recorder(seen), show_progress=False)
    modules = prunable_modules(model)
    captured = {name: [] for name in modules}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=name: captured[n].append(a[0])) for name, m in modules.items()]
    with torch.no_grad():
        for i in range(calibration_ids.shape[0]):
            model(input_ids=calibration_ids[i : i + 1])
    for hook in hooks:
        hook.remove()
    assert set(seen) == set(modules)
    for name in modules:
        inputs = torch.cat(captured[name]).float()
        expected = inputs.pow(2).reshape(-1, inputs.shape[-1]).sum(0) / calibration_ids.shape[0]
        torch.testing.assert_close(seen[name], expected, rtol=1e-4, atol=1e-6, msg=name)


def test_input_stats_running_form_equals_mean_over_sequences():
    torch.manual_seed(0)
    batches = [torch.randn(1, 5, 3), torch.randn(2, 5, 3), torch.randn(1, 5, 3)]
    stats = InputStats(3, torch.device("cpu"))
    for b in batches:
        stats.add_batch(b)
    everything = torch.cat(batches)
    torch.testing.assert_close(stats.sq_mean, everything.pow(2).sum(dim=(0, 1)) / 4)


def test_a_model_without_decoder_blocks_is_refused():
    class NotAnLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="no recognisable decoder blocks.*nn.ModuleList"):
        GBLMPruner(GBLMConfig(method="magnitude")).prune(NotAnLM())
    assert find_decoder_blocks(tiny_model("gpt2"))[0] == "transformer.h"
    assert find_decoder_blocks(tiny_model("opt"))[0] == "model.decoder.layers"
    assert find_decoder_blocks(tiny_model("gpt_neox"))[0] == "gpt_neox.layers"


def test_magnitude_needs_no_calibration_and_pruning_is_idempotent_on_masks():
    model = tiny_model("llama")
    GBLMPruner(GBLMConfig(method="magnitude", pattern="2:4")).prune(model)
    first = zero_masks(model)
    GBLMPruner(GBLMConfig(method="magnitude", pattern="2:4")).prune(model)
    assert all(torch.equal(first[n], m) for n, m in zero_masks(model).items())
