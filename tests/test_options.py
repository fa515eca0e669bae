"""Options are defined once (GBLMConfig fields, methods' Options): the CLI, the examples' arguments and the model
card's reproduce command are generated from them and agree."""

import argparse
import dataclasses
import shlex

import pytest
from transformers import HfArgumentParser

from optimum_gblm import options
from optimum_gblm.card import reproduce_command
from optimum_gblm.cli import build_parser
from optimum_gblm.config import GBLMConfig, PruningRuntime, option, option_flag
from optimum_gblm.data import default_calibration_path
from optimum_gblm.methods.base import PruningMethod
from optimum_gblm.record import PruningRecord
from optimum_gblm.registry import METHODS, PROFILES, register_method


def config_parser():
    parser = argparse.ArgumentParser()
    options.add_config_arguments(parser)
    options.add_runtime_arguments(parser)
    return parser


def prune_parser():
    return build_parser()._subparsers._group_actions[0].choices["prune"]


def flags_of(parser):
    return {s: a for a in parser._actions for s in a.option_strings}


def roundtrip(config):
    return options.config_from_arguments(config_parser().parse_args(options.command_line_arguments(config)))


def test_every_recipe_field_has_a_flag_with_help():
    flags = flags_of(prune_parser())
    for f in dataclasses.fields(GBLMConfig):
        if not f.init or f.metadata.get("cli", True) is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        assert flag in flags, f"GBLMConfig.{f.name} has no CLI flag"
        assert flags[flag].help and flags[flag].help.strip(), flag
        assert flags[flag].dest == f.name
    assert flags["--calibration"].dest == "dataset"  # alias kept
    assert flags["--num-samples"].default == 128 and "128" in flags["--num-samples"].help


def test_every_method_and_profile_option_has_a_flag_with_help():
    flags = flags_of(prune_parser())
    count = 0
    for table in (METHODS, PROFILES):
        for name, cls in table.items():
            for f in dataclasses.fields(cls.Options) if cls.Options else ():
                flag = option_flag(name, f.name, "method" if table is METHODS else "profile")
                if not f.metadata.get("shared_by"):  # a method's own option is --<method>-<option>
                    assert flag == f"--{name}-{f.name}".replace("_", "-")
                assert flag in flags, f"{name}'s option {f.name} has no CLI flag"
                assert flags[flag].help.strip() and flags[flag].default is None
                count += 1
    assert count >= 4
    for flag in ("--sparsegpt-damping", "--sparsegpt-blocksize", "--owl-threshold", "--owl-spread"):
        assert flag in flags
    assert "0.01" in flags["--sparsegpt-damping"].help and "--method sparsegpt" in flags["--sparsegpt-damping"].help


def test_every_runtime_setting_has_a_flag():
    flags = flags_of(prune_parser())
    assert {"--cache-dir", "--no-cache", "--gradient-checkpointing"} <= set(flags)
    parsed = prune_parser().parse_args(["--output", "x", "--no-cache", "--cache-dir", "c", "--gradient-checkpointing"])
    assert options.runtime_from_arguments(parsed) == PruningRuntime(cache_dir="c", use_cache=False, gradient_checkpointing=True)
    assert options.runtime_from_arguments(prune_parser().parse_args(["--output", "x"])) == PruningRuntime()


@pytest.mark.parametrize(
    "config",
    [
        GBLMConfig(),
        GBLMConfig(method="sparsegpt", method_options={"damping": 0.05, "blocksize": 64}),
        GBLMConfig(method="sparsegpt", pattern="2:4", method_options={"damping": 0.123456789}),
        GBLMConfig(sparsity_profile="owl", profile_options={"threshold": 7.0, "spread": 0.1}, sparsity=0.7),
        GBLMConfig(method_options={"alpha": "auto", "gradient_norm": "l2"}, num_samples=4, seqlen=16, seed=3),
        GBLMConfig(method_options={"alpha": 0.0, "use_variant": True}, target_modules=["q_proj", "mlp\\.down_proj$"]),
        GBLMConfig(method="magnitude", method_options={"scope": "layer"}, sparsity=0.3, dataset="wikitext2"),
        GBLMConfig(method="gblm", pattern="4:8", method_options={"alpha": 12.5}),
    ],
)
def test_command_line_arguments_round_trip(config):
    assert roundtrip(config).recipe() == config.recipe()


@pytest.mark.parametrize(
    "method_options",
    [{"mu": 0.5}, {"mu_candidates": [0.1, 1.0], "selection": "joint"}, {"damping": 0.02, "blocksize": 64, "cv_rows": 0}],
)
def test_list_and_parsed_method_options_round_trip(method_options):
    if "gblm_obs" not in METHODS:
        pytest.skip("gblm_obs is not registered")
    config = GBLMConfig(method="gblm_obs", method_options=method_options)
    assert roundtrip(config).recipe() == config.recipe()


