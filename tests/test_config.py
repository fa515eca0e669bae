import json

import pytest

from optimum_gblm import GBLMConfig


def test_defaults_follow_the_reference():
    config = GBLMConfig()
    assert (config.method, config.sparsity, config.pattern) == ("gblm", 0.5, "unstructured")
    assert (config.method_settings().gradient_norm, config.method_settings().alpha) == ("l1", 100.0)
    assert (config.num_samples, config.seqlen, config.seed) == (128, 2048, 0)
    assert config.target_modules is None and config.quant_method == "gblm"


def test_alpha_left_out_is_the_methods_own_default_and_is_stored():
    # gblm keeps the paper's 100; every gblm_obs measurement used alpha="auto" (docs/results.md#gblm_obs), so its
    # out-of-the-box recipe is the measured one.
    # (wanda has no gradient term, so no alpha: it is an option of the methods with one)
    assert GBLMConfig().method_settings().alpha == 100.0 and "alpha" not in GBLMConfig(method="wanda").method_options
    config = GBLMConfig(method="gblm_obs")
    assert config.method_settings().alpha == "auto"
    assert json.loads(config.to_json_string())["method_options"]["alpha"] == "auto"
    assert GBLMConfig(method="gblm_obs", method_options={"alpha": 100}).method_settings().alpha == 100.0
    # a gblm_obs checkpoint written when every method defaulted to 100 (and alpha was a flat key) keeps its 100
    old = config.to_dict()
    del old["method_options"]["alpha"]
    assert GBLMConfig.from_dict({**old, "alpha": 100.0}).method_settings().alpha == 100.0
    assert GBLMConfig.from_dict({"method": "gblm_obs"}).method_settings().alpha == "auto"


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"method": "wanda", "pattern": "2:4", "sparsity": 0.5},
        {"method": "magnitude", "pattern": "unstructured", "sparsity": 0.3, "method_options": {"scope": "layer"}},
        {"method": "gblm", "method_options": {"gradient_norm": "l2", "alpha": 10.0}, "target_modules": ["q_proj", "down_proj"]},
        {"method_options": {"alpha": "auto", "gradient_norm": "l2"}},
        {"method_options": {"alpha": 0}, "record": {"layer_settings": {"alpha": {"model.layers.0.mlp.up_proj": 12.5}}}},
        {"method": "sparsegpt", "method_options": {"damping": 0.1, "blocksize": 64}},
        {"sparsity_profile": "owl", "profile_options": {"threshold": 3.0, "spread": 0.05}},
        {"method": "wanda", "method_options": {"use_variant": True}, "sparsity": 0.6, "dataset": "c4", "tokenizer": "some/tok"},
        {"pattern": "1:4", "sparsity": 0.25, "num_samples": 3, "seqlen": 7, "seed": 11},
    ],
)
def test_round_trip_is_exact(kwargs):
    config = GBLMConfig(**kwargs)
    as_dict = config.to_dict()
    assert GBLMConfig.from_dict(as_dict).to_dict() == as_dict
    text = config.to_json_string()
    assert json.loads(text) == as_dict
    assert GBLMConfig.from_json_string(text) == config


