import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import sample_text, tiny_model, weights_of
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from optimum_gblm import GBLMConfig, GBLMPruner, SparsityCallback, apply_masks
from optimum_gblm.checkpoint import read_masks
from optimum_gblm.quantizer import GBLMHfQuantizer
from optimum_gblm.sparse_state import masks_checksum
from optimum_gblm.structure import prunable_modules


def pruned(family="llama", pattern="2:4", sparsity=0.5, method="gblm", ids=None):
    model = tiny_model(family)
    ids = ids if ids is not None else torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    GBLMPruner(GBLMConfig(method=method, pattern=pattern, sparsity=sparsity), show_progress=False).prune(model, ids)
    return model


def zero_masks(model):
    return {n: m.weight == 0 for n, m in prunable_modules(model).items()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.5), ("unstructured", 0.3), ("2:4", 0.5), ("4:8", 0.5)])
def test_save_then_load_gives_the_same_model_masks_and_config(family, pattern, sparsity, tmp_path):
    model = pruned(family, pattern, sparsity)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    before, after = weights_of(model), weights_of(loaded)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(loaded.hf_quantizer, GBLMHfQuantizer)
    assert loaded.config.quantization_config == model.config.quantization_config
    assert loaded.config.quantization_config.pattern == pattern
    original, restored = model.hf_quantizer, loaded.hf_quantizer
    assert original.packed_masks.keys() == restored.packed_masks.keys()
    for name in original.packed_masks:
        assert torch.equal(original.mask(name), restored.mask(name))
        # the masks say exactly where the zeros are
        assert torch.equal(~restored.mask(name), loaded.get_submodule(name).weight == 0)


def test_config_json_is_plain_readable_json(tmp_path):
    pruned().save_pretrained(tmp_path)
    entry = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert entry["quant_method"] == "gblm" and entry["method"] == "gblm" and entry["pattern"] == "2:4"
    assert entry["record"]["global_sparsity"] == 0.5 and len(entry["record"]["layer_sparsity"]) == 14
    assert entry["masks_file"] == "gblm_masks.safetensors" and len(entry["record"]["masks_checksum"]) == 64
    assert entry["record"]["calibration"]["num_samples"] == 4
    assert GBLMConfig.from_dict(entry).to_dict() == entry


