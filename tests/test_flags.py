"""Options are defined once (GBLMConfig fields, methods' Options): the CLI, the examples' arguments and the model
card's reproduce command are generated from them and agree."""

import argparse
import dataclasses
import shlex

import pytest
from transformers import HfArgumentParser

from optimum_gblm import flags
from optimum_gblm.card import reproduce_command
from optimum_gblm.cli import build_parser
from optimum_gblm.config import GBLMConfig, PruningRuntime, option_flag, setting
from optimum_gblm.data import default_calibration_path
from optimum_gblm.methods.base import PruningMethod
from optimum_gblm.record import PruningRecord
from optimum_gblm.registry import METHODS, PROFILES, register_method


def config_parser():
    parser = argparse.ArgumentParser()
    flags.add_config_arguments(parser)
    flags.add_runtime_arguments(parser)
    return parser


def prune_parser():
    return build_parser()._subparsers._group_actions[0].choices["prune"]


def flags_of(parser):
    return {s: a for a in parser._actions for s in a.option_strings}


def roundtrip(config):
    return flags.config_from_arguments(config_parser().parse_args(flags.command_line_arguments(config)))


def test_every_recipe_field_has_a_flag_with_help():
    by_flag = flags_of(prune_parser())
    for f in dataclasses.fields(GBLMConfig):
        if not f.init or f.metadata.get("cli", True) is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        assert flag in by_flag, f"GBLMConfig.{f.name} has no CLI flag"
        assert by_flag[flag].help and by_flag[flag].help.strip(), flag
        assert by_flag[flag].dest == f.name
    assert by_flag["--calibration"].dest == "dataset"  # alias kept
    assert by_flag["--num-samples"].default == 128 and "128" in by_flag["--num-samples"].help


def test_every_method_and_profile_option_has_a_flag_with_help():
    by_flag = flags_of(prune_parser())
    count = 0
    for table in (METHODS, PROFILES):
        for name, cls in table.items():
            for f in dataclasses.fields(cls.Options) if cls.Options else ():
                flag = option_flag(name, f.name, "method" if table is METHODS else "profile")
                if not f.metadata.get("shared_by"):  # a method's own option is --<method>-<option>
                    assert flag == f"--{name}-{f.name}".replace("_", "-")
                assert flag in by_flag, f"{name}'s option {f.name} has no CLI flag"
                assert by_flag[flag].help.strip() and by_flag[flag].default is None
                count += 1
    assert count >= 4
    for flag in ("--sparsegpt-damping", "--sparsegpt-blocksize", "--owl-threshold", "--owl-spread"):
        assert flag in by_flag
    assert "0.01" in by_flag["--sparsegpt-damping"].help and "--method sparsegpt" in by_flag["--sparsegpt-damping"].help


def test_every_runtime_setting_has_a_flag():
    by_flag = flags_of(prune_parser())
    assert {"--cache-dir", "--no-cache", "--gradient-checkpointing"} <= set(by_flag)
    parsed = prune_parser().parse_args(["--output", "x", "--no-cache", "--cache-dir", "c", "--gradient-checkpointing"])
    assert flags.runtime_from_arguments(parsed) == PruningRuntime(cache_dir="c", use_cache=False, gradient_checkpointing=True)
    assert flags.runtime_from_arguments(prune_parser().parse_args(["--output", "x"])) == PruningRuntime()


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
    assert flags.command_line_arguments(GBLMConfig()) == []
    assert flags.command_line_arguments(GBLMConfig(method="sparsegpt", method_options={"damping": 0.01})) == [
        "--method", "sparsegpt"
    ]
    args = flags.command_line_arguments(GBLMConfig(method="sparsegpt", method_options={"blocksize": 32}))
    assert args == ["--method", "sparsegpt", "--sparsegpt-blocksize", "32"]
    args = flags.command_line_arguments(GBLMConfig(sparsity_profile="owl", profile_options={"spread": 0.05}))
    assert args == ["--sparsity-profile", "owl", "--owl-spread", "0.05"]
    assert flags.command_line_arguments(GBLMConfig(), always=("method", "sparsity")) == ["--method", "gblm", "--sparsity", "0.5"]
    # alpha is compared with the method's own default: gblm_obs's is "auto", so its 100 must be spelt out
    assert flags.command_line_arguments(GBLMConfig(method="gblm_obs")) == ["--method", "gblm_obs"]
    args = flags.command_line_arguments(GBLMConfig(method="gblm_obs", method_options={"alpha": 100}))
    assert args == ["--method", "gblm_obs", "--alpha", "100"]
    assert flags.config_from_arguments(config_parser().parse_args(args)).method_settings().alpha == 100.0
    assert flags.config_from_arguments(config_parser().parse_args(["--method", "gblm_obs"])).method_settings().alpha == "auto"


def test_an_option_of_another_method_is_refused_by_name():
    parsed = config_parser().parse_args(["--method", "wanda", "--sparsegpt-damping", "0.1", "--owl-spread", "0.1"])
    with pytest.raises(ValueError, match=r"--sparsegpt-damping \(only with --method sparsegpt\).*--owl-spread"):
        flags.config_from_arguments(parsed)
    parsed = config_parser().parse_args(["--method", "sparsegpt", "--sparsegpt-damping", "0.1"])
    assert flags.config_from_arguments(parsed).method_options == {"damping": 0.1, "blocksize": 128, "refit_steps": 0}


