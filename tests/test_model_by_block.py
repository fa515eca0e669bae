"""The model loss's gradients taken one block at a time (gradient_loss="model_by_block"): from the last block down, each
block's weight gradients from the loss's gradient at its output; by the chain rule the full-model gradients."""

import json
import os
import shutil
import signal
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from optimum_gblm import GBLMConfig, GBLMPruner
from optimum_gblm import pruner as pruner_module
from optimum_gblm.files import OwnedFolder, kill_unwinds
from optimum_gblm.gradients import (
    GradientNormsOnDisk,
    _dense_block_inputs,
    block_inputs_bytes,
    compute_gradient_norms,
    loss_gradient_norms_by_block,
)
from optimum_gblm.methods import base as methods_base
from optimum_gblm.structure import find_decoder_blocks, layers_by_block, prunable_modules


def by_block_config(method="gblm_obs", pattern="2:4", **options):
    return GBLMConfig(method=method, pattern=pattern, sparsity=0.5, method_options={"gradient_loss": "model_by_block", **options})


def assert_norms_close(actual, expected):
    assert set(actual) == set(expected)
    for name, value in expected.items():
        # the same float32 products, summed in another order where the backward meets the residual stream: rounding
        # is a few ulps of the largest entries, far below 1e-4 of them
        torch.testing.assert_close(actual[name], value, rtol=1e-4, atol=1e-5 * value.abs().max().item(), msg=name)


def blockwise_norms(model, input_ids, folder, norm="l1"):
    return loss_gradient_norms_by_block(model, layers_by_block(model), input_ids, folder, norm, show_progress=False)


# llama: pre-norm residual blocks; gemma3: a sliding-window block and a global one (each its own mask and rotary
# tables); gpt2 and opt: other block signatures and heads
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "opt"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_blockwise_norms_are_the_full_model_gradient_norms(family, norm, calibration_ids, tmp_path):
    model = tiny_model(family)
    expected = compute_gradient_norms(model, calibration_ids, prunable_modules(model), norm=norm, show_progress=False)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert_norms_close(dict(blockwise_norms(model, calibration_ids, tmp_path, norm)), expected)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    assert not model.training


def test_the_norms_wait_on_disk_one_file_per_block(calibration_ids, tmp_path):
    model = tiny_model("llama")
    norms = blockwise_norms(model, calibration_ids[:3], tmp_path)
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["block-00000.safetensors", "block-00001.safetensors"]
    # numbered by block, although the last block is the first one done
    for block, path in enumerate(files):
        with safe_open(str(path), framework="pt") as f:
            assert sorted(f.keys()) == sorted(layers_by_block(model)[block])
    assert len(norms) == len(prunable_modules(model))
    assert set(norms) == set(prunable_modules(model))
    name = "model.layers.0.mlp.down_proj"
    norms.factor = 2.0
    assert torch.equal(norms[name], 2 * load_file(str(files[0]))[name])  # the factor is applied as it is read


def test_a_model_in_train_mode_is_measured_in_eval_mode_and_left_in_train_mode(calibration_ids, tmp_path):
    model = tiny_model("llama")
    expected = compute_gradient_norms(model, calibration_ids[:2], prunable_modules(model), show_progress=False)
    model.train()
    assert_norms_close(dict(blockwise_norms(model, calibration_ids[:2], tmp_path)), expected)
    assert model.training


def test_the_prune_uses_the_full_model_norms_without_a_full_backward(calibration_ids, monkeypatch, tmp_path):
    model = tiny_model("llama")
    expected = compute_gradient_norms(model, calibration_ids, prunable_modules(model), show_progress=False)
    used = {}

    def spy(*args, **kwargs):
        norms = loss_gradient_norms_by_block(*args, **kwargs)
        used.update(norms)  # read now: the folder is gone once the prune ends
        return norms

    def no_full_backward(*args, **kwargs):
        raise AssertionError("the whole-model gradient stage ran")

    monkeypatch.setattr(pruner_module, "loss_gradient_norms_by_block", spy)
    monkeypatch.setattr(pruner_module, "cached_gradient_norms", no_full_backward)
    GBLMPruner(by_block_config(), cache_dir=tmp_path / "cache", show_progress=False).prune(model, calibration_ids)
    assert_norms_close(used, expected)  # taken on the dense weights, before any block was pruned
    assert list((tmp_path / "cache").iterdir()) == []  # the scratch folder went with the prune
    record = model.config.quantization_config.record
    assert record.global_sparsity == 0.5 and all(v == 0.5 for v in record.layer_sparsity.values())
    timings = record.timings_seconds
    assert timings["gradients"] > 0 and timings["prune"] > 0
    assert timings["gradients"] + timings["prune"] <= timings["total"] + 1e-3
    model.save_pretrained(tmp_path / "out")
    stored = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert stored["method_options"]["gradient_loss"] == "model_by_block"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.quantization_config.method_options["gradient_loss"] == "model_by_block"