def test_command_line_arguments_are_a_diff_against_the_defaults():
    assert options.command_line_arguments(GBLMConfig()) == []
    assert options.command_line_arguments(GBLMConfig(method="sparsegpt", method_options={"damping": 0.01})) == [
        "--method", "sparsegpt"
    ]
    args = options.command_line_arguments(GBLMConfig(method="sparsegpt", method_options={"blocksize": 32}))
    assert args == ["--method", "sparsegpt", "--sparsegpt-blocksize", "32"]
    args = options.command_line_arguments(GBLMConfig(sparsity_profile="owl", profile_options={"spread": 0.05}))
    assert args == ["--sparsity-profile", "owl", "--owl-spread", "0.05"]
    assert options.command_line_arguments(GBLMConfig(), always=("method", "sparsity")) == ["--method", "gblm", "--sparsity", "0.5"]
    # alpha is compared with the method's own default: gblm_obs's is "auto", so its 100 must be spelt out
    assert options.command_line_arguments(GBLMConfig(method="gblm_obs")) == ["--method", "gblm_obs"]
    args = options.command_line_arguments(GBLMConfig(method="gblm_obs", method_options={"alpha": 100}))
    assert args == ["--method", "gblm_obs", "--alpha", "100"]
    assert options.config_from_arguments(config_parser().parse_args(args)).method_settings().alpha == 100.0
    assert options.config_from_arguments(config_parser().parse_args(["--method", "gblm_obs"])).method_settings().alpha == "auto"


def test_an_option_of_another_method_is_refused_by_name():
    parsed = config_parser().parse_args(["--method", "wanda", "--sparsegpt-damping", "0.1", "--owl-spread", "0.1"])
    with pytest.raises(ValueError, match=r"--sparsegpt-damping \(only with --method sparsegpt\).*--owl-spread"):
        options.config_from_arguments(parsed)
    parsed = config_parser().parse_args(["--method", "sparsegpt", "--sparsegpt-damping", "0.1"])
    assert options.config_from_arguments(parsed).method_options == {"damping": 0.1, "blocksize": 128, "refit_steps": 0}


def test_bad_values_are_usage_errors():
    with pytest.raises(SystemExit):
        config_parser().parse_args(["--alpha", "much"])
    with pytest.raises(SystemExit):
        config_parser().parse_args(["--method", "nonsense"])
    assert config_parser().parse_args(["--alpha", "AUTO"]).alpha == "auto"


def test_examples_arguments_have_the_cli_names_and_help():
    cls = options.pruning_arguments_dataclass()
    cli = {a.dest: a for a in prune_parser()._actions}
    generated = options.all_flags()
    recipe_dests = {f.dest for f in generated if f.dest not in {r.dest for r in options.runtime_flags()}}
    assert {f.name for f in dataclasses.fields(cls)} == recipe_dests
    for f in dataclasses.fields(cls):
        assert f.metadata["help"] == cli[f.name].help
    # Every CLI spelling of a recipe option is accepted by the examples' parser too.
    hf = flags_of(HfArgumentParser(cls))
    for flag in options.recipe_flags() + options.owner_flags():
        assert set(flag.flags) <= set(hf), flag.flags
        assert "--" + flag.dest in hf


def test_examples_arguments_build_the_same_config_as_the_cli():
    argv = ["--method", "sparsegpt", "--sparsegpt-blocksize", "32", "--num-samples", "8", "--calibration", "c4",
            "--target-modules", "q_proj", "k_proj", "--sparsity", "0.6"]
    (args,) = HfArgumentParser(options.pruning_arguments_dataclass()).parse_args_into_dataclasses(argv)
    expected = options.config_from_arguments(config_parser().parse_args(argv))
    assert args.to_config().recipe() == expected.recipe()
    (args,) = HfArgumentParser(options.pruning_arguments_dataclass()).parse_args_into_dataclasses(["--alpha", "auto"])
    assert args.to_config().method_settings().alpha == "auto"
    (args,) = HfArgumentParser(options.pruning_arguments_dataclass()).parse_dict({"alpha": 3, "use_variant": True})
    assert args.to_config().method_settings().alpha == 3.0 and args.to_config().method_settings().use_variant


def test_examples_arguments_can_leave_out_what_training_arguments_define():
    cls = options.pruning_arguments_dataclass(exclude=("seed",))
    assert "seed" not in {f.name for f in dataclasses.fields(cls)}
    assert cls().to_config(seed=42).seed == 42
    runtime = options.runtime_arguments_dataclass(exclude=("gradient_checkpointing", "use_cache"))
    assert runtime().to_runtime(gradient_checkpointing=True) == PruningRuntime(gradient_checkpointing=True)
    with pytest.raises(ValueError, match="cannot exclude"):
        options.pruning_arguments_dataclass(exclude=("calibration_seed",))


@dataclasses.dataclass
class ToyOptions:
    strength: float = option(0.5, "how hard to push")
    flip_sign: bool = option(False, "negate the score")


@pytest.fixture
def toy_method():
    @register_method("toy")
    class Toy(PruningMethod):
        help = "a method registered by a test"
        Options = ToyOptions

    yield Toy
    METHODS.pop("toy")