def test_a_gradient_setting_with_a_method_without_gradients_is_refused():
    # wanda has no gradient term, so --alpha and --gradient-norm mean nothing there: refused, not ignored
    for flag, value in (("--alpha", "100"), ("--gradient-norm", "l2")):
        parsed = config_parser().parse_args(["--method", "wanda", flag, value])
        with pytest.raises(ValueError, match=rf"{flag} \(only with --method gblm, .*\) given, but the recipe uses --method wanda"):
            flags.config_from_arguments(parsed)
    with pytest.raises(ValueError, match=r"method 'wanda' has no options \['alpha'\]"):
        GBLMConfig(method="wanda", method_options={"alpha": 100})


def test_bad_values_are_usage_errors():
    with pytest.raises(SystemExit):
        config_parser().parse_args(["--alpha", "much"])
    with pytest.raises(SystemExit):
        config_parser().parse_args(["--method", "nonsense"])
    assert config_parser().parse_args(["--alpha", "AUTO"]).alpha == "auto"


def test_examples_arguments_have_the_cli_names_and_help():
    cls = flags.pruning_arguments_dataclass()
    cli = {a.dest: a for a in prune_parser()._actions}
    generated = flags.all_flags()
    recipe_dests = {f.dest for f in generated if f.dest not in {r.dest for r in flags.runtime_flags()}}
    assert {f.name for f in dataclasses.fields(cls)} == recipe_dests
    for f in dataclasses.fields(cls):
        assert f.metadata["help"] == cli[f.name].help
    # Every CLI spelling of a recipe option is accepted by the examples' parser too.
    hf = flags_of(HfArgumentParser(cls))
    for flag in flags.recipe_flags() + flags.owner_flags():
        assert set(flag.flags) <= set(hf), flag.flags
        assert "--" + flag.dest in hf


def test_examples_arguments_build_the_same_config_as_the_cli():
    argv = ["--method", "sparsegpt", "--sparsegpt-blocksize", "32", "--num-samples", "8", "--calibration", "c4",
            "--target-modules", "q_proj", "k_proj", "--sparsity", "0.6"]
    (args,) = HfArgumentParser(flags.pruning_arguments_dataclass()).parse_args_into_dataclasses(argv)
    expected = flags.config_from_arguments(config_parser().parse_args(argv))
    assert args.to_config().recipe() == expected.recipe()
    (args,) = HfArgumentParser(flags.pruning_arguments_dataclass()).parse_args_into_dataclasses(["--alpha", "auto"])
    assert args.to_config().method_settings().alpha == "auto"
    (args,) = HfArgumentParser(flags.pruning_arguments_dataclass()).parse_dict({"alpha": 3, "use_variant": True})
    assert args.to_config().method_settings().alpha == 3.0 and args.to_config().method_settings().use_variant


def test_examples_arguments_can_leave_out_what_training_arguments_define():
    cls = flags.pruning_arguments_dataclass(exclude=("seed",))
    assert "seed" not in {f.name for f in dataclasses.fields(cls)}
    assert cls().to_config(seed=42).seed == 42
    runtime = flags.runtime_arguments_dataclass(exclude=("gradient_checkpointing", "use_cache"))
    assert runtime().to_runtime(gradient_checkpointing=True) == PruningRuntime(gradient_checkpointing=True)
    with pytest.raises(ValueError, match="cannot exclude"):
        flags.pruning_arguments_dataclass(exclude=("calibration_seed",))


@dataclasses.dataclass
class ToyOptions:
    strength: float = setting(0.5, "how hard to push")
    flip_sign: bool = setting(False, "negate the score")


@pytest.fixture
def toy_method():
    @register_method("toy")
    class Toy(PruningMethod):
        help = "a method registered by a test"
        Options = ToyOptions

    yield Toy
    METHODS.pop("toy")


def test_a_new_methods_options_appear_everywhere_without_hand_written_flags(toy_method):
    by_flag = flags_of(prune_parser())
    assert {"--toy-strength", "--toy-flip-sign", "--no-toy-flip-sign"} <= set(by_flag)
    config = flags.config_from_arguments(config_parser().parse_args(["--method", "toy", "--toy-flip-sign"]))
    assert config.method_options == {"strength": 0.5, "flip_sign": True}
    assert flags.command_line_arguments(config) == ["--method", "toy", "--toy-flip-sign"]
    assert roundtrip(config).recipe() == config.recipe()
    assert "toy_strength" in {f.name for f in dataclasses.fields(flags.pruning_arguments_dataclass())}


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
    return args, flags.config_from_arguments(args)


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
    target: str = setting(help="where it goes", hf_name="output_dir")
    size: int | None = setting(None, "how many (default: all)")
    model: str | None = setting(None, "which model", hf_name="model_name_or_path")
    quiet: bool = setting(False, "say less")


def test_any_options_dataclass_gets_cli_flags_and_example_arguments_from_its_fields():
    """The job's settings use the same machinery as the recipe: one field, one CLI flag, one example argument."""
    parser = argparse.ArgumentParser()
    flags.add_option_arguments(parser, ToyJobOptions, "toy", required=("model",))
    by_flag = flags_of(parser)
    assert {"--target", "--size", "--model", "--quiet"} <= set(by_flag)
    assert by_flag["--target"].required and by_flag["--model"].required and not by_flag["--size"].required
    assert by_flag["--size"].help == "how many (default: all)"
    with pytest.raises(SystemExit):
        parser.parse_args(["--target", "t"])  # --model is required here
    parsed = parser.parse_args(["--target", "t", "--model", "m", "--size", "3", "--quiet"])
    assert flags.options_from_arguments(ToyJobOptions, parsed) == ToyJobOptions("t", 3, "m", True)

    cls = flags.arguments_dataclass(ToyJobOptions)
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
    assert [f.name for f in dataclasses.fields(flags.arguments_dataclass(ToyJobOptions, exclude=("target", "quiet")))] == [
        "size", "model_name_or_path"]
