import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, weights_of

from optimum_gblm import GBLMConfig, GBLMPruner
from optimum_gblm import gradients as gradients_module
from optimum_gblm.gradients import (
    cached_gradient_norms,
    compute_gradient_norms,
    load_gradient_norms,
    save_gradient_norms,
)
from optimum_gblm.structure import prunable_modules


def naive_norms(model, ids, modules, norm, scale):
    """Per-sample autograd, the whole gradient kept, then reduced: the definition, written plainly."""
    per_sample = {name: [] for name in modules}
    for i in range(ids.shape[0]):
        model.zero_grad()
        model(input_ids=ids[i : i + 1], labels=ids[i : i + 1]).loss.backward()
        for name, module in modules.items():
            per_sample[name].append(module.weight.grad.detach().clone() * scale)
    model.zero_grad()
    if norm == "l1":
        return {n: torch.stack(g).abs().sum(0) for n, g in per_sample.items()}
    return {n: torch.stack(g).pow(2).sum(0).sqrt() for n, g in per_sample.items()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_streamed_accumulation_equals_naive_autograd(family, norm, calibration_ids):
    model = tiny_model(family)
    modules = prunable_modules(model)
    streamed = compute_gradient_norms(model, calibration_ids, modules, norm=norm, scale=100.0, show_progress=False)
    reference = naive_norms(model, calibration_ids, modules, norm, 100.0)
    assert set(streamed) == set(reference)
    for name in reference:
        assert streamed[name].dtype == torch.float32
        torch.testing.assert_close(streamed[name], reference[name], rtol=1e-5, atol=1e-6)
        assert streamed[name].abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_norms(calibration_ids):
    model = tiny_model("llama")
    modules = prunable_modules(model)
    plain = compute_gradient_norms(model, calibration_ids, modules, show_progress=False)
    checkpointed = compute_gradient_norms(model, calibration_ids, modules, gradient_checkpointing=True, show_progress=False)
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-5, atol=1e-6)
    assert not model.is_activation_checkpointing and not model.training


def test_gradient_stage_leaves_the_model_as_it_was(calibration_ids):
    model = tiny_model("llama")
    before = weights_of(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    compute_gradient_norms(model, calibration_ids, prunable_modules(model), show_progress=False)
    after = weights_of(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_nan_gradients_name_the_layer(calibration_ids):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"model\.layers\.\d\..*NaN or inf.*float32"):
        compute_gradient_norms(model, calibration_ids, prunable_modules(model), show_progress=False)


def test_cache_is_reused_and_invalidated(tmp_path, calibration_ids, monkeypatch):
    model = tiny_model("llama")
    modules = prunable_modules(model)
    calls = []
    real = gradients_module.compute_gradient_norms

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gradients_module, "compute_gradient_norms", counting)
    first = cached_gradient_norms(model, calibration_ids, modules, cache_dir=tmp_path, show_progress=False)
    second = cached_gradient_norms(model, calibration_ids, modules, cache_dir=tmp_path, show_progress=False)
    assert len(calls) == 1 and len(list(tmp_path.glob("*.safetensors"))) == 1
    assert all(torch.equal(first[n], second[n]) for n in first)
    # other data, other norm, other scale, other weights: each recomputes
    cached_gradient_norms(model, calibration_ids.flip(0), modules, cache_dir=tmp_path, show_progress=False)
    cached_gradient_norms(model, calibration_ids, modules, norm="l2", cache_dir=tmp_path, show_progress=False)
    cached_gradient_norms(model, calibration_ids, modules, scale=10.0, cache_dir=tmp_path, show_progress=False)
    other = tiny_model("llama", seed=1)
    cached_gradient_norms(other, calibration_ids, prunable_modules(other), cache_dir=tmp_path, show_progress=False)
    assert len(calls) == 5 and len(list(tmp_path.glob("*.safetensors"))) == 5
    assert not list(tmp_path.glob("*.tmp"))


def test_pruning_at_two_sparsities_computes_gradients_once(tmp_path, calibration_ids, monkeypatch):
    calls = []
    real = gradients_module.compute_gradient_norms
    monkeypatch.setattr(gradients_module, "compute_gradient_norms", lambda *a, **k: calls.append(1) or real(*a, **k))
    base = tiny_model("llama")
    for sparsity, pattern in [(0.5, "unstructured"), (0.5, "2:4"), (0.7, "unstructured")]:
        model = tiny_model("llama")
        GBLMPruner(GBLMConfig(sparsity=sparsity, pattern=pattern), cache_dir=tmp_path, show_progress=False).prune(model, calibration_ids)
    assert len(calls) == 1
    del base