def test_a_new_methods_options_appear_everywhere_without_hand_written_flags(toy_method):
    flags = flags_of(prune_parser())
    assert {"--toy-strength", "--toy-flip-sign", "--no-toy-flip-sign"} <= set(flags)
    config = options.config_from_arguments(config_parser().parse_args(["--method", "toy", "--toy-flip-sign"]))
    assert config.method_options == {"strength": 0.5, "flip_sign": True}
    assert options.command_line_arguments(config) == ["--method", "toy", "--toy-flip-sign"]
    assert roundtrip(config).recipe() == config.recipe()
    assert "toy_strength" in {f.name for f in dataclasses.fields(options.pruning_arguments_dataclass())}


def pruned_config(**recipe):
    config = GBLMConfig(**recipe)
    config.record = PruningRecord(
        base_model={"name": "org/base-model", "gguf_file": "base.Q8_0.gguf"},
        calibration={"source": "wikitext2", "num_samples": config.num_samples, "seqlen": config.seqlen, "seed": 0},
    )
    return config


def parse_reproduce(line):
    argv = shlex.split(line)
    assert argv[:2] == ["optimum-gblm", "prune"]
    args = build_parser().parse_args(argv[1:])
    return args, options.config_from_arguments(args)


@pytest.mark.parametrize(
    "recipe",
    [
        dict(method="sparsegpt", pattern="2:4", method_options={"damping": 0.1, "blocksize": 16}),
        dict(sparsity_profile="owl", profile_options={"threshold": 3.0, "spread": 0.12}, method_options={"alpha": "auto"}),
        dict(method="wanda", target_modules=["q_proj", "down_proj"], num_samples=16, seqlen=256),
    ],
)
def test_the_cards_reproduce_command_uses_existing_flags_and_reproduces_the_recipe(recipe):
    config = pruned_config(**recipe)
    line = reproduce_command(config)
    args, parsed = parse_reproduce(line)
    assert args.model == "org/base-model" and args.gguf_file == "base.Q8_0.gguf" and args.output == "OUTPUT_DIR"
    assert parsed.recipe() == {**config.recipe(), "dataset": "wikitext2"}
    assert "--method" in line and "--sparsity" in line and "--pattern" in line  # stated for the card's reader


def test_reproduce_command_leaves_out_calibration_it_cannot_name():
    config = pruned_config(method="wanda")
    config.record.calibration["source"] = str(default_calibration_path())
    assert "--dataset" not in reproduce_command(config)
    config.record.calibration["source"] = "token ids (4, 16)"
    assert "--dataset" not in reproduce_command(config)
    config.record.base_model = {"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "default": True}
    args, parsed = parse_reproduce(reproduce_command(config))
    assert args.model is None and parsed.recipe() == config.recipe()


@dataclasses.dataclass
class ToyJobOptions:
    target: str = option(help="where it goes", hf_name="output_dir")
    size: int | None = option(None, "how many (default: all)")
    model: str | None = option(None, "which model", hf_name="model_name_or_path")
    quiet: bool = option(False, "say less")


def test_any_options_dataclass_gets_cli_flags_and_example_arguments_from_its_fields():
    """The job's settings use the same machinery as the recipe: one field, one CLI flag, one example argument."""
    parser = argparse.ArgumentParser()
    options.add_option_arguments(parser, ToyJobOptions, "toy", required=("model",))
    flags = flags_of(parser)
    assert {"--target", "--size", "--model", "--quiet"} <= set(flags)
    assert flags["--target"].required and flags["--model"].required and not flags["--size"].required
    assert flags["--size"].help == "how many (default: all)"
    with pytest.raises(SystemExit):
        parser.parse_args(["--target", "t"])  # --model is required here
    parsed = parser.parse_args(["--target", "t", "--model", "m", "--size", "3", "--quiet"])
    assert options.options_from_arguments(ToyJobOptions, parsed) == ToyJobOptions("t", 3, "m", True)

    cls = options.arguments_dataclass(ToyJobOptions)
    assert cls.__name__ == "ToyJobArguments"
    assert [f.name for f in dataclasses.fields(cls)] == ["output_dir", "size", "model_name_or_path", "quiet"]
    hf = HfArgumentParser(cls)
    for argv in (["--output_dir", "t", "--model_name_or_path", "m"], ["--target", "t", "--model", "m"]):
        (args,) = hf.parse_args_into_dataclasses(argv)  # transformers' names, and the CLI's as aliases
        assert args.to_options() == ToyJobOptions("t", None, "m", False)
    with pytest.raises(SystemExit):
        hf.parse_args_into_dataclasses([])  # required: no default
    (args,) = hf.parse_dict({"output_dir": "t", "size": 2})  # a JSON file uses the example names
    assert args.to_options(quiet=True) == ToyJobOptions("t", 2, None, True)
    assert [f.name for f in dataclasses.fields(options.arguments_dataclass(ToyJobOptions, exclude=("target", "quiet")))] == [
        "size", "model_name_or_path"]
