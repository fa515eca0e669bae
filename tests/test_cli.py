import json
import os
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

from conftest import sample_text, tiny_model
from optimum_gblm.cli import main
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
    assert config["quantization_config"]["calibration"] == {"source": str(text_file), "num_samples": 4, "seqlen": 16, "seed": 0}
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
    (entry,) = json.loads((output / "config.json").read_text())["quantization_config"]["evaluation"]
    assert entry["data"] == str(heldout) and entry["seqlen"] == 16 and entry["num_tokens"] % 16 == 0
    assert entry["dense_perplexity"] > 1 and entry["perplexity"] > 1
    assert f"| {heldout} | 16 |" in (output / "README.md").read_text()
