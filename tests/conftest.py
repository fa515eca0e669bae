"""Tiny random models of every supported family, a tiny word-level tokenizer, and shared helpers."""

from __future__ import annotations

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

VOCAB = 96
HIDDEN = 32
LAYERS = 2


# family -> (config class, model class, config kwargs); all tiny: 2 blocks, hidden 32
_GQA = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2)
_ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _GQA),
    "mistral": ("MistralConfig", "MistralForCausalLM", _GQA),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _GQA),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(
        hidden_size=HIDDEN, ffn_dim=64, num_hidden_layers=LAYERS, num_attention_heads=4, word_embed_proj_dim=HIDDEN,
        max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)),
    # mixed attention types: block 0 sliding-window (window 4, local rotary tables), block 1 global; the engine must
    # give each block its own mask and tables
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        _GQA, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        max_position_embeddings=128, bos_token_id=1, eos_token_id=2)),
}


def _tiny(family: str):
    config_class, model_class, kwargs = _ARCHITECTURES[family]
    config = getattr(transformers, config_class)(vocab_size=VOCAB, **kwargs)
    return getattr(transformers, model_class)(config)


FAMILIES = list(_ARCHITECTURES)


def tiny_model(family: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    model = _tiny(family)
    model.eval()
    return model


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def calibration_ids():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (4, 16), generator=generator)


WORDS = (
    "it is a truth universally acknowledged that a single man in possession of a good fortune must be in want "
    "of a wife however little known the feelings or views of such a man may be on his first entering neighbourhood"
).split()


def sample_text(num_words: int = 400, seed: int = 0) -> str:
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(WORDS), (num_words,), generator=generator)
    return " ".join(WORDS[i] for i in picks)


@pytest.fixture
def tokenizer():
    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]")


def weights_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(autouse=True)
def _private_gradient_cache(tmp_path_factory, monkeypatch):
    """Tests never write into the user's real gradient cache."""
    monkeypatch.setenv("OPTIMUM_GBLM_CACHE", str(tmp_path_factory.mktemp("gradient-cache")))
