"""Fine-tune a pruned causal LM with transformers' Trainer while every pruned weight stays exactly zero.

Given a dense model it prunes it first (PruningArguments); given a checkpoint pruned by optimum-gblm it loads its
masks. Perplexity is measured before and after on texts other than the training text.

    python examples/run_sparse_finetune.py --pattern 2:4 --num_samples 32 --seqlen 512 \
        --eval_data ../shared/data/austen_northangerabbey.txt --eval_seqlen 512 --eval_max_tokens 16384 \
        --output_dir smollm2-gblm-2of4-tuned --max_steps 40 --per_device_train_batch_size 4 --learning_rate 5e-5
    python examples/run_sparse_finetune.py finetune_config.json

The recipe options are those of `optimum-gblm prune`, except two that TrainingArguments also defines: its `--seed`
seeds the calibration windows too, and its `--gradient_checkpointing` also applies to the gradient stage of pruning.
The gradient cache is always used here (TrainingArguments' `--use_cache` is the model's KV cache, another thing);
`--cache_dir` chooses its folder.
"""

import logging
import time
from dataclasses import dataclass, field

import torch
from arguments import EvaluationArguments, ModelArguments, parse, setup_logging
from transformers import Trainer, TrainingArguments

from optimum_gblm import SparsityCallback, record_evaluation
from optimum_gblm.checkpoint import check_output_dir
from optimum_gblm.data import load_text, tokenize
from optimum_gblm.flags import arguments_dataclass, pruning_arguments_dataclass, runtime_arguments_dataclass
from optimum_gblm.jobs import (
    OutputArguments,
    evaluation_texts,
    is_shipped_text,
    load_job_model,
    measure,
    prune_model,
    split_shipped_text,
)
from optimum_gblm.quantizer import GBLMHfQuantizer
from optimum_gblm.sparse_state import check_weights_match_masks

logger = logging.getLogger("run_sparse_finetune")

# TrainingArguments owns --seed (used for the calibration windows too), --gradient_checkpointing / --use_cache,
# --output_dir and --push_to_hub / --hub_model_id.
PruningArguments = pruning_arguments_dataclass(exclude=("seed",))
RuntimeArguments = runtime_arguments_dataclass(exclude=("gradient_checkpointing", "use_cache"))
OverwriteArguments = arguments_dataclass(OutputArguments, exclude=("output", "push_to_hub"), name="OverwriteArguments")


@dataclass
class TrainingDataArguments:
    train_file: str | None = field(
        default=None,
        metadata={"help": "fine-tuning text file/folder (default: the calibration text; the shipped one without its "
                          "held-out end)"},
    )
    block_size: int = field(default=512, metadata={"help": "fine-tuning sequence length"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use at most this many training blocks"})


def training_tokens(train_file, calibration, tokenizer) -> torch.Tensor:
    """The fine-tuning text's tokens: `--train_file`, else the calibration text (the shipped one without the end that
    is held out for evaluation)."""
    if train_file is None and is_shipped_text(calibration):
        return split_shipped_text(tokenizer)[0]
    return tokenize(load_text(train_file or calibration), tokenizer)


class Blocks(torch.utils.data.Dataset):
    """Consecutive blocks of `block_size` tokens (run_clm's group_texts), labels = inputs."""

    def __init__(self, token_ids: torch.Tensor, block_size: int, limit: int | None):
        count = token_ids.numel() // block_size
        if count == 0:
            raise ValueError(f"training text has {token_ids.numel()} tokens, fewer than one block of {block_size}.")
        self.blocks = token_ids[: count * block_size].reshape(count, block_size)[:limit]

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def main() -> None:
    model_args, data_args, eval_args, pruning_args, runtime_args, overwrite, training_args = parse(
        ModelArguments, TrainingDataArguments, EvaluationArguments, PruningArguments, RuntimeArguments,
        OverwriteArguments, TrainingArguments,
    )
    setup_logging()
    output = overwrite.to_options(output=training_args.output_dir)
    check_output_dir(output.output, output.overwrite, fix="pass --overwrite_output_dir")
    config = pruning_args.to_config(seed=training_args.seed)
    model, tokenizer = load_job_model(model_args.to_options())
    if not isinstance(getattr(model, "hf_quantizer", None), GBLMHfQuantizer):
        logger.info("model is dense: pruning it first (%s, %s)", config.method, config.pattern)
        runtime = runtime_args.to_runtime(gradient_checkpointing=training_args.gradient_checkpointing)
        prune_model(model, tokenizer, config, runtime)

    evaluation = eval_args.to_options()
    texts = evaluation_texts(evaluation, tokenizer)
    before = measure(model, texts, evaluation)

    train = Blocks(
        training_tokens(data_args.train_file, config.dataset, tokenizer), data_args.block_size, data_args.max_train_samples
    )
    push, training_args.push_to_hub = training_args.push_to_hub, False  # Trainer's push would replace our card
    trainer = Trainer(model=model, args=training_args, train_dataset=train, callbacks=[SparsityCallback()])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start

    # Every weight its mask prunes must still be exactly zero (kept weights may move, even through zero).
    check_weights_match_masks(model, model.hf_quantizer)
    exact = True
    for name, after in measure(model, texts, evaluation).items():
        record_evaluation(model, f"{name} (after fine-tuning)", after)
        logger.info("%s: pruned %s -> fine-tuned %s", name, before[name], after)
    logger.info(
        "fine-tuned %d steps on %d blocks of %d tokens in %.0fs; sparsity exact: %s (global %.4f)",
        trainer.state.global_step, len(train), data_args.block_size, seconds, exact,
        model.config.quantization_config.record.global_sparsity,
    )
    trainer.save_model(training_args.output_dir)  # weights, config, masks and model card
    tokenizer.save_pretrained(training_args.output_dir)
    if push:
        model.push_to_hub(training_args.hub_model_id or training_args.output_dir, tokenizer=tokenizer)


if __name__ == "__main__":
    main()
