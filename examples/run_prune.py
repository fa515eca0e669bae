"""Prune a causal LM with GBLM (or Wanda, SparseGPT, magnitude...), measure perplexity before and after, save it
with its model card, optionally push it. The same flow as `optimum-gblm prune` (optimum_gblm.jobs.prune_and_save),
with the same recipe options (`--num_samples` or `--num-samples`, `--sparsegpt_damping`, `--owl_threshold`, ...).

    python examples/run_prune.py --pattern 2:4 --num_samples 32 --seqlen 512 --output_dir smollm2-gblm-2of4
    python examples/run_prune.py prune_config.json
"""

import logging

from arguments import (
    DataArguments,
    ModelArguments,
    OutputArguments,
    PruningArguments,
    RuntimeArguments,
    parse,
    setup_logging,
)

from optimum_gblm.jobs import prune_and_save

logger = logging.getLogger("run_prune")


def main() -> None:
    model_args, data_args, pruning_args, runtime_args, output_args = parse(
        ModelArguments, DataArguments, PruningArguments, RuntimeArguments, OutputArguments
    )
    setup_logging()
    result = prune_and_save(
        model_args.model_name_or_path,
        pruning_args.to_config(),
        output_args.output_dir,
        runtime=runtime_args.to_runtime(),
        gguf_file=model_args.gguf_file,
        dtype=model_args.dtype,
        eval_data=data_args.eval_data,
        eval_seqlen=data_args.eval_seqlen,
        eval_max_tokens=data_args.eval_max_tokens,
        overwrite=output_args.overwrite_output_dir,
        push_to_hub=output_args.hub_repo_id(),
        trust_remote_code=model_args.trust_remote_code,
        overwrite_fix="pass --overwrite_output_dir",
    )
    logger.info("global sparsity %.4f; saved to %s (model card: README.md)", result.global_sparsity, result.output_dir)


if __name__ == "__main__":
    main()
