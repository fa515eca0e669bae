"""Perplexity with the reference protocol: the text tokenized once, cut into non-overlapping windows of `seqlen`
tokens (the remainder dropped), perplexity = exp(mean token NLL over all windows).

A badly broken model (e.g. pruned too hard) can have a mean NLL above ~709.8, where exp overflows a float: its
perplexity is reported as inf (the mean NLL stays in the result, to compare broken models); NaN logits raise a
ValueError, since no number describes them and silently recording NaN would hide the breakage.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import strip_start_token, window_at


@dataclass
class PerplexityResult:
    perplexity: float
    seqlen: int
    num_windows: int
    num_tokens: int  # tokens in the windows evaluated (windows x seqlen)
    mean_nll: float = math.nan  # mean token negative log-likelihood (nats); perplexity = exp(mean_nll)

    def __str__(self) -> str:
        # An overflowed perplexity says nothing alone: the mean NLL still ranks broken models.
        nll = f", mean NLL {self.mean_nll:.1f}" if math.isinf(self.perplexity) else ""
        return f"ppl {self.perplexity:.3f} (seqlen {self.seqlen}, {self.num_windows} windows, {self.num_tokens} tokens{nll})"

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    seqlen: int = 2048,
    max_tokens: int | None = None,
    show_progress: bool = True,
    start_token: int | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on 1-D `token_ids` in non-overlapping windows of `seqlen` (at most `max_tokens`).

    With `start_token` (the BOS id when the tokenizer starts every text with one: `data.window_start_token`) each
    window is that token and then the next `seqlen - 1` text tokens, as the model saw texts in training; the same
    `seqlen - 1` predictions per window are scored either way.
    """
    token_ids = strip_start_token(token_ids.reshape(-1), start_token)
    if max_tokens is not None:
        token_ids = token_ids[:max_tokens]
    width = seqlen - (start_token is not None)
    num_windows = token_ids.numel() // width
    if num_windows == 0:
        raise ValueError(
            f"evaluation text is too short: found {token_ids.numel()} tokens, need at least {width} for one window; "
            f"use more text or a smaller seqlen."
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_predicted = 0.0, 0
    try:
        for w in tqdm(range(num_windows), desc=f"Perplexity (seqlen {seqlen})", disable=not show_progress):
            window = window_at(token_ids, w * width, seqlen, start_token).unsqueeze(0).to(device)
            logits = model(input_ids=window, use_cache=False).logits.float()
            nll = nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum").item()
            if math.isnan(nll):
                raise ValueError(
                    f"the model is broken: it gives NaN logits on evaluation window {w} (tokens {w * width}.."
                    f"{(w + 1) * width}), so no perplexity exists. Check its weights for NaN/inf, or load it in "
                    f"float32 if float16 overflows."
                )
            total_nll += nll
            total_predicted += seqlen - 1
    finally:
        model.train(was_training)
    mean_nll = total_nll / total_predicted
    return PerplexityResult(perplexity_of(mean_nll), seqlen, num_windows, num_windows * seqlen, mean_nll)


def perplexity_of(mean_nll: float) -> float:
    """exp(mean NLL), inf where that overflows a float (a mean NLL above ~709.8 nats) instead of raising."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


def record_evaluation(
    model: nn.Module, data: str, result: PerplexityResult, dense: PerplexityResult | None = None
) -> None:
    """Store a perplexity measurement (and the dense one before pruning, if given) in the pruned model's config,
    so that `save_pretrained` puts it in config.json and the model card."""
    from .config import GBLMConfig
    from .record import PruningRecord

    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if not isinstance(config, GBLMConfig):
        raise ValueError("record_evaluation needs a model pruned by optimum-gblm; prune it first.")
    if dense is not None and (dense.seqlen, dense.num_tokens) != (result.seqlen, result.num_tokens):
        raise ValueError("dense and pruned perplexity must use the same protocol (seqlen and tokens) to be compared.")
    entry = {
        "data": data,
        "seqlen": result.seqlen,
        "num_tokens": result.num_tokens,
        "dense_perplexity": None if dense is None else round(dense.perplexity, 6),
        "perplexity": round(result.perplexity, 6),
    }
    if config.record is None:
        config.record = PruningRecord()
    config.record.record_evaluation(entry)


# -- zero-shot multiple choice ----------------------------------------------------------------------------------
def load_multiple_choice(path: str) -> list[dict]:
    """Items from a JSON-lines file, one `{"context": str, "choices": [str, ...], "label": int}` per line."""
    import json

    items = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error}).") from None
            choices, label = item.get("choices"), item.get("label")
            if not isinstance(item.get("context"), str) or not isinstance(choices, list) or len(choices) < 2:
                raise ValueError(f"{path}:{number}: need 'context' (text) and 'choices' (a list of at least 2 texts).")
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
                raise ValueError(f"{path}:{number}: 'label' must be the index of the right choice, 0..{len(choices) - 1}.")
            items.append(item)
    if not items:
        raise ValueError(f"{path} holds no multiple-choice items.")
    return items


@torch.no_grad()
def choice_log_likelihood(model: nn.Module, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), the way lm-evaluation-harness scores a choice."""
    context_ids = tokenizer(context)["input_ids"]
    continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not continuation_ids:
        raise ValueError(f"choice {continuation!r} tokenizes to nothing.")
    device = next(model.parameters()).device
    ids = torch.tensor([context_ids + continuation_ids], device=device)
    logits = model(input_ids=ids).logits[0].float()
    log_probs = torch.log_softmax(logits[len(context_ids) - 1 : -1], dim=-1)
    targets = torch.tensor(continuation_ids, device=device)
    return log_probs.gather(1, targets[:, None]).sum().item()


def multiple_choice_accuracy(model: nn.Module, tokenizer, items: list[dict], delimiter: str = " ") -> dict:
    """acc (highest log-likelihood choice) and acc_norm (log-likelihood per character), as lm-eval reports them."""
    was_training = model.training
    model.eval()
    correct = correct_norm = 0
    try:
        for item in items:
            scores = [choice_log_likelihood(model, tokenizer, item["context"], delimiter + c) for c in item["choices"]]
            normalized = [s / max(1, len(delimiter + c)) for s, c in zip(scores, item["choices"])]
            correct += int(max(range(len(scores)), key=scores.__getitem__) == item["label"])
            correct_norm += int(max(range(len(normalized)), key=normalized.__getitem__) == item["label"])
    finally:
        model.train(was_training)
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "num_items": len(items)}


def zero_shot(model: nn.Module, tokenizer, tasks: list[str], num_fewshot: int = 0, limit: int | None = None, batch_size: int = 1) -> dict:
    """lm-evaluation-harness tasks (e.g. boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ValueError("zero-shot tasks need lm-evaluation-harness: pip install 'optimum-gblm[eval]'.") from None
    results = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
    )
    return results["results"]
