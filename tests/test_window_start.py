"""Windows start the way the tokenizer starts a text: BOS first for tokenizers that add one (Gemma, Llama 2/3),
nothing for those that add none (SmolLM2). Calibration and perplexity follow the same rule."""

import math

import pytest
import torch
from conftest import WORDS, sample_text, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from optimum_gblm import get_calibration_data, perplexity
from optimum_gblm.data import random_windows, tokenize, window_start_token


def word_tokenizer(adds_bos: bool) -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]")


def test_the_start_token_is_the_bos_only_when_the_tokenizer_adds_it():
    assert window_start_token(word_tokenizer(adds_bos=True)) == 1
    assert window_start_token(word_tokenizer(adds_bos=False)) is None
    assert window_start_token(None) is None


def test_calibration_windows_open_with_bos_and_then_hold_contiguous_text(tmp_path):
    tokenizer = word_tokenizer(adds_bos=True)
    text = sample_text(600)
    (tmp_path / "calibration.txt").write_text(text)
    windows = get_calibration_data(str(tmp_path / "calibration.txt"), tokenizer, num_samples=5, seqlen=32, seed=3)
    stream = tokenize(text, tokenizer)[1:]  # the text's tokens without the one leading BOS
    assert windows.shape == (5, 32) and windows.dtype == torch.long
    for window in windows:
        assert int(window[0]) == 1 and 1 not in window[1:].tolist()
        body = window[1:]
        starts = [s for s in range(stream.numel() - 30) if torch.equal(stream[s : s + 31], body)]
        assert starts, "the 31 tokens after BOS are one contiguous stretch of the text"


def test_without_a_bos_convention_windows_are_unchanged(tmp_path):
    tokenizer = word_tokenizer(adds_bos=False)
    text = sample_text(600)
    (tmp_path / "calibration.txt").write_text(text)
    windows = get_calibration_data(str(tmp_path / "calibration.txt"), tokenizer, 5, 32, seed=3)
    stream = tokenize(text, tokenizer)
    assert torch.equal(windows, torch.stack([stream[s : s + 32] for s in _reference_starts(stream.numel(), 5, 32, 3)]))


def _reference_starts(total: int, num_samples: int, seqlen: int, seed: int) -> list[int]:
    # The reference's wikitext2 loader: random.Random(seed).randint(0, total - seqlen - 1) per sample.
    import random

    rng = random.Random(seed)
    return [rng.randint(0, total - seqlen - 1) for _ in range(num_samples)]


def test_perplexity_with_a_start_token_scores_the_text_tokens_after_bos():
    model = tiny_model("llama")
    tokens = torch.cat([torch.tensor([1]), torch.randint(3, 96, (50,), generator=torch.Generator().manual_seed(0))])
    result = perplexity(model, tokens, seqlen=16, show_progress=False, start_token=1)
    text = tokens[1:]  # the leading BOS is the text's own, not a token to score
    assert result.num_windows == 50 // 15
    nll = 0.0
    with torch.no_grad():
        for w in range(result.num_windows):
            window = torch.cat([torch.tensor([1]), text[w * 15 : (w + 1) * 15]])
            logp = torch.log_softmax(model(input_ids=window[None]).logits[0, :-1], -1)
            nll -= logp.gather(1, window[1:, None]).sum().item()
    assert result.perplexity == pytest.approx(math.exp(nll / (15 * result.num_windows)), rel=1e-5)
    # the protocol matters: the same tokens without BOS windows give another number
    assert perplexity(model, tokens, seqlen=16, show_progress=False).perplexity != pytest.approx(result.perplexity)


def test_too_short_text_names_the_window_it_needs():
    with pytest.raises(ValueError, match="found 17 tokens, need at least 18 for one window of 18"):
        random_windows(torch.arange(3, 20), 1, 18, seed=0, start_token=1)
