import os
import subprocess
import sys

import pytest
import torch
from conftest import sample_text, tiny_model
from optimum.quantization_base import OptimumQuantizer
from transformers import AutoModelForCausalLM

from optimum_gblm import GBLMConfig, GBLMPruner
from optimum_gblm.masks import check_nm


def test_pruner_offers_optimums_quantizer_interface(tmp_path, tokenizer):
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (4, 16))
    pruner = GBLMPruner.from_pretrained(model, config=GBLMConfig(method="wanda", pattern="2:4"), show_progress=False)
    assert isinstance(pruner, OptimumQuantizer)
    (tmp_path / "out").mkdir()  # an earlier checkpoint
    (tmp_path / "out" / "config.json").write_text("{}")
    (tmp_path / "out" / "model.safetensors").write_text("old weights")
    with pytest.raises(ValueError, match="already holds files"):
        pruner.quantize(tmp_path / "out", calibration=ids)
    assert all(not torch.equal(m.weight, torch.zeros_like(m.weight)) for m in [model.model.layers[0].mlp.up_proj])
    pruner.quantize(tmp_path / "out", calibration=ids, overwrite=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert check_nm(loaded.model.layers[1].mlp.down_proj.weight != 0, 2, 4)


def test_from_pretrained_loads_a_folder_with_its_tokenizer(tmp_path, tokenizer):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "text.txt").write_text(sample_text(600))
    config = GBLMConfig(num_samples=2, seqlen=16)
    pruner = GBLMPruner.from_pretrained(str(tmp_path / "base"), config=config, show_progress=False)
    assert pruner.tokenizer is not None
    pruner.quantize(tmp_path / "pruned", calibration=str(tmp_path / "text.txt"))
    assert (tmp_path / "pruned" / "gblm_masks.safetensors").is_file()
    with pytest.raises(ValueError, match="no model is bound"):
        GBLMPruner(config).quantize(tmp_path / "other")


def test_optimum_cli_has_the_gblm_command(tmp_path, tokenizer):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "text.txt").write_text(sample_text(600))
    cli = os.path.join(os.path.dirname(sys.executable), "optimum-cli")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [cli, "gblm", "prune", "--model", str(tmp_path / "base"), "--calibration", str(tmp_path / "text.txt"),
         "--num-samples", "2", "--seqlen", "16", "--method", "wanda", "--output", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "measured global sparsity 0.5000" in done.stdout
    refused = subprocess.run(
        [cli, "gblm", "prune", "--model", str(tmp_path / "base"), "--sparsity", "2", "--output", str(tmp_path / "x")],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert refused.returncode == 2 and "sparsity must lie in [0, 1)" in refused.stderr
    # The same generated options as `optimum-gblm prune`: method and profile options included.
    usage = subprocess.run([cli, "gblm", "prune", "--help"], capture_output=True, text=True, env=env, timeout=300)
    assert usage.returncode == 0, usage.stderr
    for flag in ("--num-samples", "--sparsegpt-blocksize", "--owl-spread", "--no-cache", "--overwrite"):
        assert flag in usage.stdout
