"""Prune a causal LM with GBLM (or Wanda, SparseGPT, magnitude...), measure perplexity before and after, save it
with its model card, optionally push it. The same flow as `optimum-gblm prune` (optimum_gblm.jobs.prune_and_save),
with the same options (`--num_samples` or `--num-samples`, `--sparsegpt_damping`, `--owl_threshold`, `--dtype`,
`--device_map`, ...). Without `--eval_data` the perplexity is measured on the held-out end of the shipped text.

    python examples/run_prune.py --pattern 2:4 --num_samples 32 --seqlen 512 --output_dir smollm2-gblm-2of4
    python examples/run_prune.py prune_config.json
"""

import logging

from arguments import (
    EvaluationArguments,
    ModelArguments,
    OutputArguments,
    PruningArguments,
    RuntimeArguments,
    parse,
    setup_logging,
)

from optimum_gblm.jobs import PruneJob, prune_and_save

logger = logging.getLogger("run_prune")


def main() -> None:
    arguments = parse(ModelArguments, PruningArguments, RuntimeArguments, EvaluationArguments, OutputArguments)
    setup_logging()
    result = prune_and_save(PruneJob.from_arguments(*arguments), overwrite_fix="pass --overwrite_output_dir")
    logger.info("global sparsity %.4f; saved to %s (model card: README.md)", result.global_sparsity, result.output_dir)


if __name__ == "__main__":
    main()
