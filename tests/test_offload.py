"""Layer-wise pruning of models dispatched by accelerate with CPU/disk offload equals the in-memory run: same masks,
the pruned weights reach the offload (read back through the hooks), same logits. The checkpoint is never written."""

import hashlib

import pytest
import torch
from accelerate import cpu_offload, disk_offload
from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, align_module_device
from conftest import VOCAB, tiny_model
from transformers import AutoModelForCausalLM

from optimum_gblm import GBLMConfig, GBLMPruner, apply_masks
from optimum_gblm.gradients import compute_gradient_norms
from optimum_gblm.layer_masks import prune_layers
from optimum_gblm.masks import unpack_mask
from optimum_gblm.placement import is_offloaded, store_offloaded
from optimum_gblm.registry import METHODS, get_method
from optimum_gblm.structure import prunable_modules

# Block 0 stays in memory, block 1 lives on disk (on this CPU-only machine "cpu" blocks are resident: accelerate only
# offloads CPU weights when the execution device is an accelerator).
EXPLICIT_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}
ALL_ON_DISK = {**EXPLICIT_MAP, "model.layers.0": "disk"}
# Every registered method, so a new one is checked offloaded without new test code (magnitude: one pattern).
CASES = [(m, p) for m in sorted(METHODS) for p in ("unstructured", "2:4") if (m, p) != ("magnitude", "unstructured")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gradient_norms(checkpoint):
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    model = load(checkpoint)
    return compute_gradient_norms(model, ids, prunable_modules(model), show_progress=False)


def load(checkpoint, **kwargs):
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, **kwargs)


def load_placed(checkpoint, placement, folder):
    """The tiny model offloaded one of the ways a user would do it."""
    if placement == "explicit map":
        return load(checkpoint, device_map=EXPLICIT_MAP, offload_folder=folder)
    if placement == "auto":
        size = sum(p.numel() * p.element_size() for p in load(checkpoint).parameters())
        model = load(checkpoint, device_map="auto", max_memory={"cpu": int(0.9 * size)}, offload_folder=folder)
        assert "disk" in model.hf_device_map.values(), model.hf_device_map
        return model
    if placement == "accelerate cpu_offload":  # weights held in a plain dict of CPU tensors
        return cpu_offload(load(checkpoint), execution_device="cpu")
    if placement == "accelerate disk_offload":  # weights in accelerate's own .dat files, index.json written
        return disk_offload(load(checkpoint), folder, execution_device="cpu")
    raise AssertionError(placement)


def read_weight(module):
    """The weight as the model will use it: onloaded by its accelerate hook, then offloaded again."""
    with align_module_device(module):
        return module.weight.detach().clone()


def prune(model, method, pattern, ids, norms):
    config = GBLMConfig(method=method, pattern=pattern, sparsity=0.5)
    needs_norms = METHODS[method].gradients_needed(config)
    GBLMPruner(config, show_progress=False).prune(model, ids, gradient_norms=norms if needs_norms else None)
    return model.hf_quantizer


@pytest.mark.parametrize("placement", ["explicit map", "auto", "accelerate cpu_offload", "accelerate disk_offload"])
@pytest.mark.parametrize("method, pattern", CASES)
def test_offloaded_pruning_equals_in_memory(checkpoint, gradient_norms, calibration_ids, tmp_path, placement, method, pattern):
    reference = load(checkpoint)
    expected = prune(reference, method, pattern, calibration_ids, gradient_norms)

    model = load_placed(checkpoint, placement, tmp_path / "offload")
    offloaded_layer = model.model.layers[1].mlp.down_proj
    assert is_offloaded(offloaded_layer) and offloaded_layer.weight.device.type == "meta"  # really offloaded
    quantizer = prune(model, method, pattern, calibration_ids, gradient_norms)

    assert set(quantizer.packed_masks) == set(expected.packed_masks)
    for name, packed in expected.packed_masks.items():
        assert torch.equal(quantizer.packed_masks[name], packed), name
        mask = unpack_mask(packed, expected.mask_shapes[name])
        weight = read_weight(model.get_submodule(name))
        assert int((~mask).sum()) == mask.numel() // 2, name
        assert torch.count_nonzero(weight[~mask]) == 0, f"{name}: pruned weights did not reach the offload"
        torch.testing.assert_close(weight, reference.get_submodule(name).weight.detach(), rtol=1e-5, atol=1e-6)
    assert offloaded_layer.weight.device.type == "meta"  # offloaded again after pruning

    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_checkpoint_files_are_never_written(checkpoint, calibration_ids, tmp_path):
    # transformers indexes disk-offloaded weights straight into the checkpoint's safetensors file.
    files = sorted(checkpoint.glob("*.safetensors"))
    before = {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    model = load(checkpoint, device_map=EXPLICIT_MAP, offload_folder=tmp_path / "offload")
    prune(model, "sparsegpt", "unstructured", calibration_ids, None)
    assert {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files} == before
    assert any((tmp_path / "offload").glob("model.layers.1.*.weight.dat"))


def test_one_block_onloaded_at_a_time(checkpoint, calibration_ids, tmp_path):
    model = load(checkpoint, device_map=ALL_ON_DISK, offload_folder=tmp_path / "offload")
    blocks = model.model.layers
    seen = []

    def record(module, inputs):
        seen.append(tuple(block.mlp.up_proj.weight.device.type != "meta" for block in blocks))

    handles = [block.register_forward_pre_hook(record) for block in blocks]
    config = GBLMConfig(method="wanda", sparsity=0.5)
    sparsities = {name: config.sparsity for name in prunable_modules(model)}
    prune_layers(model, calibration_ids, get_method("wanda")(config), sparsities, show_progress=False)
    for handle in handles:
        handle.remove()
    # capture runs the first sequence through both blocks (their own masks and position tables) and the other 3 up
    # to block 0, each block onloaded only inside its own forward; then each block runs twice per sequence
    # (statistics, pruned outputs) with its own weights, and only its own, onloaded
    assert seen == [(False, False)] * (2 + 3) + [(True, False)] * 8 + [(False, True)] * 8
    assert all(block.mlp.up_proj.weight.device.type == "meta" for block in blocks)


def test_gradient_stage_on_an_offloaded_model_asks_for_precomputed_norms(checkpoint, calibration_ids, tmp_path):
    model = load(checkpoint, device_map=EXPLICIT_MAP, offload_folder=tmp_path / "offload")
    before = read_weight(model.model.layers[1].mlp.up_proj)
    with pytest.raises(ValueError, match="gradient_norms=") as error:
        GBLMPruner(GBLMConfig(method="gblm"), show_progress=False).prune(model, calibration_ids)
    assert "model.layers.1." in str(error.value)
    assert torch.equal(read_weight(model.model.layers[1].mlp.up_proj), before)


def test_disk_offload_without_an_offload_folder_is_refused_before_pruning(checkpoint, calibration_ids):
    model = load(checkpoint, device_map=EXPLICIT_MAP)  # loads: its disk weights are read from the checkpoint
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    with pytest.raises(ValueError, match="offload_folder"):
        GBLMPruner(GBLMConfig(method="wanda"), show_progress=False).prune(model, calibration_ids)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before)


