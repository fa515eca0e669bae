import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
from conftest import sample_text, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_gblm import flags
from optimum_gblm.cli import build_parser, main
from optimum_gblm.config import GBLMConfig
from optimum_gblm.masks import check_nm
from optimum_gblm.structure import prunable_modules


def prune_parser():
    return build_parser()._subparsers._group_actions[0].choices["prune"]


def flags_of(parser):
    return {s: a for a in parser._actions for s in a.option_strings}


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
    output.mkdir()  # an earlier checkpoint
    (output / "config.json").write_text("{}")
    (output / "model.safetensors").write_text("old weights")
    assert main(prune_args(model_dir, text_file, output)) == 2
    err = capsys.readouterr().err
    assert "already holds files" in err and "--overwrite" in err
    assert (output / "model.safetensors").read_text() == "old weights"
    assert main(prune_args(model_dir, text_file, output, "--overwrite")) == 0
    assert json.loads((output / "config.json").read_text())["quantization_config"]["quant_method"] == "gblm"


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
    rows = [row for row in (output / "README.md").read_text().splitlines() if row.startswith("| ")]
    assert any(heldout.name in row and "| 16 |" in row for row in rows)  # the card's evaluation table


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
    assert saved.method_options == {"damping": 0.05, "blocksize": 8, "refit_steps": 0}
    assert saved.profile_options == {"threshold": 3.0, "spread": 0.05}
    # The card's reproduce line parses with today's CLI and gives back the saved recipe.
    card = (output / "README.md").read_text()
    (line,) = [l for l in card.splitlines() if l.startswith("pip install ") and " && optimum-gblm prune " in l]
    # Local paths may be written as placeholders that the card explains: fill them in as its reader would.
    filled = {"MODEL_DIR": str(model_dir), "CALIBRATION_DATA": str(text_file)}
    argv = [filled.get(arg, arg) for arg in shlex.split(line.split(" && ", 1)[1])]
    assert argv[:2] == ["optimum-gblm", "prune"]
    for flag in ("--sparsegpt-damping", "--sparsegpt-blocksize", "--owl-threshold", "--owl-spread"):
        assert flag in argv
    args = build_parser().parse_args(argv[1:])
    assert args.model == str(model_dir)
    assert flags.config_from_arguments(args).recipe() == saved.recipe()


def test_an_option_of_another_method_is_a_clear_error(model_dir, text_file, tmp_path, capsys):
    output = tmp_path / "pruned"
    assert main(prune_args(model_dir, text_file, output, "--method", "wanda", "--sparsegpt-blocksize", "64")) == 2
    err = capsys.readouterr().err
    assert "--sparsegpt-blocksize" in err and "--method sparsegpt" in err
    assert not output.exists()


