import json
import os
import shlex
import subprocess
import sys

import pytest
from conftest import sample_text, tiny_model
from transformers import AutoModelForCausalLM

from optimum_gblm import options
from optimum_gblm.cli import build_parser, main
from optimum_gblm.config import GBLMConfig
from optimum_gblm.engine import prunable_modules
from optimum_gblm.masks import check_nm


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    path = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calibration.txt"
    path.write_text(sample_text(800))
    return path


def prune_args(model_dir, text_file, output, *extra):
    return [
        "prune", "--model", str(model_dir), "--calibration", str(text_file), "--num-samples", "4", "--seqlen", "16",
        "--output", str(output), "--cache-dir", str(output.parent / "grad-cache"), *extra,
    ]


def test_prune_saves_a_loadable_pruned_checkpoint(model_dir, text_file, tmp_path, capsys):
    output = tmp_path / "pruned"
    assert main(prune_args(model_dir, text_file, output, "--method", "gblm", "--pattern", "2:4")) == 0
    assert "measured global sparsity 0.5000" in capsys.readouterr().out
    config = json.loads((output / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gblm"
    assert config["quantization_config"]["pattern"] == "2:4"
    assert config["quantization_config"]["record"]["calibration"] == {
        "source": str(text_file), "num_samples": 4, "seqlen": 16, "seed": 0
    }
    model = AutoModelForCausalLM.from_pretrained(output)
    for module in prunable_modules(model).values():
        assert check_nm(module.weight != 0, 2, 4)
    assert (output / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned")]


def test_existing_output_is_refused_unless_overwrite(model_dir, text_file, tmp_path, capsys):
    output = tmp_path / "pruned"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    assert main(prune_args(model_dir, text_file, output)) == 2
    err = capsys.readouterr().err
    assert "already holds files" in err and "--overwrite" in err
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    assert main(prune_args(model_dir, text_file, output, "--overwrite")) == 0
    assert not (output / "keep.txt").exists() and (output / "config.json").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sparsity", "1.5"], "sparsity must lie in [0, 1)"),
        (["--pattern", "4:4"], "0 < N < M"),
        (["--pattern", "2:4", "--sparsity", "0.6"], "set sparsity=0.5"),
        (["--seqlen", "100000"], "found"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(model_dir, text_file, tmp_path, capsys, extra, message):
    output = tmp_path / "pruned"
    assert main(prune_args(model_dir, text_file, output, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_eval_prints_perplexity_with_its_protocol(model_dir, text_file, capsys):
    assert main(["eval", "--model", str(model_dir), "--data", str(text_file), "--seqlen", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["seqlen"] == 16 and result["num_tokens"] == result["num_windows"] * 16 and result["perplexity"] > 1


def test_console_script_runs(model_dir, text_file, tmp_path):
    output = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "optimum_gblm.cli", *prune_args(model_dir, text_file, output, "--method", "wanda")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (output / "model.safetensors").is_file()


def test_prune_measures_dense_and_pruned_perplexity_into_the_checkpoint(model_dir, text_file, tmp_path, capsys):
    output = tmp_path / "pruned"
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(sample_text(300, seed=5))
    assert main(prune_args(model_dir, text_file, output, "--eval-data", str(heldout), "--eval-seqlen", "16")) == 0
    assert "dense ppl" in capsys.readouterr().out
    (entry,) = json.loads((output / "config.json").read_text())["quantization_config"]["record"]["evaluation"]
    assert entry["data"] == str(heldout) and entry["seqlen"] == 16 and entry["num_tokens"] % 16 == 0
    assert entry["dense_perplexity"] > 1 and entry["perplexity"] > 1
    assert f"| {heldout} | 16 |" in (output / "README.md").read_text()


def test_a_file_that_appears_during_the_run_is_kept_without_overwrite(model_dir, text_file, tmp_path, capsys, monkeypatch):
    """The output folder is checked before the run and again at the save: only --overwrite may replace files."""
    from optimum_gblm.pruner import GBLMPruner

    output = tmp_path / "pruned"
    prune = GBLMPruner.prune

    def prune_while_someone_writes(self, model, *args, **kwargs):
        result = prune(self, model, *args, **kwargs)
        output.mkdir()
        (output / "notes.txt").write_text("written by someone else during the run")
        return result

    monkeypatch.setattr(GBLMPruner, "prune", prune_while_someone_writes)
    assert main(prune_args(model_dir, text_file, output, "--method", "wanda")) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "error" in line]  # one line, besides progress bars
    assert line.startswith("optimum-gblm prune: error: ") and "already holds files" in line and "--overwrite" in line
    assert "Traceback" not in err
    assert [p.name for p in output.iterdir()] == ["notes.txt"]
    assert (output / "notes.txt").read_text() == "written by someone else during the run"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned")]


def test_method_and_profile_options_reach_the_checkpoint_and_its_reproduce_line(model_dir, text_file, tmp_path):
    output = tmp_path / "pruned"
    extra = ["--method", "sparsegpt", "--sparsegpt-damping", "0.05", "--sparsegpt-blocksize", "8",
             "--sparsity-profile", "owl", "--owl-threshold", "3", "--owl-spread", "0.05"]
    assert main(prune_args(model_dir, text_file, output, *extra)) == 0
    saved = GBLMConfig.from_dict(json.loads((output / "config.json").read_text())["quantization_config"])
    assert saved.method_options == {"damping": 0.05, "blocksize": 8}
    assert saved.profile_options == {"threshold": 3.0, "spread": 0.05}
    # The card's reproduce line parses with today's CLI and gives back the saved recipe.
    card = (output / "README.md").read_text()
    (line,) = [l for l in card.splitlines() if l.startswith("pip install optimum-gblm && ")]
    argv = shlex.split(line.split(" && ", 1)[1])
    assert argv[:2] == ["optimum-gblm", "prune"]
    for flag in ("--sparsegpt-damping", "--sparsegpt-blocksize", "--owl-threshold", "--owl-spread"):
        assert flag in argv
    args = build_parser().parse_args(argv[1:])
    assert args.model == str(model_dir)
    assert options.config_from_arguments(args).recipe() == saved.recipe()


def test_an_option_of_another_method_is_a_clear_error(model_dir, text_file, tmp_path, capsys):
    output = tmp_path / "pruned"
    assert main(prune_args(model_dir, text_file, output, "--method", "wanda", "--sparsegpt-blocksize", "64")) == 2
    err = capsys.readouterr().err
    assert "--sparsegpt-blocksize" in err and "--method sparsegpt" in err
    assert not output.exists()