def test_json_file_round_trip(tmp_path):
    config = GBLMConfig(method="wanda", pattern="4:8", sparsity=0.5)
    config.to_json_file(tmp_path / "c.json")
    assert GBLMConfig.from_json_file(tmp_path / "c.json") == config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sparsity": 1.0}, "sparsity must lie in [0, 1)"),
        ({"sparsity": -0.1}, "sparsity must lie in [0, 1)"),
        ({"sparsity": "half"}, "sparsity must be a number"),
        ({"pattern": "4:4"}, "0 < N < M"),
        ({"pattern": "5:4"}, "0 < N < M"),
        ({"pattern": "2:4", "sparsity": 0.6}, "set sparsity=0.5"),
        ({"pattern": "1:4"}, "set sparsity=0.25"),
        ({"pattern": "two:four"}, "use 'unstructured' or an N:M pattern"),
        ({"method": "random"}, "method 'random' is unknown"),
        ({"method_options": {"gradient_norm": "linf"}}, "gradient_norm must be one of"),
        ({"method_options": {"alpha": -1}}, "alpha must be a finite number >= 0"),
        ({"method_options": {"alpha": float("inf")}}, "alpha must be a finite number >= 0"),
        ({"method_options": {"alpha": "automatic"}}, "or 'auto'"),
        ({"method_options": {"alpha": True}}, "alpha must be a finite number >= 0"),
        ({"record": {"layer_alpha": {"q": -2.0}}}, "layer_settings must map a setting name"),
        ({"method": "sparsegpt", "method_options": {"dampening": 0.1}}, "has no options ['dampening']"),
        ({"method": "wanda", "method_options": {"damping": 0.1}}, "has no options ['damping']"),
        ({"method": "sparsegpt", "pattern": "2:3", "sparsity": 2 / 3}, "must be a multiple of M=3"),
        ({"sparsity_profile": "owl", "pattern": "2:4"}, "needs pattern='unstructured'"),
        ({"sparsity_profile": "owl", "sparsity": 0.95, "profile_options": {"spread": 0.08}}, "lower it"),
        ({"tokenizer": object()}, "pass a tokenizer object to prune"),
        ({"target_modules": ["("]}, "neither a module name nor a valid regex"),
        ({"pattern": "\u00b2:4"}, "is not understood"),
        ({"method": "sparsegpt", "method_options": {"scope": "layer"}}, "apply to score methods"),
        ({"method": "sparsegpt", "method_options": {"use_variant": True}}, "apply to score methods"),
        ({"method": "gblm_obs", "method_options": {"selection": "joint", "scope": "layer"}}, "apply to score methods"),
        ({"method": "gblm_obs", "method_options": {"score": ["gblm"]}}, "gblm_obs score must be one of"),
        ({"method": "gblm_obs", "method_options": {"mu_candidates": ["abc"]}}, "mu_candidates entry must be a number"),
        ({"masks_file": "model.safetensors"}, "would overwrite the checkpoint's weights"),
        ({"masks_file": "model-00001-of-00002.safetensors"}, "would overwrite the checkpoint's weights"),
        ({"masks_file": "adapter_model.safetensors"}, "would overwrite the checkpoint's weights"),
        ({"num_samples": 0}, "num_samples must be an integer >= 1"),
        ({"num_samples": True}, "num_samples must be an integer >= 1"),
        ({"seqlen": 1}, "seqlen must be an integer >= 2"),
        ({"target_modules": [3]}, "target_modules must be a list of module names"),
        ({"method_options": {"use_variant": True}, "pattern": "2:4"}, "only applies to pattern='unstructured'"),
        ({"method_options": {"scope": "block"}}, "scope must be one of"),
    ],
)
def test_bad_values_name_the_fix(kwargs, message):
    with pytest.raises(ValueError) as error:
        GBLMConfig(**kwargs)
    assert message in str(error.value)


def test_from_dict_rejects_unknown_keys_and_foreign_methods():
    with pytest.raises(ValueError, match="unknown keys \\['sparsty'\\]"):
        GBLMConfig.from_dict({"sparsty": 0.5})
    with pytest.raises(ValueError, match="quant_method='gblm'"):
        GBLMConfig.from_dict({"quant_method": "gptq"})
    with pytest.raises(ValueError, match="not valid JSON"):
        GBLMConfig.from_json_string("{sparsity: 0.5")


def test_checkpoints_with_the_old_gradient_scale_key_still_load():
    assert GBLMConfig.from_dict({"gradient_scale": 10.0}).method_settings().alpha == 10.0
    with pytest.raises(ValueError, match="keep only 'alpha'"):
        GBLMConfig.from_dict({"gradient_scale": 10.0, "alpha": 10.0})


@pytest.mark.parametrize("text, expected", [("auto", "auto"), ("AUTO", "auto"), ("0", 0.0), ("1e3", 1000.0)])
def test_parse_alpha(text, expected):
    from optimum_gblm.config import parse_alpha

    assert parse_alpha(text) == expected


@pytest.mark.parametrize("text", ["-1", "nan", "inf", "big"])
def test_parse_alpha_rejects(text):
    from optimum_gblm.config import parse_alpha

    with pytest.raises(ValueError, match="alpha must be a number >= 0"):
        parse_alpha(text)