def test_mask_file_takes_one_bit_per_prunable_weight(tmp_path):
    model = pruned()
    model.save_pretrained(tmp_path)
    packed, shapes = read_masks(tmp_path / "gblm_masks.safetensors")
    weights = sum(m.weight.numel() for m in prunable_modules(model).values())
    assert sum(p.numel() for p in packed.values()) == sum((n.numel() + 7) // 8 for n in zero_masks(model).values())
    assert all(p.dtype == torch.uint8 for p in packed.values())
    size = (tmp_path / "gblm_masks.safetensors").stat().st_size
    assert weights / 8 <= size <= weights / 8 + 8192  # the rest is the safetensors header


def test_trainer_keeps_masked_weights_at_zero_and_trains_the_rest(tmp_path):
    model = pruned(pattern="2:4")
    masks = zero_masks(model)
    before = weights_of(model)

    class Windows(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.randint(0, 96, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=4, learning_rate=1e-2, per_device_train_batch_size=2,
        weight_decay=0.1, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=Windows(), callbacks=[SparsityCallback()]).train()
    for name, module in prunable_modules(model).items():
        assert torch.equal(module.weight[masks[name]], torch.zeros_like(module.weight[masks[name]])), name
        kept = ~masks[name]
        assert not torch.equal(module.weight[kept], before[f"{name}.weight"][kept]), f"{name} did not train"
    assert model.config.quantization_config.record.global_sparsity == 0.5
    model.save_pretrained(tmp_path / "tuned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")
    assert all(torch.equal(v, weights_of(model)[k]) for k, v in weights_of(reloaded).items())


def test_sparsity_callback_writes_masks_and_card_into_the_push_folder_of_the_main_process_only(tmp_path):
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    model = pruned(pattern="2:4")
    callback = SparsityCallback()
    control = TrainerControl()

    def push(folder, model, main=True):
        args = SimpleNamespace(output_dir=str(folder))
        callback.on_push_begin(args, TrainerState(is_world_process_zero=main), control, model=model)
        return sorted(p.name for p in folder.iterdir()) if folder.exists() else []

    # the Trainer's upload folder gets the masks (what a checkpoint push copies there lacks them) and our card
    assert push(tmp_path / "main", model) == ["README.md", "gblm_masks.safetensors"]
    packed, _ = read_masks(tmp_path / "main" / "gblm_masks.safetensors")
    assert all(torch.equal(packed[n], model.hf_quantizer.packed_masks[n]) for n in packed)
    assert "## Recipe" in (tmp_path / "main" / "README.md").read_text()
    # a wrapped model (DDP, DataParallel: `.module`) is found; other ranks, and models without masks, write nothing
    assert push(tmp_path / "wrapped", SimpleNamespace(module=model)) == ["README.md", "gblm_masks.safetensors"]
    assert push(tmp_path / "rank1", model, main=False) == []
    assert push(tmp_path / "dense", tiny_model("llama")) == []
    assert push(tmp_path / "none", None) == []


def test_gradient_masking_alone_keeps_zeros_in_a_plain_training_loop():
    model = pruned(pattern="unstructured")
    masks = zero_masks(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 96, (2, 16))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(zero_masks(model)[n], m) for n, m in masks.items())


def test_loading_without_optimum_gblm_gives_zero_filled_weights_and_a_warning(tmp_path):
    model = pruned()
    model.save_pretrained(tmp_path)
    torch.save({n: m.cpu() for n, m in zero_masks(model).items()}, tmp_path.parent / "expected.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
assert "optimum_gblm" not in sys.modules
expected = torch.load({str(tmp_path.parent / 'expected.pt')!r})
for name, zeros in expected.items():
    assert torch.equal(model.get_submodule(name).weight == 0, zeros), name
print("ZEROS-OK")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path.parent)
    assert done.returncode == 0, done.stderr
    assert "ZEROS-OK" in done.stdout
    assert "Unknown quantization type, got gblm" in done.stderr + done.stdout


def test_missing_or_corrupt_mask_file_is_a_clear_error(tmp_path):
    pruned().save_pretrained(tmp_path)
    masks = tmp_path / "gblm_masks.safetensors"
    good = masks.read_bytes()
    masks.unlink()
    with pytest.raises(ValueError, match="mask file 'gblm_masks.safetensors' is missing.*delete `quantization_config`"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    masks.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="unreadable"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_tampering_is_detected(tmp_path):
    model = pruned()
    model.save_pretrained(tmp_path / "a")
    # weights no longer zero where masked
    with torch.no_grad():
        name = next(iter(model.hf_quantizer.packed_masks))
        weight = model.get_submodule(name).weight
        weight[~model.hf_quantizer.mask(name)] = 1.0
    with pytest.raises(ValueError, match=f"{name} has .* non-zero weights where its mask says pruned.*apply_masks"):
        model.save_pretrained(tmp_path / "b")
    apply_masks(model)
    model.save_pretrained(tmp_path / "b")
    # a checksum that does not match the masks
    config_path = tmp_path / "a" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["record"]["masks_checksum"] = "0" * 64
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match the checksum"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "a")


def test_masks_checksum_depends_on_every_bit():
    model = pruned()
    q = model.hf_quantizer
    reference = masks_checksum(q.packed_masks, q.mask_shapes, model.config.quantization_config.recipe())
    assert reference == model.config.quantization_config.record.masks_checksum
    name = next(iter(q.packed_masks))
    flipped = dict(q.packed_masks)
    flipped[name] = flipped[name].clone()
    flipped[name][0] ^= 1
    assert masks_checksum(flipped, q.mask_shapes, model.config.quantization_config.recipe()) != reference


def test_pruning_at_load_gives_the_same_masks_as_the_pruner(tmp_path, tokenizer):
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    tokenizer.save_pretrained(base)
    text = tmp_path / "calibration.txt"
    text.write_text(sample_text(800))
    settings = dict(method="gblm", pattern="2:4", sparsity=0.5, num_samples=4, seqlen=16)
    at_load = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=GBLMConfig(**settings, dataset=str(text), tokenizer=str(base))
    )
    dense = AutoModelForCausalLM.from_pretrained(base)
    GBLMPruner(GBLMConfig(**settings), show_progress=False).prune(dense, str(text), tokenizer=tokenizer)
    assert isinstance(at_load.hf_quantizer, GBLMHfQuantizer)
    expected = zero_masks(dense)
    assert all(torch.equal(expected[n], m) for n, m in zero_masks(at_load).items())
    assert at_load.config.quantization_config.record.global_sparsity == 0.5
    at_load.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "gblm_masks.safetensors").is_file()


