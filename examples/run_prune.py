"""Prune a causal LM with GBLM (or Wanda / magnitude), measure perplexity before and after, save it with its
model card, optionally push it.

    python examples/run_prune.py --pattern 2:4 --num_samples 32 --seqlen 512 --output_dir smollm2-gblm-2of4
    python examples/run_prune.py prune_config.json
"""

import logging

from arguments import DataArguments, ModelArguments, OutputArguments, PruningArguments, load, parse, setup_logging

from optimum_gblm import GBLMPruner, get_evaluation_tokens, perplexity, record_evaluation
from optimum_gblm.data import default_calibration_path
from optimum_gblm.integration import check_output_dir, save_pretrained_atomically

logger = logging.getLogger("run_prune")


def main() -> None:
    model_args, data_args, pruning_args, output_args = parse(ModelArguments, DataArguments, PruningArguments, OutputArguments)
    setup_logging()
    check_output_dir(output_args.output_dir, output_args.overwrite_output_dir, fix="pass --overwrite_output_dir")
    calibration = data_args.calibration or str(default_calibration_path())
    config = pruning_args.to_config(dataset=calibration)
    model, tokenizer = load(model_args)
    texts = {name: get_evaluation_tokens(name, tokenizer) for name in data_args.eval_data}
    dense = {n: perplexity(model, t, data_args.eval_seqlen, data_args.eval_max_tokens) for n, t in texts.items()}

    pruner = GBLMPruner(config)
    pruner.prune(model, calibration, tokenizer=tokenizer)
    logger.info("global sparsity %.4f", model.config.quantization_config.global_sparsity)
    for name, tokens in texts.items():
        result = perplexity(model, tokens, data_args.eval_seqlen, data_args.eval_max_tokens)
        record_evaluation(model, name, result, dense[name])
        logger.info("%s: dense %s -> pruned %s", name, dense[name], result)

    # save_pretrained writes weights, config.json, the masks and the model card
    save_pretrained_atomically(model, output_args.output_dir, tokenizer=tokenizer, overwrite=True)
    logger.info("saved to %s (model card: %s/README.md)", output_args.output_dir, output_args.output_dir)
    if output_args.push_to_hub:
        model.push_to_hub(output_args.hub_model_id or output_args.output_dir, tokenizer=tokenizer)


if __name__ == "__main__":
    main()