# -- dtype ---------------------------------------------------------------------------------------------------------
def test_dtype_defaults_to_the_checkpoints_own(model_dir, text_file, tmp_path, capsys):
    """The default is dtype "auto": a bfloat16 checkpoint is pruned and saved in bfloat16, not blown up to float32."""
    from safetensors import safe_open

    bf16_dir = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).save_pretrained(bf16_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(bf16_dir)
    output = tmp_path / "pruned"
    assert main(prune_args(bf16_dir, text_file, output, "--method", "wanda", "--eval-data", "none")) == 0
    with safe_open(output / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}
    dtype = flags_of(prune_parser())["--dtype"]
    assert dtype.default == "auto" and dtype.choices == ("auto", "float32", "bfloat16", "float16")
    assert "float32" in dtype.help and "GGUF" in dtype.help  # the GGUF default model's choice is documented


# -- evaluation by default -----------------------------------------------------------------------------------------
def test_prune_measures_the_held_out_end_of_the_shipped_text_by_default(model_dir, tmp_path, capsys):
    from optimum_gblm.data import default_calibration_path
    from optimum_gblm.jobs import HELDOUT_NAME, HELDOUT_TOKENS

    output = tmp_path / "pruned"
    argv = ["prune", "--model", str(model_dir), "--num-samples", "4", "--seqlen", "16", "--output", str(output),
            "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"{HELDOUT_NAME}: dense ppl" in out and "pruned ppl" in out
    record = json.loads((output / "config.json").read_text())["quantization_config"]["record"]
    (entry,) = record["evaluation"]
    assert entry["data"] == HELDOUT_NAME and entry["seqlen"] == 512 and entry["num_tokens"] == HELDOUT_TOKENS
    assert entry["dense_perplexity"] > 1 and entry["perplexity"] > 1
    assert record["calibration"]["source"] == str(default_calibration_path())
    assert record["calibration"]["held_out_tokens"] == HELDOUT_TOKENS
    assert f"| {HELDOUT_NAME} | 512 | {HELDOUT_TOKENS} |" in (output / "README.md").read_text()
    help_text = flags_of(prune_parser())["--eval-data"].help
    assert "Pride and Prejudice" in help_text and "none" in help_text


def test_eval_data_none_skips_the_evaluation(model_dir, text_file, tmp_path, capsys):
    output = tmp_path / "pruned"
    assert main(prune_args(model_dir, text_file, output, "--method", "wanda", "--eval-data", "none")) == 0
    assert "dense ppl" not in capsys.readouterr().out
    assert json.loads((output / "config.json").read_text())["quantization_config"]["record"]["evaluation"] == []
    assert main(prune_args(model_dir, text_file, tmp_path / "x", "--eval-data", "none", str(text_file))) == 2
    assert "give it alone" in capsys.readouterr().err


@pytest.mark.parametrize("dataset", [None, "shipped path"])
def test_calibration_on_the_shipped_text_never_draws_from_the_held_out_tokens(tmp_path, monkeypatch, dataset):
    """Every token has its own id here, so a window's ids say where in the text it was drawn."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from optimum_gblm import jobs
    from optimum_gblm.config import GBLMConfig

    total = 12000
    shipped = tmp_path / "shipped.txt"
    shipped.write_text(" ".join(f"w{i}" for i in range(total)))
    backend = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(total)} | {"[UNK]": total}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    numbered = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    monkeypatch.setattr(jobs, "default_calibration_path", lambda: shipped)
    seen = {}

    def capture(self, model, calibration=None, **kwargs):
        seen["calibration"] = calibration
        raise StopIteration

    monkeypatch.setattr(jobs.GBLMPruner, "prune", capture)
    config = GBLMConfig(method="wanda", num_samples=64, seqlen=2048, dataset=None if dataset is None else str(shipped))
    with pytest.raises(StopIteration):
        jobs.prune_model(torch.nn.Module(), numbered, config)
    windows = seen["calibration"]
    assert isinstance(windows, torch.Tensor) and windows.shape == (64, 2048)
    assert torch.equal(windows[:, 1:] - windows[:, :-1], torch.ones(64, 2047, dtype=torch.long))  # contiguous text
    assert int(windows.max()) < total - jobs.HELDOUT_TOKENS  # nothing from the held-out end
    _, heldout = jobs.split_shipped_text(numbered)
    assert torch.equal(heldout, torch.arange(total - jobs.HELDOUT_TOKENS, total))


# -- errors: one line and exit status 2 ----------------------------------------------------------------------------
def one_error_line(err, command):
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error" in line.lower()]
    assert line.startswith(f"optimum-gblm {command}: error: ")
    return line


@pytest.mark.parametrize("command", ["eval", "prune"])
def test_a_cuda_device_without_cuda_is_one_line_before_anything_loads(model_dir, text_file, tmp_path, monkeypatch,
                                                                      capsys, command):
    from optimum_gblm import jobs

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the device was checked")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(jobs, "load_model", no_loading)
    output = tmp_path / "pruned"
    argv = (["eval", "--model", str(model_dir), "--data", str(text_file)] if command == "eval"
            else prune_args(model_dir, text_file, output))
    assert main([*argv, "--device", "cuda"]) == 2
    line = one_error_line(capsys.readouterr().err, command)
    assert "--device cuda" in line and "--device cpu" in line
    assert not output.exists()


@pytest.mark.parametrize(
    "device, available, message",
    [
        ("cuda:3", True, "only 1 CUDA device(s) are visible"),
        ("mps", False, "mps backend is not available"),
        ("meta", False, "not meta"),
        ("gpu7", False, "is not a device"),
    ],
)
def test_bad_devices_are_one_line(model_dir, text_file, monkeypatch, capsys, device, available, message):
    from optimum_gblm import jobs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(jobs, "load_model", lambda *a, **k: pytest.fail("loaded before the device was checked"))
    assert main(["eval", "--model", str(model_dir), "--data", str(text_file), "--device", device]) == 2
    assert message in one_error_line(capsys.readouterr().err, "eval")


def hub_http_error():
    httpx2 = pytest.importorskip("httpx2")  # huggingface_hub's HTTP client
    from huggingface_hub.errors import RepositoryNotFoundError

    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/missing")
    return RepositoryNotFoundError(
        "404 Client Error.\n\nRepository Not Found for url: https://huggingface.co/api/models/org/missing.",
        response=httpx2.Response(404, request=request),
    )


def offline_error():
    from huggingface_hub.errors import OfflineModeIsEnabled

    return OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/models/org/m: offline mode is enabled.")


def safetensor_error():
    from safetensors import SafetensorError

    return SafetensorError("Error while deserializing header: HeaderTooLarge")


def entry_not_found():
    from huggingface_hub.errors import EntryNotFoundError  # an Exception, neither OSError nor ValueError

    return EntryNotFoundError("config.json is not in org/m")


@pytest.mark.parametrize(
    "make_error, expected",
    [
        (safetensor_error, "SafetensorError: Error while deserializing header: HeaderTooLarge"),
        (offline_error, "OfflineModeIsEnabled: Cannot reach https://huggingface.co/api/models/org/m: offline mode"),
        (hub_http_error, "RepositoryNotFoundError: 404 Client Error. Repository Not Found for url"),
        (entry_not_found, "EntryNotFoundError: config.json is not in org/m"),
        (lambda: ConnectionError("connection reset by peer"), "connection reset by peer"),
        (lambda: __import__("re").error("unterminated character set"), "unterminated character set"),
        (lambda: FloatingPointError("NaN in the gradients"), "NaN in the gradients"),
    ],
)
@pytest.mark.parametrize("command", ["eval", "prune"])
def test_library_errors_are_one_line(model_dir, text_file, tmp_path, monkeypatch, capsys, make_error, expected, command):
    from optimum_gblm import jobs

    error = make_error()

    def failing_load(*args, **kwargs):
        raise error

    monkeypatch.setattr(jobs, "load_model", failing_load)
    argv = (["eval", "--model", "org/m", "--data", str(text_file)] if command == "eval"
            else prune_args(model_dir, text_file, tmp_path / "pruned"))
    assert main(argv) == 2
    assert expected in one_error_line(capsys.readouterr().err, command)


def test_a_full_disk_is_one_line_with_its_fix(model_dir, text_file, tmp_path, monkeypatch, capsys):
    import errno

    from optimum_gblm import jobs

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "pruned"))

    monkeypatch.setattr(jobs, "save_pretrained_atomically", disk_full)
    assert main(prune_args(model_dir, text_file, tmp_path / "pruned", "--method", "wanda", "--eval-data", "none")) == 2
    line = one_error_line(capsys.readouterr().err, "prune")
    assert "[Errno 28] No space left on device" in line and "the disk is full" in line


def test_a_bug_is_not_hidden_as_a_user_error(model_dir, text_file, monkeypatch):
    from optimum_gblm import jobs

    def bug(*args, **kwargs):
        raise KeyError("a programming error")

    monkeypatch.setattr(jobs, "load_model", bug)
    with pytest.raises(KeyError):
        main(["eval", "--model", str(model_dir), "--data", str(text_file)])


# -- device map ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["eval", "prune"])
def test_device_map_reaches_from_pretrained(model_dir, text_file, tmp_path, monkeypatch, capsys, command):
    calls = []
    load = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs.get("device_map"))
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    argv = (["eval", "--model", str(model_dir), "--data", str(text_file), "--seqlen", "16"] if command == "eval"
            else prune_args(model_dir, text_file, tmp_path / "pruned", "--method", "wanda", "--eval-data", "none"))
    assert main([*argv, "--device-map", "cpu"]) == 0
    assert calls == ["cpu"]
    assert main([*argv, "--device-map", "auto", "--device", "cpu"]) == 2
    assert "not both" in one_error_line(capsys.readouterr().err, command)


def test_a_device_map_naming_an_unavailable_device_is_one_line(model_dir, text_file, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["eval", "--model", str(model_dir), "--data", str(text_file), "--device-map", "cuda:0"]) == 2
    assert "--device-map cuda:0" in one_error_line(capsys.readouterr().err, "eval")


def test_magnitude_reads_no_calibration_text_even_by_default(tokenizer):
    # The default dataset is the shipped novel; magnitude never reads it, so an impossible seqlen is no error.
    from conftest import tiny_model

    from optimum_gblm import GBLMConfig
    from optimum_gblm.jobs import prune_model

    model = prune_model(tiny_model("llama"), tokenizer, GBLMConfig(method="magnitude", seqlen=10**7))
    assert model.config.quantization_config.record.global_sparsity == 0.5