def test_pruning_at_load_without_data_is_refused(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pruning while loading needs calibration data"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=GBLMConfig())


def test_kept_weights_that_are_exactly_zero_may_move(tmp_path):
    """Dequantized checkpoints hold some exact zeros; pruning keeps a few of them and fine-tuning may move them.
    Sparsity is what the masks prune, so that is neither a violation nor a mismatch on load."""
    model = tiny_model("llama")
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.weight[0, 0:3] = 0.0  # three zeros in one group of 4: 2:4 prunes two of them, keeps one
    GBLMPruner(GBLMConfig(method="magnitude", pattern="2:4")).prune(model)
    assert model.config.quantization_config.record.global_sparsity == 0.5
    kept_zero = (model.hf_quantizer.mask("model.layers.0.mlp.up_proj") & (layer.weight == 0)).nonzero()
    assert len(kept_zero) == 1
    with torch.no_grad():
        layer.weight[tuple(kept_zero[0])] = 0.25  # as a training step could
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.layers[0].mlp.up_proj.weight[tuple(kept_zero[0])] == 0.25


def flat_entry_of_version_0_1(entry, packed, shapes):
    """config.json's quantization_config as the first release wrote it: recipe and results in one flat dict, the
    masks checksum taken over that flat recipe."""
    record = entry["record"]
    flat = {k: v for k, v in entry.items() if k not in ("record", "method_options", "profile_options")}
    flat.update(gradient_checkpointing=False, sparsegpt_damping=0.01, sparsegpt_blocksize=128, owl_threshold=5.0, owl_lambda=0.08)
    results = {k: record[k] for k in ("base_model", "calibration", "global_sparsity", "layer_sparsity", "evaluation")}
    results["layer_alpha"] = record["layer_settings"].get("alpha")
    flat["masks_checksum"] = masks_checksum(packed, shapes, flat)  # flat holds no result yet: it is the recipe
    return {**flat, **results}


def test_a_checkpoint_of_the_first_release_loads_and_is_verified(tmp_path):
    model = pruned()
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    packed, shapes = read_masks(tmp_path / "gblm_masks.safetensors")
    config["quantization_config"] = flat_entry_of_version_0_1(config["quantization_config"], packed, shapes)
    config_path.write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    # verified against the flat recipe's checksum, then recorded with today's recipe
    assert loaded.config.quantization_config.record.masks_checksum == model.config.quantization_config.record.masks_checksum
    assert all(torch.equal(loaded.hf_quantizer.mask(n), model.hf_quantizer.mask(n)) for n in packed)
    loaded.save_pretrained(tmp_path / "resaved")
    assert "record" in json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]
    AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")
    # an edited old recipe is still caught
    config["quantization_config"]["pattern"] = "4:8"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match the checksum"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("recorded", [{}, None])
