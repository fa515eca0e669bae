import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import sample_text, tiny_model
from transformers import AutoModelForCausalLM, TrainingArguments

from optimum_gblm.evaluation import load_multiple_choice, multiple_choice_accuracy
from optimum_gblm.masks import check_nm
from optimum_gblm.structure import prunable_modules

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example_module(name):
    """Import a module of examples/ (they import each other as top-level modules)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))


def run(script, *args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture
def workspace(tmp_path, tokenizer):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "train.txt").write_text(sample_text(1500, seed=1))
    (tmp_path / "heldout.txt").write_text(sample_text(600, seed=2))
    return tmp_path


def zeros(model):
    return {n: m.weight == 0 for n, m in prunable_modules(model).items()}


def test_prune_then_finetune_then_eval(workspace):
    w = workspace
    run("run_prune.py", "--model_name_or_path", w / "base", "--calibration", w / "train.txt", "--pattern", "2:4",
        "--num_samples", 4, "--seqlen", 16, "--eval_data", w / "heldout.txt", "--eval_seqlen", 16,
        "--output_dir", w / "pruned", cwd=w)
    card = (w / "pruned" / "README.md").read_text()
    assert "## Recipe" in card and "heldout.txt" in card
    pruned = AutoModelForCausalLM.from_pretrained(w / "pruned")
    assert all(check_nm(~z, 2, 4) for z in zeros(pruned).values())

    run("run_sparse_finetune.py", "--model_name_or_path", w / "pruned", "--train_file", w / "train.txt",
        "--block_size", 16, "--eval_data", w / "heldout.txt", "--eval_seqlen", 16, "--output_dir", w / "tuned",
        "--max_steps", 3, "--learning_rate", 1e-2, "--per_device_train_batch_size", 2, "--report_to", "none",
        "--save_strategy", "no", "--use_cpu", "true", cwd=w)
    tuned = AutoModelForCausalLM.from_pretrained(w / "tuned")
    before, after = zeros(pruned), zeros(tuned)
    assert all(torch.equal(before[n], after[n]) for n in before), "fine-tuning must keep the sparsity exactly"
    changed = [not torch.equal(pruned.get_submodule(n).weight, tuned.get_submodule(n).weight) for n in before]
    assert all(changed)
    assert "after fine-tuning" in (w / "tuned" / "README.md").read_text()

    mc = w / "items.jsonl"
    mc.write_text("\n".join(json.dumps(i) for i in [
        {"context": "a single man", "choices": ["in possession", "of a wife"], "label": 0},
        {"context": "it is a truth", "choices": ["universally acknowledged", "must be"], "label": 0},
    ]) + "\n")
    run("run_eval.py", "--model_name_or_path", w / "tuned", "--eval_data", w / "heldout.txt", "--eval_seqlen", 16,
        "--multiple_choice_file", mc, "--output_dir", w / "eval", cwd=w)
    results = json.loads((w / "eval" / "eval_results.json").read_text())
    assert results["perplexity"][str(w / "heldout.txt")]["seqlen"] == 16
    assert results["multiple_choice"]["num_items"] == 2
    recorded = json.loads((w / "tuned" / "config.json").read_text())["quantization_config"]["record"]["evaluation"]
    assert any(e["data"] == str(w / "heldout.txt") for e in recorded)
    AutoModelForCausalLM.from_pretrained(w / "tuned")  # still a valid, verified checkpoint


def test_examples_take_a_json_config(workspace):
    w = workspace
    config = {"model_name_or_path": str(w / "base"), "dataset": str(w / "train.txt"), "method": "wanda",
              "sparsity": 0.5, "num_samples": 4, "seqlen": 16, "output_dir": str(w / "from-json")}
    (w / "prune.json").write_text(json.dumps(config))
    run("run_prune.py", w / "prune.json", cwd=w)
    entry = json.loads((w / "from-json" / "config.json").read_text())["quantization_config"]
    assert entry["method"] == "wanda" and entry["record"]["global_sparsity"] == 0.5

    tune = {"model_name_or_path": str(w / "base"), "dataset": str(w / "train.txt"), "pattern": "2:4",
            "num_samples": 4, "seqlen": 16, "block_size": 16, "output_dir": str(w / "tuned-json"), "max_steps": 2,
            "learning_rate": 0.01, "report_to": "none", "save_strategy": "no", "use_cpu": True}
    (w / "tune.json").write_text(json.dumps(tune))
    run("run_sparse_finetune.py", w / "tune.json", cwd=w)
    tuned = AutoModelForCausalLM.from_pretrained(w / "tuned-json")
    assert all(check_nm(~z, 2, 4) for z in zeros(tuned).values())


class UnigramLM(torch.nn.Module):
    """Predicts the same next-token distribution everywhere: log-likelihoods are hand-computable."""

    def __init__(self, logits):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor(logits))

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def test_multiple_choice_accuracy_matches_a_hand_computation(tmp_path, tokenizer):
    vocab = tokenizer.get_vocab()
    logits = [0.0] * 96
    # log-probs: "man" and "wife" likely, everything else equally unlikely
    logits[vocab["man"]] = 3.0
    logits[vocab["wife"]] = 2.0
    model = UnigramLM(logits)
    path = tmp_path / "three.jsonl"
    items = [
        {"context": "a single", "choices": ["man", "fortune"], "label": 0},          # man wins: right
        {"context": "in want of a", "choices": ["fortune", "wife"], "label": 0},     # wife wins: wrong
        {"context": "a good", "choices": ["wife", "man must"], "label": 0},          # wife (2) beats man+must: right
    ]
    path.write_text("\n".join(json.dumps(i) for i in items))
    result = multiple_choice_accuracy(model, tokenizer, load_multiple_choice(str(path)))
    assert result["acc"] == pytest.approx(2 / 3) and result["num_items"] == 3
    # hand check of the third item: log p(wife) vs log p(man) + log p(must)
    z = math.log(94 + math.exp(3) + math.exp(2))
    assert (2 - z) > (3 - z) + (0 - z)


@pytest.mark.parametrize("line, message", [
    ('{"context": "x", "choices": ["a"], "label": 0}', "at least 2"),
    ('{"context": "x", "choices": ["a", "b"], "label": 2}', "index of the right choice"),
    ("not json", "not valid JSON"),
])
def test_bad_multiple_choice_files(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        load_multiple_choice(str(path))


def test_local_scorer_agrees_with_lm_evaluation_harness(tokenizer):
    """Where lm-eval is installed, its log-likelihood of a choice equals ours: the offline path scores the same way."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from optimum_gblm.evaluation import choice_log_likelihood

    model = tiny_model("llama")
    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    pairs = [("a single", " man"), ("it is a truth universally", " acknowledged that"), ("of a", " wife")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    theirs = [value for value, _ in harness.loglikelihood(requests)]
    ours = [choice_log_likelihood(model, tokenizer, context, continuation) for context, continuation in pairs]
    assert ours == pytest.approx(theirs, abs=1e-4)


EXAMPLE_JOB_ARGUMENTS = ("ModelArguments", "PruningArguments", "RuntimeArguments", "EvaluationArguments", "OutputArguments")


def test_examples_take_every_prune_flag_under_its_cli_spelling_too():
    """One definition per option: the examples' arguments are generated from the same fields as `optimum-gblm
    prune`'s flags (recipe, runtime and the job's model / evaluation / output options), so every CLI flag has an
    example argument that also accepts the CLI's spelling, and the same command line gives the same job."""
    from transformers import HfArgumentParser

    from optimum_gblm import flags
    from optimum_gblm.cli import build_parser
    from optimum_gblm.jobs import EvaluationArguments, ModelArguments, OutputArguments, PruneJob

    arguments = example_module("arguments")
    classes = [getattr(arguments, name) for name in EXAMPLE_JOB_ARGUMENTS]
    prune = build_parser()._subparsers._group_actions[0].choices["prune"]
    cli = {a.dest for a in prune._actions} - {"help"}
    generated = flags.all_flags() + [f for c in (ModelArguments, EvaluationArguments, OutputArguments) for f in flags.option_flags(c)]
    assert {f.dest for f in generated} == cli
    example_fields = {f.name for c in classes for f in dataclasses.fields(c)}
    assert example_fields == {f.example_dest for f in generated}
    assert {"model_name_or_path", "output_dir", "overwrite_output_dir", "eval_data", "dtype", "device_map"} <= example_fields

    hf = HfArgumentParser(classes)
    spellings = {s for a in hf._actions for s in a.option_strings}
    for action in prune._actions:
        if action.dest in cli and action.dest != "use_cache":  # the CLI's --no-cache is --no_use_cache there
            assert set(action.option_strings) <= spellings, action.option_strings

    argv = ["--model", "org/m", "--gguf-file", "m.gguf", "--dtype", "bfloat16", "--device-map", "auto",
            "--trust-remote-code", "--method", "sparsegpt", "--sparsegpt-blocksize", "32", "--num-samples", "8",
            "--calibration", "c4", "--gradient-checkpointing", "--eval-data", "a.txt", "b.txt", "--eval-seqlen", "128",
            "--output", "out", "--overwrite", "--push-to-hub", "me/m-2of4"]
    from_cli = PruneJob.from_arguments(build_parser().parse_args(["prune", *argv]))
    from_examples = PruneJob.from_arguments(*hf.parse_args_into_dataclasses(argv))
    assert from_examples == from_cli
    assert from_cli.model == ModelArguments("org/m", "m.gguf", "bfloat16", None, "auto", True)
    assert from_cli.output == OutputArguments("out", True, "me/m-2of4")
    assert from_cli.evaluation == EvaluationArguments(["a.txt", "b.txt"], 128)
    assert from_cli.config.method_options["blocksize"] == 32 and from_cli.runtime.gradient_checkpointing

    # The fine-tuning script also parses TrainingArguments: its seed (and gradient checkpointing) are the ones used.
    finetune = example_module("run_sparse_finetune")
    assert "seed" not in {f.name for f in dataclasses.fields(finetune.PruningArguments)}
    assert {f.name for f in dataclasses.fields(finetune.OverwriteArguments)} == {"overwrite_output_dir"}
    HfArgumentParser((arguments.ModelArguments, finetune.TrainingDataArguments, arguments.EvaluationArguments,
                      finetune.PruningArguments, finetune.RuntimeArguments, finetune.OverwriteArguments,
                      TrainingArguments))  # no clashing flags
