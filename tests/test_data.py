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


# -- token ids as GPTQ / llm-compressor users have them ---------------------------------------------------------
def _rows(*lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (n,), generator=generator).tolist() for n in lengths]


def _is_slice_of(window, stream):
    return " ".join(map(str, window.tolist())) in " ".join(map(str, stream))


def test_dataset_with_input_ids_rows_longer_than_seqlen_gives_one_window_per_row():
    rows = _rows(20, 30, 25, 40)
    dataset = datasets.Dataset.from_dict({"input_ids": rows})
    windows = get_calibration_data(dataset, num_samples=4, seqlen=16, seed=0)  # no tokenizer needed
    assert windows.shape == (4, 16) and windows.dtype == torch.long
    # every row used once, in order, each window inside its own row
    assert all(_is_slice_of(w, row) for w, row in zip(windows, rows))
    assert torch.equal(windows, get_calibration_data(dataset, num_samples=4, seqlen=16, seed=0))
    # rows of exactly seqlen are used as they are
    exact = _rows(16, 16, 16, seed=1)
    assert get_calibration_data(datasets.Dataset.from_dict({"input_ids": exact}), num_samples=3, seqlen=16).tolist() == exact
    # fewer rows than samples: rows are reused, windows still inside rows
    more = get_calibration_data(dataset, num_samples=10, seqlen=16, seed=0)
    assert more.shape == (10, 16) and all(any(_is_slice_of(w, row) for row in rows) for w in more)


def test_dataset_with_rows_shorter_than_seqlen_joins_them_with_eos(tokenizer):
    rows = _rows(5, 7, 30, 3)
    dataset = datasets.Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    windows = get_calibration_data(dataset, tokenizer, num_samples=6, seqlen=16, seed=0)
    assert windows.shape == (6, 16)
    eos = tokenizer.eos_token_id
    stream = rows[0] + [eos] + rows[1] + [eos] + rows[2] + [eos] + rows[3]
    assert all(_is_slice_of(w, stream) for w in windows)
    # without a tokenizer the rows are joined as they are
    plain = get_calibration_data(dataset, num_samples=6, seqlen=16, seed=0)
    assert all(_is_slice_of(w, sum(rows, [])) for w in plain)


def test_padding_is_dropped_and_batch_encodings_are_accepted(tokenizer):
    texts = ["a single man in possession of a good fortune", "it is a truth universally acknowledged"]
    tokenizer.pad_token = "[UNK]"
    encoding = tokenizer(texts, padding=True, return_tensors="pt")
    assert type(encoding).__name__ == "BatchEncoding" and (encoding["attention_mask"] == 0).any()
    windows = get_calibration_data(encoding, tokenizer, num_samples=3, seqlen=8, seed=0)
    real = [tokenizer(t)["input_ids"] for t in texts]
    stream = real[0] + [tokenizer.eos_token_id] + real[1]
    assert windows.shape == (3, 8) and all(_is_slice_of(w, stream) for w in windows)
    assert tokenizer.pad_token_id not in windows  # no padding reached the samples
    # a plain dict of lists, and the list-of-examples form optimum's GPTQ takes, give the same windows
    as_dict = {"input_ids": [r for r in real], "attention_mask": [[1] * len(r) for r in real]}
    assert torch.equal(get_calibration_data(as_dict, tokenizer, num_samples=3, seqlen=8, seed=0), windows)
    examples = [{"input_ids": torch.tensor([r]), "attention_mask": torch.ones(1, len(r))} for r in real]
    assert torch.equal(get_calibration_data(examples, tokenizer, num_samples=3, seqlen=8, seed=0), windows)


def test_list_of_id_lists():
    rows = _rows(24, 18)
    windows = get_calibration_data(rows, num_samples=2, seqlen=16, seed=0)
    assert windows.shape == (2, 16) and all(_is_slice_of(w, row) for w, row in zip(windows, rows))
    assert get_calibration_data([torch.tensor(r) for r in rows], num_samples=2, seqlen=16, seed=0).equal(windows)


def test_text_column_names_the_text(tokenizer):
    text = sample_text(300)
    kwargs = dict(tokenizer=tokenizer, num_samples=4, seqlen=12, seed=2)
    by_body = get_calibration_data(datasets.Dataset.from_dict({"body": [text]}), text_column="body", **kwargs)
    assert torch.equal(by_body, get_calibration_data([text], **kwargs))


@pytest.mark.parametrize(
    "source, message",
    [
        (datasets.Dataset.from_dict({"input_ids": [[], []]}), r"is empty: it holds no token ids"),
        ({"input_ids": []}, r"is empty: it holds no token ids"),
        ({"ids": [[1, 2]]}, r"needs an 'input_ids' entry \(keys: \['ids'\]\)"),
        ([[1, 2, 3], [4, 5]], r"found 5 tokens, need at least 17 for one window of 16"),
        ([[1.5, 2.0]], r"token ids must be integers"),
        (datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"]})}), r"pass one split, e.g. dataset\['train'\]"),
    ],
)
def test_clear_errors_for_token_ids(source, message):
    with pytest.raises(ValueError, match=message):
        get_calibration_data(source, num_samples=2, seqlen=16)


def test_source_description_names_the_form(tokenizer):
    from optimum_gblm.data import source_description

    assert source_description(datasets.Dataset.from_dict({"input_ids": [[1, 2]] * 3})) == "token ids from a datasets.Dataset (3 rows)"
    assert source_description(tokenizer(["a man", "a wife"])) == "token ids from a BatchEncoding (2 rows)"
    assert source_description({"input_ids": [1, 2, 3]}) == "token ids from a dict (1 rows)"
    assert source_description([[1, 2], [3]]) == "token ids (2 sequences)"
    assert source_description(["a", "b"]) == "2 texts"
    assert source_description(datasets.Dataset.from_dict({"body": ["x"]}), "body") == "datasets.Dataset (1 rows, column 'body')"


def test_evaluation_tokens_from_token_ids(tokenizer):
    rows = _rows(5, 7)
    stream = get_evaluation_tokens(datasets.Dataset.from_dict({"input_ids": rows}), tokenizer)
    assert stream.tolist() == rows[0] + [tokenizer.eos_token_id] + rows[1]
