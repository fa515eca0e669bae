"""Interrupted runs, atomic outputs, hostile input."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from optimum_gblm import GBLMConfig, GBLMPruner, load_model
from optimum_gblm.engine import prunable_modules
from optimum_gblm.gradients import cache_key, cached_gradient_norms, compute_gradient_norms

TESTS = Path(__file__).resolve().parent


def run_killed(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run a script that SIGKILLs itself at a chosen moment, as a crash or `kill -9` would."""
    path = tmp_path / "victim.py"
    path.write_text(textwrap.dedent(script))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    return done


def test_killed_gradient_stage_resumes_and_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    run_killed(f"""
        import os, signal, torch
        from conftest import tiny_model
        from optimum_gblm.engine import prunable_modules
        from optimum_gblm.gradients import cached_gradient_norms
        model = tiny_model("llama")
        ids = torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(3))
        calls = []
        def die_on_fifth(module, args):
            calls.append(1)
            if len(calls) == 5:
                os.kill(os.getpid(), signal.SIGKILL)
        model.model.layers[0].register_forward_pre_hook(die_on_fifth)
        cached_gradient_norms(model, ids, prunable_modules(model), norm="l2", cache_dir={str(cache)!r},
                              show_progress=False, progress_seconds=0)
    """, tmp_path)
    model = tiny_model("llama")
    modules = prunable_modules(model)
    ids = torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(3))
    key = cache_key(model, modules, ids, "l2", 1.0)
    assert (cache / f"{key}.partial.safetensors").is_file()
    assert not (cache / f"{key}.safetensors").exists(), "a partial run must never look complete"

    seen = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(1))
    resumed = cached_gradient_norms(model, ids, modules, norm="l2", cache_dir=cache, show_progress=False)
    hook.remove()
    assert len(seen) == 2, "only the two sequences after the last saved one are recomputed"
    assert not (cache / f"{key}.partial.safetensors").exists() and (cache / f"{key}.safetensors").is_file()
    uninterrupted = compute_gradient_norms(model, ids, modules, norm="l2", show_progress=False)
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=1e-6, atol=1e-7)


def test_partial_state_for_other_settings_is_not_used(tmp_path, calibration_ids):
    model = tiny_model("llama")
    modules = prunable_modules(model)
    key = cache_key(model, modules, calibration_ids, "l1", 1.0)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / f"{key}.partial.safetensors").write_bytes(b"garbage")
    norms = cached_gradient_norms(model, calibration_ids, modules, cache_dir=tmp_path, show_progress=False)
    expected = compute_gradient_norms(model, calibration_ids, modules, show_progress=False)
    assert all(torch.equal(norms[n], expected[n]) for n in norms)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_killed_save_leaves_the_existing_checkpoint_intact(tmp_path):
    target = tmp_path / "ckpt"
    model = tiny_model("llama")
    GBLMPruner(GBLMConfig(method="magnitude", pattern="2:4")).prune(model)
    from optimum_gblm.checkpoint import save_pretrained_atomically

    save_pretrained_atomically(model, target)
    before = digest(target)
    run_killed(f"""
        import os, signal
        from conftest import tiny_model
        from optimum_gblm import GBLMConfig, GBLMPruner
        from optimum_gblm import checkpoint, sparse_state
        from optimum_gblm.checkpoint import save_pretrained_atomically
        model = tiny_model("llama", seed=1)
        GBLMPruner(GBLMConfig(method="magnitude")).prune(model)
        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        # killed after the weights are written, before the masks
        sparse_state.SAVE_HOOKS[sparse_state.SAVE_HOOKS.index(checkpoint.write_masks)] = die
        save_pretrained_atomically(model, {str(target)!r}, overwrite=True)
    """, tmp_path)
    assert digest(target) == before, "the old checkpoint must be untouched"
    AutoModelForCausalLM.from_pretrained(target)  # and still loads, verified
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.tmp-")]
    assert leftovers, "the killed save left its staging folder (a hidden sibling, never the checkpoint)"
    # a rerun completes and cleans up after the crash
    other = tiny_model("llama", seed=1)
    GBLMPruner(GBLMConfig(method="magnitude")).prune(other)
    save_pretrained_atomically(other, target, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.")]
    reloaded = AutoModelForCausalLM.from_pretrained(target)
    assert torch.equal(reloaded.model.layers[0].mlp.up_proj.weight, other.model.layers[0].mlp.up_proj.weight)


def test_pickled_checkpoints_are_not_loaded(tmp_path):
    model = tiny_model("llama")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle: loading it could run code
    model.config.save_pretrained(tmp_path)
    with pytest.raises(OSError, match="safetensors"):
        load_model(str(tmp_path))


def test_edited_recipe_or_sparsity_in_config_json_is_detected(tmp_path):
    model = tiny_model("llama")
    GBLMPruner(GBLMConfig(method="magnitude", pattern="2:4")).prune(model)
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    original = config_path.read_text()
    config = json.loads(original)
    config["quantization_config"]["pattern"] = "4:8"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="recipe .* altered"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    config = json.loads(original)
    name = next(iter(config["quantization_config"]["record"]["layer_sparsity"]))
    config["quantization_config"]["record"]["layer_sparsity"][name] = 0.25
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"layer_sparsity in config.json says 0.25 for {name}"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


# -- fuzzing ----------------------------------------------------------------------------------------------------
anything = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.one_of(st.text(max_size=6), st.integers()), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)
FIELDS = ["method", "sparsity", "pattern", "gradient_norm", "alpha", "gradient_scale", "num_samples", "seqlen", "seed",
          "target_modules", "use_variant", "scope", "dataset", "tokenizer", "gradient_checkpointing", "calibration",
          "global_sparsity", "layer_sparsity", "layer_alpha", "masks_file", "masks_checksum", "evaluation", "base_model", "bogus"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(FIELDS), anything, max_size=5))
