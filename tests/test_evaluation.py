import math

import pytest
import torch
from conftest import tiny_model

from optimum_gblm import perplexity


def test_perplexity_is_exp_of_mean_token_nll_over_whole_windows():
    model = tiny_model("llama")
    tokens = torch.randint(0, 96, (50,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, tokens, seqlen=16, show_progress=False)
    assert (result.num_windows, result.num_tokens, result.seqlen) == (3, 48, 16)  # the last 2 tokens are dropped
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(3):
            window = tokens[w * 16 : (w + 1) * 16]
            logp = torch.log_softmax(model(input_ids=window[None]).logits[0, :-1], -1)
            nll -= logp.gather(1, window[1:, None]).sum().item()
            count += 15
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert "seqlen 16" in str(result) and "48 tokens" in str(result)


def test_max_tokens_and_too_short_text():
    model = tiny_model("llama")
    tokens = torch.randint(0, 96, (64,))
    assert perplexity(model, tokens, seqlen=16, max_tokens=40, show_progress=False).num_windows == 2
    with pytest.raises(ValueError, match="found 10 tokens, need at least 16"):
        perplexity(model, tokens[:10], seqlen=16, show_progress=False)


def test_a_hopeless_model_has_infinite_perplexity_not_an_overflow():
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(1e5)  # logits in the hundreds of thousands: mean NLL far above exp's limit
    tokens = torch.randint(0, 96, (32,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, tokens, seqlen=16, show_progress=False)
    assert result.perplexity == math.inf
    assert 710 < result.mean_nll < math.inf  # kept, so broken models can still be compared
    assert "ppl inf" in str(result) and "mean NLL" in str(result)
    assert result.to_dict()["mean_nll"] == result.mean_nll


def test_mean_nll_is_kept_for_a_working_model():
    model = tiny_model("llama")
    tokens = torch.randint(0, 96, (32,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, tokens, seqlen=16, show_progress=False)
    assert result.perplexity == pytest.approx(math.exp(result.mean_nll))


def test_nan_logits_name_the_model_as_broken():
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="model is broken: it gives NaN logits on evaluation window 0"):
        perplexity(model, torch.randint(0, 96, (32,)), seqlen=16, show_progress=False)
