import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.hf_api import CommitInfo, RepoUrl

from optimum_gblm import GBLMConfig, GBLMPruner, perplexity
from optimum_gblm.evaluation import record_evaluation
from optimum_gblm.hub import push_folder_to_hub

EXPECTED_FILES = {"config.json", "generation_config.json", "model.safetensors", "gblm_masks.safetensors", "README.md"}


@pytest.fixture
def base_dir(tmp_path):
    path = tmp_path / "org-tiny-llama"
    tiny_model("llama").save_pretrained(path)
    (path / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    return path


def pruned_from(base_dir, evaluate=True):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    tokens = torch.randint(0, 96, (64,), generator=torch.Generator().manual_seed(0))
    dense = perplexity(model, tokens, seqlen=16, show_progress=False)
    GBLMPruner(GBLMConfig(pattern="2:4"), show_progress=False).prune(model, torch.randint(0, 96, (4, 16)))
    if evaluate:
        record_evaluation(model, "held-out.txt", perplexity(model, tokens, seqlen=16, show_progress=False), dense)
    return model


def test_saved_card_metadata_and_body(base_dir, tmp_path):
    model = pruned_from(base_dir)
    model.save_pretrained(tmp_path / "out")
    text = (tmp_path / "out" / "README.md").read_text()
    metadata = yaml.safe_load(text.split("---")[1])
    # a local folder is no Hub id: named in the body, kept out of the base_model metadata the Hub validates
    assert "base_model" not in metadata and str(base_dir) in text
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-generation"
    assert {"pruned", "sparse", "gblm", "2of4-sparsity"} <= set(metadata["tags"])
    assert metadata["license"] == "mit"
    result = metadata["model-index"][0]["results"][0]
    assert result["metrics"][0]["type"] == "perplexity" and result["dataset"]["name"] == "held-out.txt"
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.eval_results[0].metric_value == pytest.approx(model.config.quantization_config.record.evaluation[0]["perplexity"], abs=1e-4)
    for heading in ("## Recipe", "## Calibration data", "## Measured sparsity", "## Evaluation", "## How to load", "## Reproduce"):
        assert heading in text
    assert "4 sequences x 16 tokens" in text and "| 1 | 0.5000 |" in text
    assert "import optimum_gblm" in text and "optimum-gblm prune --model" in text and "--pattern 2:4" in text
    assert "| held-out.txt | 16 | 64 |" in text


def test_a_hub_base_model_is_named_in_the_metadata():
    from optimum_gblm.hub import build_model_card
    from optimum_gblm.record import PruningRecord

    record = PruningRecord(base_model={"name": "meta-llama/Llama-2-7b-hf", "license": "llama2"}, global_sparsity=0.5, layer_sparsity={})
    config = GBLMConfig(method="wanda", record=record)
    metadata = yaml.safe_load(str(build_model_card(config)).split("---")[1])
    assert metadata["base_model"] == "meta-llama/Llama-2-7b-hf" and metadata["license"] == "llama2"
    assert "--model meta-llama/Llama-2-7b-hf --method wanda" in str(build_model_card(config))


@pytest.fixture
def captured_commits(monkeypatch):
    commits = []

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"{self.endpoint}/{repo_id}", endpoint=self.endpoint)

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            source = op.path_or_fileobj
            files[op.path_in_repo] = Path(source).read_bytes() if isinstance(source, (str, Path)) else source
        commits.append({"repo_id": repo_id, "files": files, **kwargs})
        return CommitInfo(commit_url=f"{self.endpoint}/{repo_id}/commit/abc", commit_message=kwargs.get("commit_message", ""),
                          commit_description="", oid="abc" * 13 + "a")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return commits


def test_model_push_to_hub_uploads_everything_with_our_card_in_one_commit(base_dir, captured_commits):
    model = pruned_from(base_dir)
    model.push_to_hub("user/tiny-gblm", token="hf_test")
    assert len(captured_commits) == 1
    files = captured_commits[0]["files"]
    assert set(files) == EXPECTED_FILES
    card = files["README.md"].decode()
    assert "## Recipe" in card and "optimum-gblm" in card and "# user/tiny-gblm" in card
    assert "automatically generated" not in card


def test_pruner_and_cli_push(base_dir, tmp_path, captured_commits, tokenizer):
    from optimum_gblm.cli import main

    pruner = GBLMPruner.from_pretrained(pruned_from(base_dir), config=GBLMConfig(pattern="2:4"), tokenizer=tokenizer)
    pruner.push_to_hub("user/a")
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(captured_commits[0]["files"])
    pruned_from(base_dir).save_pretrained(tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    assert main(["push", str(tmp_path / "ckpt"), "user/b"]) == 0
    assert set(captured_commits[1]["files"]) == EXPECTED_FILES
    assert captured_commits[1]["files"]["README.md"] == before["README.md"]
    assert main(["push", str(tmp_path / "ckpt"), "user/c", "--keep-hub-card"]) == 0
    assert set(captured_commits[2]["files"]) == EXPECTED_FILES - {"README.md"}
    (tmp_path / "ckpt" / "README.md").unlink()
    assert main(["push", str(tmp_path / "ckpt"), "user/d"]) == 0
    assert "## Recipe" in captured_commits[3]["files"]["README.md"].decode()
    assert not (tmp_path / "ckpt" / "README.md").exists()  # generated for the upload only


def test_pushing_a_folder_that_is_not_a_pruned_checkpoint_is_refused(base_dir):
    with pytest.raises(ValueError, match="was not pruned by optimum-gblm"):
        push_folder_to_hub(base_dir, "user/x")


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_unreachable_endpoint_is_a_clear_error_and_the_folder_is_untouched(base_dir, tmp_path):
    pruned_from(base_dir).save_pretrained(tmp_path / "ckpt")
    before = digest(tmp_path / "ckpt")
    with pytest.raises(ConnectionError, match=r"could not push .* to http://127\.0\.0\.1:9 .*HF_ENDPOINT.*unchanged"):
        push_folder_to_hub(tmp_path / "ckpt", "user/x", endpoint="http://127.0.0.1:9", token="hf_test")
    # and through the CLI, with the endpoint from huggingface_hub's own setting
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_test", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "optimum_gblm.cli", "push", str(tmp_path / "ckpt"), "user/x"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    assert "could not push" in done.stderr and "127.0.0.1:9" in done.stderr and "Traceback" not in done.stderr
    assert digest(tmp_path / "ckpt") == before