def test_from_dict_gives_a_config_or_a_clear_value_error(values):
    try:
        config = GBLMConfig.from_dict(values)
    except ValueError as error:
        assert str(error) and "Traceback" not in str(error)
    else:
        assert GBLMConfig.from_dict(config.to_dict()) == config


class _LoadReached(Exception):
    pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    sparsity=st.one_of(st.text(max_size=5), st.floats(-2, 2).map(str)),
    pattern=st.one_of(st.sampled_from(["2:4", "4:8", "1:4", "unstructured", "4:2", "0:4", "a:b", ":", ""]), st.text(max_size=5)),
    samples=st.one_of(st.integers(-3, 5).map(str), st.text(max_size=3)),
    method=st.one_of(st.sampled_from(["gblm", "wanda", "magnitude", "nope"]), st.text(max_size=4)),
)
def test_cli_rejects_malformed_values_cleanly(tmp_path, monkeypatch, capsys, sparsity, pattern, samples, method):
    from optimum_gblm import cli

    def reached(args):
        raise _LoadReached

    monkeypatch.setattr(cli, "_load", reached)
    argv = ["prune", "--model", "m", "--sparsity", sparsity, "--pattern", pattern, "--num-samples", samples,
            "--method", method, "--output", str(tmp_path / "out")]
    try:
        status = cli.main(argv)
    except SystemExit as exit:  # argparse: a usage line and the bad option, exit status 2
        assert exit.code == 2
        assert "error:" in capsys.readouterr().err
        return
    except _LoadReached:
        GBLMConfig(method=method, sparsity=float(sparsity), pattern=pattern, num_samples=int(samples))
        return
    assert status == 2
    err = capsys.readouterr().err
    assert "optimum-gblm prune: error:" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_kill_or_ctrl_c_saves_progress_at_the_last_completed_sequence(tmp_path, signal_name):
    cache = tmp_path / "cache"
    path = tmp_path / "victim.py"
    path.write_text(textwrap.dedent(f"""
        import os, signal, torch
        from conftest import tiny_model
        from optimum_gblm.engine import prunable_modules
        from optimum_gblm.gradients import cached_gradient_norms
        model = tiny_model("llama")
        ids = torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(3))
        calls = []
        def interrupt_third(module, args):
            calls.append(1)
            if len(calls) == 3:  # arrives in the middle of sequence 3
                os.kill(os.getpid(), signal.{signal_name})
        model.model.layers[0].register_forward_pre_hook(interrupt_third)
        cached_gradient_norms(model, ids, prunable_modules(model), cache_dir={str(cache)!r}, show_progress=False,
                              progress_seconds=10**6)
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    model = tiny_model("llama")
    modules = prunable_modules(model)
    ids = torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(3))
    key = cache_key(model, modules, ids, "l1", 1.0)
    from optimum_gblm.gradients import cache_metadata

    assert cache_metadata(cache / f"{key}.partial.safetensors")["completed"] == "3"
    seen = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(1))
    resumed = cached_gradient_norms(model, ids, modules, cache_dir=cache, show_progress=False)
    hook.remove()
    assert len(seen) == 3
    expected = compute_gradient_norms(model, ids, modules, show_progress=False)
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-6, atol=1e-7)
