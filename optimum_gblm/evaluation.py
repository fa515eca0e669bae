"""Perplexity with the reference protocol: the text tokenized once, cut into non-overlapping windows of `seqlen`
tokens (the remainder dropped), perplexity = exp(mean token NLL over all windows)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    perplexity: float
    seqlen: int
    num_windows: int
    num_tokens: int  # tokens in the windows evaluated (windows x seqlen)

    def __str__(self) -> str:
        return f"ppl {self.perplexity:.3f} (seqlen {self.seqlen}, {self.num_windows} windows, {self.num_tokens} tokens)"

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    seqlen: int = 2048,
    max_tokens: int | None = None,
    show_progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `model` on 1-D `token_ids` in non-overlapping windows of `seqlen` (at most `max_tokens`)."""
    token_ids = token_ids.reshape(-1)
    if max_tokens is not None:
        token_ids = token_ids[:max_tokens]
    num_windows = token_ids.numel() // seqlen
    if num_windows == 0:
        raise ValueError(
            f"evaluation text is too short: found {token_ids.numel()} tokens, need at least {seqlen} for one window; "
            f"use more text or a smaller seqlen."
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_predicted = 0.0, 0
    try:
        for w in tqdm(range(num_windows), desc=f"Perplexity (seqlen {seqlen})", disable=not show_progress):
            window = token_ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0).to(device)
            logits = model(input_ids=window, use_cache=False).logits.float()
            nll = nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
            total_nll += nll.item()
            total_predicted += seqlen - 1
    finally:
        model.train(was_training)
    return PerplexityResult(math.exp(total_nll / total_predicted), seqlen, num_windows, num_windows * seqlen)


def record_evaluation(
    model: nn.Module, data: str, result: PerplexityResult, dense: PerplexityResult | None = None
) -> None:
    """Store a perplexity measurement (and the dense one before pruning, if given) in the pruned model's config,
    so that `save_pretrained` puts it in config.json and the model card."""
    from .config import GBLMConfig

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
    kept = [e for e in (config.evaluation or []) if (e["data"], e["seqlen"]) != (data, result.seqlen)]
    config.evaluation = kept + [entry]
