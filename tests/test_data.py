import datasets
import pytest
import torch

from conftest import sample_text
from optimum_gblm import get_calibration_data, get_evaluation_tokens
from optimum_gblm.data import default_calibration_path


def test_token_ids_are_used_as_given(calibration_ids):
    assert torch.equal(get_calibration_data(calibration_ids), calibration_ids)
    with pytest.raises(ValueError, match="2-D integer tensor"):
        get_calibration_data(torch.rand(2, 8))
    with pytest.raises(ValueError, match="2-D integer tensor"):
        get_calibration_data(torch.zeros(8, dtype=torch.long))


def test_all_text_sources_give_the_same_windows(tokenizer, tmp_path):
    text = sample_text(500)
    (tmp_path / "book.txt").write_text(text)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text(text)
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    kwargs = dict(tokenizer=tokenizer, num_samples=5, seqlen=12, seed=3)
    from_list = get_calibration_data([text], **kwargs)
    assert from_list.shape == (5, 12) and from_list.dtype == torch.long
    assert torch.equal(get_calibration_data(str(tmp_path / "book.txt"), **kwargs), from_list)
    assert torch.equal(get_calibration_data(tmp_path / "book.txt", **kwargs), from_list)
    assert torch.equal(get_calibration_data(str(folder), **kwargs), from_list)
    assert torch.equal(get_calibration_data(datasets.Dataset.from_dict({"text": [text]}), **kwargs), from_list)


def test_windows_are_seeded(tokenizer):
    text = [sample_text(500)]
    a = get_calibration_data(text, tokenizer, num_samples=6, seqlen=10, seed=0)
    b = get_calibration_data(text, tokenizer, num_samples=6, seqlen=10, seed=0)
    c = get_calibration_data(text, tokenizer, num_samples=6, seqlen=10, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # windows are real slices of the tokenized text
    ids = tokenizer(text[0])["input_ids"]
    joined = " ".join(map(str, ids))
    assert all(" ".join(map(str, w.tolist())) in joined for w in a)


def test_too_short_data_says_how_many_tokens(tokenizer):
    with pytest.raises(ValueError, match=r"found 5 tokens, need at least 65 for one window of 64"):
        get_calibration_data(["a single man in possession"], tokenizer, num_samples=1, seqlen=64)


@pytest.mark.parametrize("source, message", [([], "empty"), ("/no/such/file.txt", "neither a file"), (42, "cannot use a int")])
def test_bad_sources(source, message, tokenizer):
    with pytest.raises(ValueError, match=message):
        get_calibration_data(source, tokenizer, num_samples=1, seqlen=4)


def test_text_needs_a_tokenizer():
    with pytest.raises(ValueError, match="needs a tokenizer: pass tokenizer="):
        get_calibration_data(["some text"], None)


def test_dataset_text_column_is_checked(tokenizer):
    with pytest.raises(ValueError, match="no column 'text'.*text_column"):
        get_calibration_data(datasets.Dataset.from_dict({"body": ["x"]}), tokenizer)


def test_empty_folder(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="holds no text files"):
        get_calibration_data(str(tmp_path), tokenizer)


def test_named_sources_use_the_reference_loaders(monkeypatch, tokenizer):
    calls = []
    docs = [sample_text(50, seed=i) for i in range(20)] + ["too short"]

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        if args[0] == "allenai/c4":
            return datasets.Dataset.from_dict({"text": docs})
        return datasets.Dataset.from_dict({"text": [sample_text(300), "", sample_text(300, seed=1)]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    c4 = get_calibration_data("c4", tokenizer, num_samples=4, seqlen=20, seed=0)
    assert c4.shape == (4, 20)
    assert torch.equal(c4, get_calibration_data("c4", tokenizer, num_samples=4, seqlen=20, seed=0))
    assert calls[0] == (("allenai/c4",), {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}, "split": "train"})
    wiki = get_calibration_data("wikitext2", tokenizer, num_samples=3, seqlen=16, seed=0)
    assert wiki.shape == (3, 16)
    assert calls[-1] == (("wikitext", "wikitext-2-raw-v1"), {"split": "train"})
    get_evaluation_tokens("wikitext2", tokenizer)
    assert calls[-1] == (("wikitext", "wikitext-2-raw-v1"), {"split": "test"})


def test_the_shipped_calibration_text_is_there_and_small():
    path = default_calibration_path()
    assert path.is_file()
    assert 100_000 < path.stat().st_size <= 1_100_000
    assert "Elizabeth" in path.read_text(encoding="utf-8")
