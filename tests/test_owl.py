import pytest
import torch
from conftest import tiny_model

from optimum_gblm import GBLMConfig, GBLMPruner
from optimum_gblm.methods.base import PruningMethod
from optimum_gblm.methods.owl import OutlierMeter, block_of, owl_sparsities
from optimum_gblm.registry import METHODS
from optimum_gblm.structure import prunable_modules


def test_owl_profile_averages_to_the_target_and_stays_within_lambda():
    shares = {"b0": 0.010, "b1": 0.030, "b2": 0.020, "b3": 0.050}
    params = {"b0": 100, "b1": 300, "b2": 100, "b3": 500}
    profile = owl_sparsities(shares, params, target=0.5, lam=0.08)
    weighted = sum(profile[b] * params[b] for b in profile) / sum(params.values())
    assert weighted == pytest.approx(0.5, abs=1e-12)
    assert all(0.5 - 0.08 - 1e-12 <= v <= 0.5 + 0.08 + 1e-12 for v in profile.values())
    # more outliers, more weights kept; one end reaches target +- lambda exactly
    assert profile["b3"] < profile["b1"] < profile["b2"] < profile["b0"]
    assert max(abs(v - 0.5) for v in profile.values()) == pytest.approx(0.08)
    # a symmetric profile keeps the full 2 lambda spread
    even = owl_sparsities({"a": 0.0, "b": 1.0}, {"a": 1, "b": 1}, 0.5)
    assert even == pytest.approx({"a": 0.58, "b": 0.42})
    assert owl_sparsities({"a": 0.1, "b": 0.1}, {"a": 1, "b": 1}, 0.6) == pytest.approx({"a": 0.6, "b": 0.6})


def test_outlier_meter_counts_scores_above_m_times_the_block_mean():
    class MagnitudeScore(PruningMethod):
        needs_activations = False

        def importance(self, name, module, stats):
            return module.weight.abs()

    meter = OutlierMeter(MagnitudeScore(GBLMConfig(method="magnitude")), threshold=2.0)
    first, second = torch.nn.Linear(4, 1, bias=False), torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        first.weight[:] = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
        second.weight[:] = torch.tensor([[1.0, 1.0, 1.0, 9.0]])  # block mean 2, threshold 4: one outlier of 8
    meter.visit_layer("model.layers.0.a", first, None)
    meter.visit_layer("model.layers.0.b", second, None)
    meter.end_block()
    assert meter.outlier_share == {"model.layers.0": 1 / 8} and meter.block_params == {"model.layers.0": 8}
    assert block_of("transformer.h.11.attn.c_attn") == "transformer.h.11"


# Every registered method but the two whose score is dominated by the gradient term: scaling the weights below (the
# way this test makes outliers) changes the gradients too, so those scores see other outliers.
@pytest.mark.parametrize("method", sorted(set(METHODS) - {"gradient", "gblm_inverse"}))
def test_owl_prunes_each_block_at_its_own_sparsity(method):
    torch.manual_seed(0)
    model = tiny_model("llama")
    with torch.no_grad():  # give block 1 many outlier scores (q_proj sees normalised inputs) so the profile is not flat
        model.model.layers[1].self_attn.q_proj.weight[:8] *= 20
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    config = GBLMConfig(method=method, sparsity=0.5, sparsity_profile="owl", profile_options={"spread": 0.1})
    GBLMPruner(config, show_progress=False).prune(model, ids)
    recorded = model.config.quantization_config.record
    per_block = {}
    for name, value in recorded.layer_sparsity.items():
        per_block.setdefault(block_of(name), set()).add(round(value, 2))
    assert all(len(v) <= 2 for v in per_block.values())
    block_means = {b: sum(v) / len(v) for b, v in per_block.items()}
    assert block_means["model.layers.1"] < block_means["model.layers.0"], "the block with outliers keeps more"
    sizes = {n: m.weight.numel() for n, m in prunable_modules(model).items()}
    weighted = sum(recorded.layer_sparsity[n] * sizes[n] for n in sizes) / sum(sizes.values())
    # per row floor(d_in * s) weights go: measured values sit at most 1/d_in (1/32 here) below the profile
    assert weighted == pytest.approx(0.5, abs=1 / 32)
    assert all(0.4 - 1 / 32 - 1e-9 <= v <= 0.6 + 1e-9 for v in recorded.layer_sparsity.values())


def test_owl_needs_unstructured():
    with pytest.raises(ValueError, match="needs pattern='unstructured'"):
        GBLMConfig(pattern="2:4", sparsity_profile="owl")