def test_damaged_cache_entry_is_recomputed(tmp_path, calibration_ids):
    model = tiny_model("llama")
    modules = prunable_modules(model)
    first = cached_gradient_norms(model, calibration_ids, modules, cache_dir=tmp_path, show_progress=False)
    (entry,) = tmp_path.glob("*.safetensors")
    entry.write_bytes(b"not a safetensors file")
    again = cached_gradient_norms(model, calibration_ids, modules, cache_dir=tmp_path, show_progress=False)
    assert all(torch.equal(first[n], again[n]) for n in first)


def test_norms_from_another_model_are_refused(tmp_path, calibration_ids):
    small = tiny_model("llama")
    norms = compute_gradient_norms(small, calibration_ids, prunable_modules(small), show_progress=False)
    save_gradient_norms(norms, tmp_path / "norms.safetensors")
    import transformers

    wider = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)
    )
    before = weights_of(wider)
    with pytest.raises(ValueError, match="shape .* from another model"):
        load_gradient_norms(tmp_path / "norms.safetensors", prunable_modules(wider))
    with pytest.raises(ValueError, match="another model"):
        GBLMPruner(GBLMConfig(), show_progress=False).prune(wider, calibration_ids, gradient_norms=tmp_path / "norms.safetensors")
    assert all(torch.equal(before[k], v) for k, v in weights_of(wider).items())


def test_gradient_stage_refuses_a_model_that_still_carries_masks(calibration_ids):
    from optimum_gblm import prune
    from optimum_gblm.sparse_state import restore_dense

    model = tiny_model("llama")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    prune(model, calibration_ids, method="wanda", pattern="2:4", show_progress=False)
    model.load_state_dict(dense)  # dense weights back, but the 2:4 mask hooks remain
    modules = prunable_modules(model)
    with pytest.raises(ValueError, match="detach_masks"):
        compute_gradient_norms(model, calibration_ids, modules, show_progress=False)
    restore_dense(model, dense)
    fresh = tiny_model("llama")
    expected = compute_gradient_norms(fresh, calibration_ids, prunable_modules(fresh), show_progress=False)
    norms = compute_gradient_norms(model, calibration_ids, modules, show_progress=False)
    assert all(torch.equal(norms[n], expected[n]) for n in expected)


# -- a cache shared between processes -----------------------------------------------------------------------------
def counting_compute(monkeypatch) -> list:
    calls = []
    real = gradients_module.compute_gradient_norms
    monkeypatch.setattr(gradients_module, "compute_gradient_norms", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def partial_after(model, ids, modules, cache, completed: int) -> bytes:
    """The partial file of a run interrupted after `completed` sequences (progress saved after every one)."""
    calls = []

    def stop(module, args):
        calls.append(1)
        if len(calls) > completed:
            raise KeyboardInterrupt

    hook = model.model.layers[0].register_forward_pre_hook(stop)
    with pytest.raises(KeyboardInterrupt):
        cached_gradient_norms(model, ids, modules, cache_dir=cache, show_progress=False, progress_seconds=0)
    hook.remove()
    key = gradients_module.cache_key(model, modules, ids, "l1", 1.0)
    partial = cache / f"{key}.partial.safetensors"
    assert gradients_module.cache_metadata(partial)["completed"] == str(completed)
    data = partial.read_bytes()
    partial.unlink()
    return data


def test_a_partial_file_replaced_while_it_is_read_is_read_whole(tmp_path, monkeypatch):
    """Another process saves its own (later) progress at the exact moment this one has read the partial file's
    metadata: metadata and sums must still come from one file, or the resumed norms count sequences twice."""
    model = tiny_model("llama")
    modules = prunable_modules(model)
    ids = torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(3))
    key = gradients_module.cache_key(model, modules, ids, "l1", 1.0)
    partial = tmp_path / f"{key}.partial.safetensors"
    at_three, at_five = (partial_after(model, ids, modules, tmp_path, n) for n in (3, 5))
    partial.write_bytes(at_three)
    real_open = gradients_module.safe_open
    replaced = []

    class OtherProcessWritesAfterEachRead:
        def __init__(self, path, *args, **kwargs):
            self.path, self.handle = str(path), real_open(path, *args, **kwargs)

        def __enter__(self):
            return self.handle.__enter__()

        def __exit__(self, *exc):
            result = self.handle.__exit__(*exc)
            if self.path == str(partial) and not replaced:
                replaced.append(1)
                (tmp_path / "other").write_bytes(at_five)
                os.replace(tmp_path / "other", partial)  # written atomically, as every cache file is
            return result

    monkeypatch.setattr(gradients_module, "safe_open", OtherProcessWritesAfterEachRead)
    norms = cached_gradient_norms(model, ids, modules, cache_dir=tmp_path, show_progress=False)
    assert replaced
    expected = compute_gradient_norms(model, ids, modules, show_progress=False)
    for name in expected:
        torch.testing.assert_close(norms[name], expected[name], rtol=1e-6, atol=1e-7)
    monkeypatch.undo()
    cached = gradients_module.load_gradient_norms(tmp_path / f"{key}.safetensors", modules)
    assert all(torch.equal(cached[n], norms[n]) for n in expected), "what was cached is what was returned"


