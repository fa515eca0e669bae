"""The method seam: a new pruning method is one class plus one registration, and nothing else changes."""

from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_model, weights_of
from transformers import AutoModelForCausalLM

from optimum_gblm import GBLMConfig, prune
from optimum_gblm.config import setting
from optimum_gblm.methods import PruningMethod
from optimum_gblm.registry import METHODS, register_method
from optimum_gblm.structure import prunable_modules, weight_matrix


@pytest.fixture
def every_other():
    """A trivial method, registered for one test: prune every other input column, starting at `offset`."""

    @dataclass
    class EveryOtherOptions:
        offset: int = setting(0, "first pruned column")

    @register_method("every_other")
    class EveryOther(PruningMethod):
        help = "prune every other input column"
        needs_activations = False
        Options = EveryOtherOptions

        def prune_layer(self, name, module, stats, sparsity):
            mask = torch.ones_like(weight_matrix(module), dtype=torch.bool)
            mask[:, self.options.offset :: 2] = False
            return mask

    yield EveryOther
    METHODS.pop("every_other")


def test_a_registered_method_prunes_saves_and_loads(every_other, tmp_path):
    model = tiny_model("llama")
    prune(model, method="every_other", method_options={"offset": 1})
    for name, module in prunable_modules(model).items():
        weight = weight_matrix(module)
        assert (weight[:, 1::2] == 0).all() and (weight[:, ::2] != 0).all(), name
    record = model.config.quantization_config.record
    assert record.global_sparsity == 0.5
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.quantization_config.method_options == {"offset": 1}
    assert all(torch.equal(v, weights_of(model)[k]) for k, v in weights_of(loaded).items())


def test_a_registered_method_gets_its_cli_flags(every_other):
    from optimum_gblm.cli import build_parser

    args = build_parser().parse_args(["prune", "--method", "every_other", "--every-other-offset", "1", "--output", "o"])
    assert args.method == "every_other"


def test_a_method_must_return_a_keep_mask_shaped_like_the_weight(every_other):
    every_other.prune_layer = lambda self, name, module, stats, sparsity: torch.ones(3, dtype=torch.bool)
    with pytest.raises(TypeError, match="must return a bool keep-mask shaped like"):
        prune(tiny_model("llama"), method="every_other")


def test_names_are_checked_when_registering():
    with pytest.raises(ValueError, match="already registered"):
        register_method("wanda")(type("Other", (PruningMethod,), {}))
    with pytest.raises(ValueError, match="must be a Python identifier"):
        register_method("my-method")(type("Other", (PruningMethod,), {}))
    register_method("plain")(type("Plain", (PruningMethod,), {}))
    try:
        assert GBLMConfig(method="plain").method_settings() is None  # a method without options
    finally:
        METHODS.pop("plain")
