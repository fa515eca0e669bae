"""Argument dataclasses shared by the example scripts (HfArgumentParser style, like transformers' run_clm.py).

Most are generated (optimum_gblm.flags) from the fields that define them, with the same help as `optimum-gblm
prune`: the recipe (GBLMConfig and every method's options), the runtime settings (PruningRuntime) and the job's model,
evaluation and output options (optimum_gblm.jobs). Names follow transformers where it has one
(`--model_name_or_path`, `--output_dir`, `--overwrite_output_dir`), and the CLI's spellings (`--model`, `--output`,
`--num-samples`) are accepted too; a JSON file uses the underscored names.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import transformers
from transformers import HfArgumentParser

import optimum_gblm  # noqa: F401  (registers every method before the arguments are generated)
from optimum_gblm.flags import arguments_dataclass, pruning_arguments_dataclass, runtime_arguments_dataclass
from optimum_gblm.jobs import EvaluationArguments, ModelArguments, OutputArguments

# `.to_options()` builds the jobs' ModelArguments (model, GGUF file, dtype, device or device map): load_job_model().
ModelArguments = arguments_dataclass(ModelArguments)
# `--eval_data` texts (default: the held-out end of the shipped text; `none` skips), `--eval_seqlen`, ...
EvaluationArguments = arguments_dataclass(EvaluationArguments)
# `--output_dir`, `--overwrite_output_dir`, `--push_to_hub REPO_ID`.
OutputArguments = arguments_dataclass(OutputArguments)
# `--num_samples` or `--num-samples`, `--sparsegpt_damping`, `--owl_threshold`, ...; `.to_config()` builds the recipe.
PruningArguments = pruning_arguments_dataclass()
# Cache folder and gradient checkpointing: how the run executes, not what it produces; `.to_runtime()`.
RuntimeArguments = runtime_arguments_dataclass()


@dataclass
class TaskArguments:
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