def test_other_methods_accept_patterns_sparsegpts_block_size_cannot_hold():
    # SparseGPT's column blocks must hold whole N:M groups; Wanda has no blocks, so 2:3 is fine there.
    assert GBLMConfig(method="wanda", pattern="2:3", sparsity=2 / 3).nm == (2, 3)


def test_old_flat_keys_load_into_options_and_record():
    old = {
        "method": "sparsegpt",
        "sparsegpt_damping": 0.05,
        "sparsegpt_blocksize": 64,
        "owl_threshold": 5.0,
        "owl_lambda": 0.08,
        "gradient_checkpointing": True,
        "global_sparsity": 0.5,
        "layer_sparsity": {"model.layers.0.mlp.up_proj": 0.5},
        "layer_alpha": None,
        "evaluation": None,
        "quant_method": "gblm",
    }
    config = GBLMConfig.from_dict(old)
    assert config.method_options == {"damping": 0.05, "blocksize": 64, "refit_steps": 0}
    assert config.profile_options == {}  # OWL's settings meant nothing under the uniform profile
    assert config.record.global_sparsity == 0.5
    assert config.record.layer_sparsity == {"model.layers.0.mlp.up_proj": 0.5}
    assert "gradient_checkpointing" not in config.to_dict()
    # The flat recipe an old masks checksum covered is kept for verification.
    # (sparsegpt has gained refit_steps since: the flat recipe must still be a candidate)
    assert any(r.get("sparsegpt_damping") == 0.05 and r.get("method") == "sparsegpt" for r in config.checksum_recipes())
    owl = GBLMConfig.from_dict({"sparsity_profile": "owl", "owl_lambda": 0.05, "owl_threshold": 4.0})
    assert owl.profile_options == {"threshold": 4.0, "spread": 0.05}


def test_a_remeasurement_without_dense_keeps_the_earlier_dense_number():
    from optimum_gblm.record import PruningRecord

    record = PruningRecord()
    entry = {"data": "held-out", "seqlen": 512, "num_tokens": 4096, "perplexity": 50.0}
    record.record_evaluation({**entry, "dense_perplexity": 40.0})
    record.record_evaluation({**entry, "perplexity": 48.0, "dense_perplexity": None})
    assert record.evaluation == [{**entry, "perplexity": 48.0, "dense_perplexity": 40.0}]
    record.record_evaluation({**entry, "num_tokens": 2048, "perplexity": 47.0, "dense_perplexity": None})
    assert record.evaluation[-1]["dense_perplexity"] is None  # another protocol: no dense number to keep


def test_recipes_with_the_flat_method_settings_of_earlier_versions_load():
    # Before each method's settings lived in its options, alpha, gradient_norm, scope and use_variant were flat keys.
    # (gradient_loss and gradient_samples came later still: such a recipe lacks them; its gradients were the model
    # loss's, on every sequence)
    old = GBLMConfig(method_options={"alpha": 10.0, "gradient_norm": "l2"}).to_dict()
    flat = {k: v for k, v in old.pop("method_options").items() if k not in ("gradient_loss", "gradient_samples")}
    old = {**old, **flat, "method_options": {}}
    loaded = GBLMConfig.from_dict(old)
    assert loaded.method_options == {**flat, "gradient_loss": "model", "gradient_samples": None}
    # the masks checksum of such a checkpoint covers its own layout
    assert {k: v for k, v in old.items() if k != "record"} in loaded.checksum_recipes()
    # every old recipe listed them, whatever the method: where they meant nothing they are dropped
    sparsegpt = {"method": "sparsegpt", "alpha": 100.0, "gradient_norm": "l1", "scope": "row", "use_variant": False,
                 "method_options": {"damping": 0.05, "blocksize": 128, "refit_steps": 0}}
    assert GBLMConfig.from_dict(sparsegpt).method_options == {"damping": 0.05, "blocksize": 128, "refit_steps": 0}
    assert "alpha" not in GBLMConfig.from_dict({"method": "wanda", "alpha": 5.0}).method_options  # ignored then too
    with pytest.raises(ValueError, match="apply to score methods"):  # refused then, refused now
        GBLMConfig.from_dict({"method": "sparsegpt", "scope": "layer"})
    with pytest.raises(ValueError, match="both flat"):
        GBLMConfig.from_dict({"alpha": 5.0, "method_options": {"alpha": 6.0}})