def test_a_record_without_layer_sparsity_loads(tmp_path, recorded):
    model = pruned()
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["record"]["layer_sparsity"] = recorded  # nothing recorded: nothing to check
    config_path.write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(loaded.hf_quantizer.mask(n), model.hf_quantizer.mask(n)) for n in model.hf_quantizer.packed_masks)


def test_a_save_writes_weights_then_masks_then_card_each_once(monkeypatch, tmp_path):
    from optimum_gblm import card, checkpoint

    model = pruned()
    written = []
    for module, name in ((checkpoint, "write_masks"), (card, "write_model_card")):
        original = getattr(module, name)

        def recording(model, folder, original=original, name=name):
            written.append((name, sorted(p.name for p in Path(folder).iterdir())))
            return original(model, folder)

        monkeypatch.setattr(module, name, recording)
    model.save_pretrained(tmp_path)
    assert [name for name, _ in written] == ["write_masks", "write_model_card"]  # masks first, then the card
    assert "model.safetensors" in written[0][1] and "config.json" in written[0][1], "weights and config come first"
    assert "gblm_masks.safetensors" in written[1][1], "the card is written after the masks"


def test_a_dequantized_model_saves_as_a_plain_dense_model(tmp_path):
    from optimum_gblm.checkpoint import save_pretrained_atomically

    model = pruned(pattern="2:4")
    masks = zero_masks(model)
    model.dequantize()
    model.save_pretrained(tmp_path / "dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    assert not (tmp_path / "dense" / "gblm_masks.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert getattr(loaded, "hf_quantizer", None) is None
    assert all(torch.equal(v, weights_of(model)[k]) for k, v in weights_of(loaded).items())
    save_pretrained_atomically(model, tmp_path / "atomic")
    assert not (tmp_path / "atomic" / "gblm_masks.safetensors").exists()
    # a plain dense model: training may now move the pruned weights
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-1)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert any(not torch.equal(zero_masks(model)[n], m) for n, m in masks.items())


def test_a_model_that_lost_its_masks_is_refused_before_anything_is_written(tmp_path):
    model = pruned()
    model.hf_quantizer = None  # its config.json would still name masks it cannot write
    with pytest.raises(ValueError, match="no longer carries them.*nothing was written.*dequantize"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_deep_copy_keeps_its_gradient_masking():
    import copy

    model = pruned(pattern="unstructured")
    masks = zero_masks(model)
    duplicate = copy.deepcopy(model)
    assert duplicate.hf_quantizer is not model.hf_quantizer
    before = weights_of(duplicate)
    # no SparsityCallback: the gradient hooks alone must keep the zeros (AdamW's weight decay included)
    optimizer = torch.optim.AdamW(duplicate.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        duplicate(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, module in prunable_modules(duplicate).items():
        assert torch.equal(module.weight == 0, masks[name]), f"{name}: a pruned weight of the copy moved"
        assert not torch.equal(module.weight, before[f"{name}.weight"]), f"{name} did not train"
    # the copy's hooks use the copy's masks, and the original keeps its own
    assert all(torch.equal(zero_masks(model)[n], m) for n, m in masks.items())
    from optimum_gblm.sparse_state import detach_masks

    detach_masks(duplicate)  # and forgetting the masks stops the masking on the copy too
    duplicate(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert any(not torch.equal(zero_masks(duplicate)[n], m) for n, m in masks.items())


def test_a_model_pruned_while_frozen_is_masked_once_it_trains():
    """Hooks attach lazily: a frozen weight has no gradient to mask, and is hooked when it starts requiring grad."""
    model = tiny_model("llama")
    model.requires_grad_(False)  # as for inference
    GBLMPruner(GBLMConfig(method="magnitude", pattern="2:4")).prune(model)
    masks = zero_masks(model)
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert all(torch.equal(zero_masks(model)[n], m) for n, m in masks.items())


def test_magnitude_prunes_at_load_without_calibration_data(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=GBLMConfig(method="magnitude", pattern="2:4"))
    assert model.config.quantization_config.record.global_sparsity == 0.5