def test_a_failed_prune_leaves_no_scratch_folder_and_the_model_unchanged(calibration_ids, monkeypatch, tmp_path):
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def fails(*args, **kwargs):
        raise RuntimeError("out of memory in the layer pass")

    monkeypatch.setattr(pruner_module, "prune_layers", fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        GBLMPruner(by_block_config(), cache_dir=tmp_path, show_progress=False).prune(model, calibration_ids)
    assert list(tmp_path.iterdir()) == []
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_too_little_disk_for_the_norms_is_refused_before_anything_changes(calibration_ids, monkeypatch, tmp_path):
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    needed = sum(m.weight.numel() for m in prunable_modules(model).values()) * 4
    real = shutil.disk_usage
    monkeypatch.setattr(pruner_module.shutil, "disk_usage", lambda path: real(path)._replace(free=needed // 2))
    with pytest.raises(ValueError, match=rf"writes 0.00 GiB of gradient norms under {tmp_path}.*--cache-dir"):
        GBLMPruner(by_block_config(), cache_dir=tmp_path, show_progress=False).prune(model, calibration_ids)
    assert list(tmp_path.iterdir()) == []
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_scratch_folder_that_cannot_be_made_is_refused_before_anything_changes(calibration_ids, monkeypatch, tmp_path):
    # a model pruned before: its masks are detached only once the scratch folder exists, so they must still be there
    model = tiny_model("llama")
    GBLMPruner(GBLMConfig(method="wanda", pattern="2:4", sparsity=0.5), show_progress=False).prune(model, calibration_ids)
    masks = {name: packed.clone() for name, packed in model.hf_quantizer.packed_masks.items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(pruner_module, "OwnedFolder", read_only)
    with pytest.raises(ValueError, match=rf"under the cache folder {tmp_path}, where no folder can be made.*--cache-dir"):
        GBLMPruner(by_block_config(), cache_dir=tmp_path, show_progress=False).prune(model, calibration_ids)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert set(model.hf_quantizer.packed_masks) == set(masks)
    assert all(torch.equal(model.hf_quantizer.packed_masks[n], m) for n, m in masks.items())
    assert model.config.quantization_config.method == "wanda"


def test_the_folders_of_dead_prunes_are_removed_and_a_live_one_is_kept(calibration_ids, tmp_path):
    # a prune killed with SIGKILL leaves its folder and the lock file no living process holds; another prune at work
    # holds its lock (flock conflicts between two opens even in one process)
    dead = tmp_path / f"{pruner_module.SCRATCH_PREFIX}dead"
    dead.mkdir()
    (dead / "block-00003.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / f"{dead.name}.lock").write_text("12345 elsewhere\n")
    unlocked = tmp_path / f"{pruner_module.SCRATCH_PREFIX}older"  # an earlier version's, with no lock file at all
    unlocked.mkdir()
    with OwnedFolder(tmp_path, pruner_module.SCRATCH_PREFIX) as live:
        GBLMPruner(by_block_config(), cache_dir=tmp_path, show_progress=False).prune(tiny_model("llama"), calibration_ids)
        assert sorted(p.name for p in tmp_path.iterdir()) == [live.path.name, f"{live.path.name}.lock"]
    assert list(tmp_path.iterdir()) == []


def test_a_kill_during_the_prune_removes_its_folder(calibration_ids, monkeypatch, tmp_path):
    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler runs before this returns
        raise AssertionError("SIGTERM did not unwind the prune")

    monkeypatch.setattr(pruner_module, "prune_layers", killed)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what a plain python process has
    try:
        with pytest.raises(SystemExit) as stopped:
            GBLMPruner(by_block_config(), cache_dir=tmp_path, show_progress=False).prune(tiny_model("llama"), calibration_ids)
        assert stopped.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # given back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert list(tmp_path.iterdir()) == []


def test_a_programs_own_kill_handler_is_left_alone():
    def own(number, frame):
        pass

    previous = signal.signal(signal.SIGTERM, own)
    try:
        with kill_unwinds():
            assert signal.getsignal(signal.SIGTERM) is own
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_kept_block_inputs_are_what_the_memory_check_counts(calibration_ids):
    # 2 blocks x 4 sequences x 16 tokens x width 64, fp32, plus one gradient per sequence
    model = tiny_model("llama")
    _, blocks = find_decoder_blocks(model)
    inputs, _, gradients = _dense_block_inputs(model, list(blocks), calibration_ids, show_progress=False)
    kept = [t for block in inputs for t in block] + gradients
    assert all(t.device.type == "cpu" for t in kept)
    width = model.config.hidden_size
    assert block_inputs_bytes(model, 4, 16) == 3 * 4 * 16 * width * 4 == sum(t.numel() * t.element_size() for t in kept)


def test_too_little_memory_for_the_block_inputs_is_refused_before_anything_changes(calibration_ids, monkeypatch, tmp_path):
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    needed = block_inputs_bytes(model, 2, 16)
    monkeypatch.setattr(pruner_module.psutil, "virtual_memory", lambda: SimpleNamespace(available=needed - 1))
    config = by_block_config(gradient_samples=2)
    with pytest.raises(ValueError, match=r"for its 2 gradient sequences of 16 tokens.*gradient_samples"):
        GBLMPruner(config, cache_dir=tmp_path, show_progress=False).prune(model, calibration_ids)
    assert list(tmp_path.iterdir()) == []
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    monkeypatch.setattr(pruner_module.psutil, "virtual_memory", lambda: SimpleNamespace(available=needed))
    GBLMPruner(config, cache_dir=tmp_path, show_progress=False).prune(model, calibration_ids)  # just enough


def test_a_full_disk_while_writing_names_the_folder_and_the_fix(tmp_path):
    norms = GradientNormsOnDisk(tmp_path / "missing")  # a folder that is not there fails as a full disk would
    with pytest.raises(OSError, match=r"could not write gradient norms to .*missing.*--cache-dir"):
        norms.add({"w": torch.ones(2, 2)}, 0)
    assert len(norms) == 0


def test_the_gradient_stage_leaves_the_layer_pass_as_it_was(calibration_ids):
    # alpha 0 leaves the gradient term out of the choice: the weights then depend on the Hessians alone, which must
    # be the same whichever way the gradients were taken (the by-block stage must not leave hooks, dense inputs or
    # changed weights behind for the layer pass)
    results = []
    for loss in ("model", "model_by_block"):
        model = tiny_model("llama")
        config = GBLMConfig(
            method="gblm_obs", pattern="2:4", sparsity=0.5, method_options={"gradient_loss": loss, "alpha": 0.0}
        )
        GBLMPruner(config, use_cache=False, show_progress=False).prune(model, calibration_ids)
        results.append({name: m.weight.detach().clone() for name, m in prunable_modules(model).items()})
    for name, weight in results[0].items():
        assert torch.equal(results[1][name], weight), name


def test_gradient_samples_take_the_first_sequences_and_rescale(calibration_ids, monkeypatch, tmp_path):
    model = tiny_model("llama")
    expected = compute_gradient_norms(model, calibration_ids[:2], prunable_modules(model), show_progress=False)
    used = {}
    real = methods_base.PruningMethod.__init__

    def spy(self, config, gradient_norms=None):
        used.update(gradient_norms)  # as the method reads them
        real(self, config, gradient_norms)

    monkeypatch.setattr(methods_base.PruningMethod, "__init__", spy)
    GBLMPruner(by_block_config(gradient_samples=2), cache_dir=tmp_path, show_progress=False).prune(model, calibration_ids)
    assert_norms_close(used, {name: 2 * value for name, value in expected.items()})  # l1 on 2 of 4: x 4 / 2


def test_owl_measures_and_prunes_with_one_gradient_stage(calibration_ids, monkeypatch, tmp_path):
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[2].shape[0])
        return loss_gradient_norms_by_block(*args, **kwargs)

    monkeypatch.setattr(pruner_module, "loss_gradient_norms_by_block", spy)
    model = tiny_model("llama")
    config = GBLMConfig(method="gblm", sparsity=0.5, sparsity_profile="owl", method_options={"gradient_loss": "model_by_block"})
    GBLMPruner(config, cache_dir=tmp_path, show_progress=False).prune(model, calibration_ids)
    assert calls == [calibration_ids.shape[0]]  # the measuring pass and the pruning pass read the same norms
    assert len({round(v, 2) for v in model.config.quantization_config.record.layer_sparsity.values()}) > 1


def test_precomputed_norms_are_refused_before_anything_changes(calibration_ids):
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    norms = {name: torch.ones_like(m.weight) for name, m in prunable_modules(model).items()}
    with pytest.raises(ValueError, match=r"gradient_loss='model_by_block'.*--gradient-loss model"):
        GBLMPruner(by_block_config(), show_progress=False).prune(model, calibration_ids, gradient_norms=norms)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_method_without_activations_takes_them_too(calibration_ids, tmp_path):
    # the gradient stage runs before any layer pass: |W| * G alone needs no activations, and gets the same masks
    masks = []
    for loss in ("model", "model_by_block"):
        model = tiny_model("llama")
        config = GBLMConfig(method="gradient", sparsity=0.5, method_options={"gradient_loss": loss})
        GBLMPruner(config, use_cache=False, cache_dir=tmp_path, show_progress=False).prune(model, calibration_ids)
        masks.append(model.hf_quantizer.packed_masks)
    assert all(torch.equal(masks[1][name], packed) for name, packed in masks[0].items())


def test_offloaded_weights_get_the_full_model_gradients(calibration_ids, tmp_path):
    """Each block is onloaded for its turn of the backward, so its weight gradients reach the accumulators: the masks
    of the in-memory run."""
    path = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    GBLMPruner(by_block_config(), show_progress=False).prune(reference, calibration_ids)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map=device_map, offload_folder=tmp_path / "o")
    assert model.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    GBLMPruner(by_block_config(), show_progress=False).prune(model, calibration_ids)
    expected = reference.hf_quantizer.packed_masks
    assert set(model.hf_quantizer.packed_masks) == set(expected)
    for name, packed in expected.items():
        assert torch.equal(model.hf_quantizer.packed_masks[name], packed), name
    # accelerate swaps an offloaded weight's Parameter at each onload: the flags must come back by name, not object
    assert [name for name, p in model.named_parameters() if not p.requires_grad] == []