def test_a_partial_file_removed_by_another_process_does_not_fail_the_run(tmp_path, calibration_ids, monkeypatch):
    model = tiny_model("llama")
    modules = prunable_modules(model)
    key = gradients_module.cache_key(model, modules, calibration_ids, "l1", 1.0)
    partial = tmp_path / f"{key}.partial.safetensors"
    real_unlink = Path.unlink

    def removed_by_another_process_first(self, *args, **kwargs):
        if self == partial and os.path.exists(self):
            os.remove(self)  # the other process finished the same key a moment earlier and cleaned up
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", removed_by_another_process_first)
    # progress is saved after every sequence, so there is a partial file to remove at the end
    norms = cached_gradient_norms(model, calibration_ids, modules, cache_dir=tmp_path, show_progress=False,
                                  progress_seconds=0)
    expected = compute_gradient_norms(model, calibration_ids, modules, show_progress=False)
    assert all(torch.equal(norms[n], expected[n]) for n in expected)
    assert (tmp_path / f"{key}.safetensors").is_file() and not partial.exists()


@pytest.mark.parametrize(
    "metadata, values, trusted",
    [
        ({}, "doubled", False),  # says nothing about what it is
        ({"state": "complete", "key": "another key"}, "doubled", False),  # another key's result, copied or renamed
        ({"state": "partial", "key": "{key}", "completed": "2"}, "doubled", False),  # progress, not a result
        ({"state": "complete", "key": "{key}"}, "nan", False),
        ({"state": "complete", "key": "{key}"}, "negative", False),
        ({"state": "complete", "key": "{key}"}, "doubled", True),  # what a finished run writes: trusted as it is
    ],
)
def test_a_cache_entry_is_trusted_only_when_it_says_it_is_this_keys_result(tmp_path, calibration_ids, monkeypatch,
                                                                           metadata, values, trusted):
    model = tiny_model("llama")
    modules = prunable_modules(model)
    key = gradients_module.cache_key(model, modules, calibration_ids, "l1", 1.0)
    expected = compute_gradient_norms(model, calibration_ids, modules, show_progress=False)
    planted = {n: v * 2 for n, v in expected.items()}
    first = next(iter(planted))
    planted[first][0, 0] = {"doubled": planted[first][0, 0], "nan": float("nan"), "negative": -1.0}[values]
    entry = {k: v.format(key=key) for k, v in metadata.items()}
    save_gradient_norms(planted, tmp_path / f"{key}.safetensors", {"format": "1", **entry})
    calls = counting_compute(monkeypatch)
    norms = cached_gradient_norms(model, calibration_ids, modules, cache_dir=tmp_path, show_progress=False)
    reference = planted if trusted else expected
    assert all(torch.equal(norms[n], reference[n]) for n in expected)
    assert len(calls) == (0 if trusted else 1)


def test_one_process_at_a_time_computes_a_key_and_the_next_reuses_its_result(tmp_path, calibration_ids, monkeypatch):
    from optimum_gblm.files import OwnerLock

    model = tiny_model("llama")
    modules = prunable_modules(model)
    key = gradients_module.cache_key(model, modules, calibration_ids, "l1", 1.0)
    expected = compute_gradient_norms(model, calibration_ids, modules, show_progress=False)
    other = OwnerLock(tmp_path / f"{key}.lock")
    assert other.acquire(blocking=False)  # another process is computing this key
    waited = []

    class OtherFinishesWhileWeWait(OwnerLock):
        def acquire(self, blocking=True):
            if blocking and other.held:  # the moment this process starts waiting, the other one finishes
                waited.append(1)
                save_gradient_norms(expected, tmp_path / f"{key}.safetensors", {"format": "1", "key": key, "state": "complete"})
                other.release()
            return super().acquire(blocking)

    monkeypatch.setattr(gradients_module, "OwnerLock", OtherFinishesWhileWeWait)
    calls = counting_compute(monkeypatch)
    norms = cached_gradient_norms(model, calibration_ids, modules, cache_dir=tmp_path, show_progress=False)
    assert waited and not calls, "it waited for the other process, then reused its result"
    assert all(torch.equal(norms[n], expected[n]) for n in expected)
    assert not (tmp_path / f"{key}.lock").exists()
