"""Compressed storage (GBLMConfig.storage="compressed"): kept values beside the mask file, rebuilt exactly on load.

Round trips for every pattern and float dtype, the sizes the issue asks for, re-saving a loaded model in either
storage, old checkpoints' checksums, damaged or mismatched files refused before loading, and a loud failure (never
random weights) when a reader lacks the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import VOCAB, tiny_model, weights_of
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from optimum_gblm import GBLMConfig, GBLMPruner
from optimum_gblm.checkpoint import read_masks
from optimum_gblm.compressed import (
    STORAGE_METADATA_KEY,
    check_compressed_checkpoint,
    compress_weight,
    decompress_weight,
    kept_count,
)
from optimum_gblm.config import STORAGES
from optimum_gblm.masks import pack_mask
from optimum_gblm.sparse_state import masks_checksum

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PATTERNS = [("unstructured", 0.5), ("2:4", 0.5), ("4:8", 0.5)]


def pruned(family="llama", pattern="2:4", sparsity=0.5, dtype=torch.float32, storage="compressed", seed=0, model=None):
    model = model if model is not None else tiny_model(family, seed=seed)
    model = model.to(dtype)
    config = GBLMConfig(method="magnitude", pattern=pattern, sparsity=sparsity, storage=storage)
    GBLMPruner(config, show_progress=False).prune(model)
    return model


def headers(folder: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path in folder.glob("model*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            shapes.update({k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()})
    return shapes


def safetensors_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def assert_same_pruned_model(original, loaded):
    before, after = weights_of(original), weights_of(loaded)
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype, key
        assert torch.equal(before[key], after[key]), key
    masks, restored = original.hf_quantizer, loaded.hf_quantizer
    assert masks.packed_masks.keys() == restored.packed_masks.keys()
    for name in masks.packed_masks:
        assert torch.equal(masks.mask(name), restored.mask(name))


# -- the pure functions ---------------------------------------------------------------------------------------------
def test_compress_then_decompress_is_exact_and_counts_are_checked():
    generator = torch.Generator().manual_seed(0)
    keep = torch.rand(6, 16, generator=generator) > 0.4
    weight = torch.randn(6, 16, generator=generator) * keep
    values = compress_weight(weight, keep)
    assert values.shape == (int(keep.sum()),)
    assert torch.equal(decompress_weight(values, keep), weight)
    assert kept_count(pack_mask(keep)) == int(keep.sum())
    with pytest.raises(ValueError, match="different checkpoints"):
        decompress_weight(values[1:], keep, "layer.weight")


def test_storage_is_validated_and_round_trips_through_json():
    assert GBLMConfig().storage == "dense" and STORAGES == ("dense", "compressed")
    with pytest.raises(ValueError, match="storage must be one of"):
        GBLMConfig(storage="zip")
    config = GBLMConfig(storage="compressed")
    assert GBLMConfig.from_json_string(config.to_json_string()).storage == "compressed"


# -- round trips ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("pattern, sparsity", PATTERNS, ids=[p for p, _ in PATTERNS])
def test_compressed_round_trip_is_exact(pattern, sparsity, dtype, tmp_path):
    model = pruned(pattern=pattern, sparsity=sparsity, dtype=DTYPES[dtype])
    assert model.config.quantization_config.storage == "compressed"  # the pruner carries it into the saved config
    model.save_pretrained(tmp_path)

    stored = headers(tmp_path)
    masks = model.hf_quantizer
    for name in masks.packed_masks:
        assert stored[f"{name}.weight"] == (int(masks.mask(name).sum()),)  # kept values only, 1-D
    assert stored["lm_head.weight"] == tuple(model.lm_head.weight.shape)  # unpruned tensors stay dense
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata()[STORAGE_METADATA_KEY] == "compressed"

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.dtype == DTYPES[dtype]
    assert_same_pruned_model(model, loaded)
    assert loaded.config.quantization_config.storage == "compressed"


def test_gpt2_conv1d_weights_round_trip(tmp_path):
    model = pruned("gpt2", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert_same_pruned_model(model, AutoModelForCausalLM.from_pretrained(tmp_path))


def test_a_bf16_compressed_checkpoint_loads_exactly_in_float32(tmp_path):
    model = pruned(dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    before, after = weights_of(model), weights_of(loaded)
    assert all(after[k].dtype == torch.float32 and torch.equal(before[k].float(), after[k]) for k in before)


def test_sharded_compressed_checkpoint_round_trips(tmp_path):
    model = pruned(dtype=torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="8KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_same_pruned_model(model, AutoModelForCausalLM.from_pretrained(tmp_path))


@pytest.mark.parametrize("storage", STORAGES)
def test_a_loaded_compressed_model_saves_again_in_either_storage(storage, tmp_path):
    model = pruned(dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "first")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "first")
    loaded.config.quantization_config.storage = storage
    loaded.save_pretrained(tmp_path / "second")  # the loading conversions must not be reversed on save
    dense_key = "model.layers.0.mlp.up_proj.weight"
    assert len(headers(tmp_path / "second")[dense_key]) == (2 if storage == "dense" else 1)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "second")
    assert_same_pruned_model(model, again)
    assert again.config.quantization_config.storage == storage


def test_a_dense_checkpoint_can_be_resaved_compressed_and_its_checksum_still_verifies(tmp_path):
    model = pruned(dtype=torch.bfloat16, storage="dense")
    model.save_pretrained(tmp_path / "dense")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    loaded.config.quantization_config.storage = "compressed"  # storage is not part of what pruning did
    loaded.save_pretrained(tmp_path / "compressed")
    assert_same_pruned_model(model, AutoModelForCausalLM.from_pretrained(tmp_path / "compressed"))


def test_a_checkpoint_written_before_the_storage_field_still_verifies(tmp_path):
    model = pruned(storage="dense")
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    entry = config["quantization_config"]
    del entry["storage"]
    recipe = {k: v for k, v in entry.items() if k != "record"}
    packed, shapes = read_masks(tmp_path / "gblm_masks.safetensors")
    entry["record"]["masks_checksum"] = masks_checksum(packed, shapes, recipe)  # what an older version wrote
    config_path.write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.quantization_config.storage == "dense"
    assert_same_pruned_model(model, loaded)


def test_an_offloaded_model_loads_and_saves_compressed(tmp_path):
    model = pruned()
    model.save_pretrained(tmp_path / "first")
    placement = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                 "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "first", device_map=placement,
                                                     offload_folder=tmp_path / "offload")
    assert offloaded.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(model(ids).logits, offloaded(ids).logits)
    offloaded.save_pretrained(tmp_path / "second")  # weights read back through the offload hooks
    assert_same_pruned_model(model, AutoModelForCausalLM.from_pretrained(tmp_path / "second"))


# -- sizes ----------------------------------------------------------------------------------------------------------
def test_two_four_bf16_checkpoint_is_at_most_sixty_percent_of_dense(tmp_path):
    # Linear-dominated like a real LM (tied embeddings); the tiny test model is mostly embeddings.
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = pruned(model=transformers.LlamaForCausalLM(config).eval(), dtype=torch.bfloat16, storage="dense")
    model.save_pretrained(tmp_path / "dense")
    model.config.quantization_config.storage = "compressed"
    model.save_pretrained(tmp_path / "compressed")

    dense, compressed = safetensors_bytes(tmp_path / "dense"), safetensors_bytes(tmp_path / "compressed")
    assert compressed <= 0.6 * dense, (compressed, dense)
    # Exactly half of every pruned weight's bytes, plus the mask file both storages share.
    (dense_masks, _), (compressed_masks, _) = (read_masks(tmp_path / f / "gblm_masks.safetensors") for f in ("dense", "compressed"))
    assert dense_masks.keys() == compressed_masks.keys()
    assert all(torch.equal(dense_masks[k], compressed_masks[k]) for k in dense_masks)
    stored, full = headers(tmp_path / "compressed"), headers(tmp_path / "dense")
    for name in model.hf_quantizer.packed_masks:
        rows, cols = full[f"{name}.weight"]
        assert stored[f"{name}.weight"] == (rows * cols // 2,)


# -- refusals -------------------------------------------------------------------------------------------------------
def test_weights_changed_after_pruning_are_refused_before_anything_is_written(tmp_path):
    model = pruned()
    name = next(iter(model.hf_quantizer.packed_masks))
    weight = model.get_submodule(name).weight
    with torch.no_grad():
        weight[~model.hf_quantizer.mask(name)] = 1.0  # compressing would silently drop these
    with pytest.raises(ValueError, match="apply_masks"):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_a_mask_file_of_another_checkpoint_is_refused_before_the_weights_load(tmp_path):
    pruned(pattern="2:4").save_pretrained(tmp_path / "a")
    pruned(pattern="unstructured", sparsity=0.3, seed=1).save_pretrained(tmp_path / "b")
    (tmp_path / "a" / "gblm_masks.safetensors").write_bytes((tmp_path / "b" / "gblm_masks.safetensors").read_bytes())
    packed, shapes = read_masks(tmp_path / "a" / "gblm_masks.safetensors")
    with pytest.raises(ValueError, match="different checkpoints"):
        check_compressed_checkpoint([tmp_path / "a" / "model.safetensors"], packed, shapes)
    with pytest.raises(ValueError, match="different checkpoints"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "a")


def test_a_compressed_checkpoint_without_its_mask_file_is_refused(tmp_path):
    pruned().save_pretrained(tmp_path)
    os.remove(tmp_path / "gblm_masks.safetensors")
    with pytest.raises(ValueError, match="mask file"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_without_the_package_a_compressed_checkpoint_fails_loudly_instead_of_loading_random_weights(tmp_path):
    pruned().save_pretrained(tmp_path)
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "mismatched_sizes" in result.stderr
