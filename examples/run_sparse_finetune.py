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

import torch
from arguments import DataArguments, ModelArguments, OverwriteArguments, load, parse, setup_logging
from transformers import Trainer, TrainingArguments

from optimum_gblm import GBLMPruner, SparsityCallback, get_evaluation_tokens, perplexity, record_evaluation
from optimum_gblm.checkpoint import check_output_dir
from optimum_gblm.data import default_calibration_path, load_text, tokenize
from optimum_gblm.options import pruning_arguments_dataclass, runtime_arguments_dataclass
from optimum_gblm.sparse_state import GBLMHfQuantizer, check_weights_match_masks

logger = logging.getLogger("run_sparse_finetune")

# TrainingArguments owns --seed (used for the calibration windows too) and --gradient_checkpointing / --use_cache.
PruningArguments = pruning_arguments_dataclass(exclude=("seed",))
RuntimeArguments = runtime_arguments_dataclass(exclude=("gradient_checkpointing", "use_cache"))


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
    model_args, data_args, pruning_args, runtime_args, overwrite, training_args = parse(
        ModelArguments, DataArguments, PruningArguments, RuntimeArguments, OverwriteArguments, TrainingArguments
    )
    setup_logging()
    check_output_dir(training_args.output_dir, overwrite.overwrite_output_dir, fix="pass --overwrite_output_dir")
    config = pruning_args.to_config(seed=training_args.seed)
    model, tokenizer = load(model_args)
    calibration = config.dataset or str(default_calibration_path())
    if not isinstance(getattr(model, "hf_quantizer", None), GBLMHfQuantizer):
        logger.info("model is dense: pruning it first (%s, %s)", config.method, config.pattern)
        runtime = runtime_args.to_runtime(gradient_checkpointing=training_args.gradient_checkpointing)
        pruner = GBLMPruner(
            config,
            cache_dir=runtime.cache_dir,
            use_cache=runtime.use_cache,
            show_progress=runtime.show_progress,
            gradient_checkpointing=runtime.gradient_checkpointing,
        )
        pruner.prune(model, calibration, tokenizer=tokenizer)

    texts = {name: get_evaluation_tokens(name, tokenizer) for name in data_args.eval_data}
    before = {n: perplexity(model, t, data_args.eval_seqlen, data_args.eval_max_tokens) for n, t in texts.items()}

    train = Blocks(
        tokenize(load_text(data_args.train_file or calibration), tokenizer), data_args.block_size, data_args.max_train_samples
    )
    push, training_args.push_to_hub = training_args.push_to_hub, False  # Trainer's push would replace our card
    trainer = Trainer(model=model, args=training_args, train_dataset=train, callbacks=[SparsityCallback()])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start

    # Every weight its mask prunes must still be exactly zero (kept weights may move, even through zero).
    check_weights_match_masks(model, model.hf_quantizer)
    exact = True
    for name, tokens in texts.items():
        after = perplexity(model, tokens, data_args.eval_seqlen, data_args.eval_max_tokens)
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