def test_offloaded_pruned_model_saves_and_reloads(checkpoint, calibration_ids, tmp_path):
    reference = load(checkpoint)
    prune(reference, "wanda", "2:4", calibration_ids, None)
    model = load(checkpoint, device_map=EXPLICIT_MAP, offload_folder=tmp_path / "offload")
    prune(model, "wanda", "2:4", calibration_ids, None)
    # apply_masks writes through to the offload too (a no-op here: the weights already obey the masks)
    apply_masks(model)
    model.save_pretrained(tmp_path / "pruned")
    reloaded = load(tmp_path / "pruned")  # in memory; the masks are checked against the weights on load
    for name, module in prunable_modules(reference).items():
        assert torch.equal(reloaded.get_submodule(name).weight, module.weight), name
    assert torch.equal(reloaded.hf_quantizer.packed_masks["model.layers.1.mlp.up_proj"],
                       reference.hf_quantizer.packed_masks["model.layers.1.mlp.up_proj"])


def test_owl_profile_on_an_offloaded_model_equals_in_memory(checkpoint, calibration_ids, tmp_path):
    config = GBLMConfig(method="wanda", sparsity=0.5, sparsity_profile="owl")
    reference, model = load(checkpoint), load(checkpoint, device_map=EXPLICIT_MAP, offload_folder=tmp_path / "offload")
    for target in (reference, model):
        GBLMPruner(config, show_progress=False).prune(target, calibration_ids)
    assert model.config.quantization_config.record.layer_sparsity == reference.config.quantization_config.record.layer_sparsity
    for name, packed in reference.hf_quantizer.packed_masks.items():
        assert torch.equal(model.hf_quantizer.packed_masks[name], packed), name


def test_cpu_offloaded_weights_are_overwritten_in_place():
    # With an accelerator, "cpu" blocks keep their weights in the loader's state dict and the onloaded copy is
    # another tensor (on this CPU-only machine the two alias, so the end-to-end tests cannot tell).
    stored = torch.ones(2, 3)
    loader = OffloadedWeightsLoader(state_dict={"model.layers.0.mlp.up_proj.weight": stored})
    store_offloaded(PrefixedDataset(loader, "model.layers.0.mlp.up_proj."), "weight", torch.zeros(2, 3))
    assert loader["model.layers.0.mlp.up_proj.weight"] is stored
    assert torch.equal(stored, torch.zeros(2, 3))


def test_compute_device_on_a_dispatched_model_is_refused_before_pruning(checkpoint, calibration_ids, tmp_path):
    # accelerate's hooks place (and onload) each block already: moving blocks as well would fight them.
    model = load(checkpoint, device_map=EXPLICIT_MAP, offload_folder=tmp_path / "offload")
    before = read_weight(model.model.layers[1].mlp.up_proj)
    config = GBLMConfig(method="wanda", sparsity=0.5)
    with pytest.raises(ValueError, match=r"dispatched by accelerate.*Drop compute_device \(--compute-device\)"):
        GBLMPruner(config, show_progress=False, compute_device="cpu").prune(model, calibration_ids)
    with pytest.raises(ValueError, match="dispatched by accelerate"):  # the engine's own passes refuse it too
        sparsities = {name: 0.5 for name in prunable_modules(model)}
        prune_layers(model, calibration_ids, get_method("wanda")(config), sparsities, show_progress=False, device="cpu")
    assert getattr(model, "hf_quantizer", None) is None
    assert torch.equal(read_weight(model.model.layers[1].mlp.up_proj), before)
    assert model.model.layers[1].mlp.up_proj.weight.device.type == "meta"
