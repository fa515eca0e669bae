"""Evaluate a (pruned) causal LM: perplexity on texts, zero-shot accuracy through lm-evaluation-harness task names
when lm-eval is installed, and a local multiple-choice file scored the same way. Results go to a JSON file and, for
a checkpoint pruned by optimum-gblm, into its config.json and model card.

    python examples/run_eval.py --model_name_or_path smollm2-gblm-2of4 --eval_data wikitext2 --eval_seqlen 2048 \
        --tasks boolq rte hellaswag --multiple_choice_file items.jsonl --output_dir eval-results
    python examples/run_eval.py eval_config.json

Without `--eval_data` the perplexity is measured on the held-out end of the shipped text, as `optimum-gblm prune`
does by default; `--eval_data none` skips it.
"""

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from arguments import EvaluationArguments, ModelArguments, TaskArguments, parse, setup_logging

from optimum_gblm import record_evaluation
from optimum_gblm.card import CARD_FILE, build_model_card
from optimum_gblm.evaluation import load_multiple_choice, multiple_choice_accuracy, zero_shot
from optimum_gblm.files import write_atomically
from optimum_gblm.jobs import evaluation_texts, load_job_model, measure
from optimum_gblm.quantizer import GBLMHfQuantizer

logger = logging.getLogger("run_eval")


@dataclass
class ResultArguments:
    output_dir: str = field(metadata={"help": "folder for eval_results.json"})
    push_to_hub: str | None = field(
        default=None, metadata={"help": "also upload the pruned checkpoint, results recorded, to this Hub repository"}
    )


def main() -> None:
    model_args, eval_args, task_args, result_args = parse(ModelArguments, EvaluationArguments, TaskArguments, ResultArguments)
    setup_logging()
    model_options, evaluation = model_args.to_options(), eval_args.to_options()
    model, tokenizer = load_job_model(model_options)
    results: dict = {"model": model_options.model or "SmolLM2-135M-Instruct", "perplexity": {}}
    pruned = isinstance(getattr(model, "hf_quantizer", None), GBLMHfQuantizer)
    for name, result in measure(model, evaluation_texts(evaluation, tokenizer), evaluation).items():
        results["perplexity"][name] = result.to_dict()
        logger.info("%s: %s", name, result)
        if pruned:
            record_evaluation(model, name, result)
    if task_args.multiple_choice_file:
        items = load_multiple_choice(task_args.multiple_choice_file)
        results["multiple_choice"] = multiple_choice_accuracy(model, tokenizer, items)
        logger.info("%s: %s", task_args.multiple_choice_file, results["multiple_choice"])
    if task_args.tasks:
        results["zero_shot"] = zero_shot(model, tokenizer, task_args.tasks, task_args.num_fewshot, task_args.limit)

    out = Path(result_args.output_dir)
    # Each file is written whole, then renamed into place: a reader never sees half of it.
    text = json.dumps(results, indent=2) + "\n"
    write_atomically(out / "eval_results.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), suffix=".json")
    print(text, end="")
    folder = model_options.model
    if pruned and task_args.write_model_card and folder and os.path.isdir(folder):
        # Only the record changes: config.json and README.md, each replaced atomically.
        model_config = model.config.to_json_string()
        write_atomically(Path(folder) / "config.json", lambda tmp: Path(tmp).write_text(model_config, encoding="utf-8"))
        card = build_model_card(model.config.quantization_config, model.config.to_dict())
        write_atomically(Path(folder) / CARD_FILE, lambda tmp: card.save(tmp), suffix=".md")
        logger.info("results recorded in %s/config.json and its model card", folder)
    if result_args.push_to_hub and pruned:
        model.push_to_hub(result_args.push_to_hub, tokenizer=tokenizer)


if __name__ == "__main__":
    main()
