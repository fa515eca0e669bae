"""`optimum-gblm prune | eval | push`: prune a causal LM and save it, measure a model's perplexity, or upload a
pruned checkpoint."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import re
import sys
from collections.abc import Sequence

from .flags import add_config_arguments, add_option_arguments, add_runtime_arguments, options_from_arguments
from .jobs import EvaluationArguments, ModelArguments, OutputArguments, PruneJob, load_job_model, prune_and_save

logger = logging.getLogger("optimum_gblm")

# Errors that are the user's to fix (bad input, numerics, disk, permissions, network), and any error of the libraries
# that read files and talk to the Hub (safetensors' SafetensorError, huggingface_hub's HfHubHTTPError and
# OfflineModeIsEnabled, their HTTP client's): one line and exit status 2, never a traceback.
USER_ERRORS = (ValueError, FloatingPointError, OSError, re.error)
USER_ERROR_LIBRARIES = ("safetensors", "huggingface_hub", "httpx", "httpx2", "requests", "urllib3")
OS_ERROR_FIXES = {
    errno.ENOSPC: "the disk is full: free space there, or write elsewhere (--output, --cache-dir, HF_HOME)",
    errno.EDQUOT: "the disk quota is used up: free space there, or write elsewhere (--output, --cache-dir, HF_HOME)",
    errno.EROFS: "the file system is read-only: write elsewhere (--output, --cache-dir, HF_HOME)",
}


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

    Every flag is generated (`optimum_gblm.flags`) from the fields that define it: the recipe (`GBLMConfig` and
    each registered method's options), the runtime settings (`PruningRuntime`) and the job's own model, evaluation
    and output options (`optimum_gblm.jobs`).
    """
    add_option_arguments(prune, ModelArguments, "model")
    add_config_arguments(prune)
    add_runtime_arguments(prune)
    add_option_arguments(prune, EvaluationArguments, "evaluation", EvaluationArguments.__doc__)
    add_option_arguments(prune, OutputArguments, "output")


def add_push_arguments(push: argparse.ArgumentParser) -> None:
    push.add_argument("folder", help="a pruned checkpoint folder written by `optimum-gblm prune` or save_pretrained")
    push.add_argument("repo_id", help="Hub repository, e.g. user/model-gblm-2of4")
    push.add_argument("--private", action="store_true", default=None)
    push.add_argument("--commit-message", default=None)
    push.add_argument("--revision", default=None, help="branch to push to")
    push.add_argument("--create-pr", action="store_true")
    push.add_argument("--keep-hub-card", action="store_true", help="do not replace the README.md on the Hub")


def add_eval_arguments(evaluate: argparse.ArgumentParser) -> None:
    add_option_arguments(evaluate, ModelArguments, "model", required=("model",))
    evaluate.add_argument("--data", required=True, help="text file, folder, or 'wikitext2' / 'c4' (test split)")
    evaluate.add_argument("--seqlen", type=int, default=2048, help="window length (reference: 2048)")
    evaluate.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")


def run_prune(args: argparse.Namespace) -> int:
    job = PruneJob.from_arguments(args)
    result = prune_and_save(job, overwrite_fix="pass --overwrite")
    for name, pruned in result.pruned_perplexity.items():
        print(f"{name}: dense {result.dense_perplexity[name]}; pruned {pruned}")
    if result.pushed_to:
        print(f"pushed {result.output_dir} to {result.pushed_to}: {getattr(result.commit, 'commit_url', result.commit)}")
    timings, sparsity, config = result.timings_seconds, result.global_sparsity, job.config
    print(
        f"pruned {job.model.model or 'SmolLM2-135M-Instruct'} with {config.method} ({config.pattern}, sparsity "
        f"{config.sparsity:g}): measured global sparsity {'-' if sparsity is None else f'{sparsity:.4f}'}; gradients "
        f"{timings.get('gradients', 0.0):.1f}s, prune {timings.get('prune', 0.0):.1f}s; saved to {result.output_dir}"
    )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from .data import get_evaluation_tokens, window_start_token
    from .evaluation import perplexity

    model, tokenizer = load_job_model(options_from_arguments(ModelArguments, args))  # the device is checked first
    tokens = get_evaluation_tokens(args.data, tokenizer)
    result = perplexity(
        model, tokens, seqlen=args.seqlen, max_tokens=args.max_tokens, start_token=window_start_token(tokenizer)
    )
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


def is_user_error(error: BaseException) -> bool:
    """Whether `error` is one the user fixes (see USER_ERRORS): reported in one line rather than as a traceback."""
    if isinstance(error, USER_ERRORS):
        return True
    return any(kind.__module__.split(".")[0] in USER_ERROR_LIBRARIES for kind in type(error).__mro__)


def error_line(command: str, error: BaseException) -> str:
    """`optimum-gblm <command>: error: <message>` on one line: a library's error is named by its type, a full or
    read-only disk gets its fix."""
    text = " ".join(str(error).split()) or "(no message)"
    if not isinstance(error, (ValueError, FloatingPointError)) and type(error).__module__ != "builtins":
        text = f"{type(error).__name__}: {text}"
    fix = OS_ERROR_FIXES.get(getattr(error, "errno", None))
    return f"optimum-gblm {command}: error: {text}" + (f" ({fix})" if fix else "")


def run_command(command: str, args: argparse.Namespace, verbose: bool = False) -> int:
    """Run `prune`, `eval` or `push` with parsed arguments; an error the user can fix is one line on stderr and exit
    status 2 (see `is_user_error`); anything else is a bug, shown with its traceback."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return {"prune": run_prune, "eval": run_eval, "push": run_push}[command](args)
    except Exception as error:
        if not is_user_error(error):
            raise
        print(error_line(command, error), file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.command, args, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
