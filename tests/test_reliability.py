"""Interrupted runs, atomic outputs, hostile input."""

import errno
import functools
import hashlib
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import sample_text, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from optimum_gblm import GBLMConfig, GBLMPruner, load_model
from optimum_gblm.gradients import cache_key, cached_gradient_norms, compute_gradient_norms
from optimum_gblm.structure import prunable_modules

TESTS = Path(__file__).resolve().parent


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a test's child process: conftest importable, the caller's PYTHONPATH kept."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def run_killed(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run a script that SIGKILLs itself at a chosen moment, as a crash or `kill -9` would."""
    path = tmp_path / "victim.py"
    path.write_text(textwrap.dedent(script))
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=child_env(), timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    return done


def test_killed_gradient_stage_resumes_and_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    run_killed(f"""
        import os, signal, torch
        from conftest import tiny_model
        from optimum_gblm.structure import prunable_modules
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
        from optimum_gblm import checkpoint
        from optimum_gblm.checkpoint import save_pretrained_atomically
        model = tiny_model("llama", seed=1)
        GBLMPruner(GBLMConfig(method="magnitude")).prune(model)
        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        # killed after the weights are written, before the masks
        checkpoint.write_masks = die
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

    def reached(*args, **kwargs):
        raise _LoadReached

    # What the CLI runs once the values are accepted (it loads the model first).
    monkeypatch.setattr(cli, "prune_and_save", reached)
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
        from optimum_gblm.structure import prunable_modules
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
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=child_env(), timeout=300)
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


# -- round two: check before writing, distrust caches, keep folders safe ------------------------------------------
def pruned_model(seed: int = 0):
    model = tiny_model("llama", seed=seed)
    GBLMPruner(GBLMConfig(method="magnitude", pattern="2:4")).prune(model)
    return model


def leftovers(folder: Path, name: str = "ckpt") -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


def same_weights(folder: Path, model) -> bool:
    loaded = AutoModelForCausalLM.from_pretrained(folder)  # masks read back and verified
    expected = model.state_dict()
    return all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())


def test_overwrite_replaces_a_checkpoint_but_never_a_folder_of_other_files(tmp_path):
    from optimum_gblm.checkpoint import save_pretrained_atomically

    notes = tmp_path / "notes"
    (notes / "data").mkdir(parents=True)
    (notes / "todo.txt").write_text("precious")
    (notes / "data" / "table.csv").write_text("1,2\n")
    (notes / "config.json").write_text("{}")  # a config.json alone does not make a checkpoint
    before = digest(notes)
    model = pruned_model()
    with pytest.raises(ValueError, match=r"is not a model checkpoint .*choose another folder, or move those files"):
        save_pretrained_atomically(model, notes, overwrite=True)
    assert digest(notes) == before
    # GBLMPruner.quantize refuses before pruning (prune_and_save, the CLI and the examples run the same check)
    dense = tiny_model("llama")
    weights = {k: v.clone() for k, v in dense.state_dict().items()}
    pruner = GBLMPruner.from_pretrained(dense, config=GBLMConfig(method="magnitude"), show_progress=False)
    with pytest.raises(ValueError, match="is not a model checkpoint"):
        pruner.quantize(notes, overwrite=True)
    assert all(torch.equal(v, weights[k]) for k, v in dense.state_dict().items()), "refused before pruning"
    assert digest(notes) == before and not leftovers(tmp_path, "notes")
    # a checkpoint is replaced whole (checkpoint files of the old one included), and so is an empty folder
    target = tmp_path / "ckpt"
    save_pretrained_atomically(model, target)
    (target / "tokenizer.json").write_text("{}")  # a file a save writes: part of the old checkpoint
    other = pruned_model(seed=1)
    save_pretrained_atomically(other, target, overwrite=True)
    assert not (target / "tokenizer.json").exists() and same_weights(target, other)
    # ...but a checkpoint folder that also holds other things (a clone's .git, training state, notes) is refused
    (target / ".git").mkdir()
    (target / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (target / "optimizer.pt").write_text("state")
    before = digest(target)
    with pytest.raises(ValueError, match=r"files a checkpoint save does not write \(.git, optimizer.pt\)"):
        save_pretrained_atomically(model, target, overwrite=True)
    assert digest(target) == before
    (tmp_path / "empty").mkdir()
    save_pretrained_atomically(other, tmp_path / "empty", overwrite=True)
    assert same_weights(tmp_path / "empty", other)


# A full disk: a tmpfs of a few pages of our own, in a private mount namespace (`unshare -rm`: nothing to unmount,
# no privileges needed where user namespaces are allowed). Where none can be mounted, every safetensors write under
# $DISK fails the way safetensors fails on a full disk (a SafetensorError, which is no OSError).
FULL_DISK_PRELUDE = """
import os
if os.environ.get("INJECT_FULL_DISK"):
    import safetensors.torch
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def failing(real):
        def save_file(tensors, filename, *args, **kwargs):
            if os.path.abspath(str(filename)).startswith(os.environ["DISK"]):
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real(tensors, filename, *args, **kwargs)
        return save_file

    safetensors.torch.save_file = failing(safetensors.torch.save_file)
    transformers.modeling_utils.safe_save_file = failing(transformers.modeling_utils.safe_save_file)
"""


@functools.lru_cache(maxsize=1)
def can_mount_tmpfs() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(folder)}"],
                              capture_output=True, timeout=60)
    return done.returncode == 0


def run_on_full_disk(script: str, tmp_path: Path, size: int, setup: str = "true") -> subprocess.CompletedProcess:
    """Run `script` with $DISK a folder on a disk of `size` bytes; `setup` (shell) runs first, on that disk."""
    disk = tmp_path / "disk"
    disk.mkdir()
    path = tmp_path / "on_full_disk.py"
    path.write_text(FULL_DISK_PRELUDE + textwrap.dedent(script))
    python = f"exec {shlex.quote(sys.executable)} {shlex.quote(str(path))}"
    if can_mount_tmpfs():
        env = child_env(DISK=str(disk))
        command = ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(disk))} && {setup} && {python}"]
    else:
        env = child_env(DISK=str(disk), INJECT_FULL_DISK="1")
        command = ["sh", "-c", f"{setup} && {python}"]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)


def disk_usage(folder: Path) -> int:
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file())


def test_a_full_disk_is_an_enospc_error_that_keeps_the_checkpoint_in_library_and_cli(tmp_path, tokenizer):
    from optimum_gblm.checkpoint import save_pretrained_atomically

    reference = tmp_path / "reference"
    save_pretrained_atomically(pruned_model(), reference, tokenizer=tokenizer)
    base = tmp_path / "base"
    tiny_model("llama", seed=1).save_pretrained(base)
    tokenizer.save_pretrained(base)
    (tmp_path / "text.txt").write_text(sample_text(800))
    # room for the existing checkpoint and not for a second copy of its weights
    size = disk_usage(reference) + 48 * 1024
    done = run_on_full_disk(f"""
        import json, sys
        from conftest import tiny_model
        from test_reliability import digest, pruned_model
        from optimum_gblm.checkpoint import save_pretrained_atomically
        from pathlib import Path
        target = Path(os.environ["DISK"]) / "ckpt"
        try:
            save_pretrained_atomically(pruned_model(seed=1), target, overwrite=True)
        except OSError as error:
            print(json.dumps({{"errno": error.errno, "message": str(error)}}))
        from optimum_gblm import cli
        status = cli.main(["prune", "--model", {str(base)!r}, "--calibration", {str(tmp_path / "text.txt")!r},
                           "--num-samples", "4", "--seqlen", "16", "--method", "magnitude", "--output", str(target),
                           "--cache-dir", {str(tmp_path / "cache")!r}, "--overwrite"])
        print(json.dumps({{"status": status, "digest": digest(target), "beside": sorted(os.listdir(target.parent))}}))
    """, tmp_path, size, setup=f"cp -r {shlex.quote(str(reference))} \"$DISK/ckpt\"")
    assert done.returncode == 0, done.stderr[-3000:]
    library, cli_run = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert library["errno"] == errno.ENOSPC
    assert "disk is full" in library["message"] and "free some space" in library["message"]
    assert "the existing checkpoint there was left as it was" in library["message"]
    assert cli_run["status"] == 2 and "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if "optimum-gblm prune: error:" in line]
    assert "disk is full" in line and "left as it was" in line
    assert cli_run["digest"] == digest(reference), "the existing checkpoint is untouched"
    assert cli_run["beside"] == ["ckpt"], "no staging folder or lock file is left on the full disk"


def test_a_full_gradient_cache_disk_warns_and_the_run_goes_on(tmp_path):
    done = run_on_full_disk("""
        import torch
        from conftest import tiny_model
        from optimum_gblm.structure import prunable_modules
        from optimum_gblm.gradients import cached_gradient_norms, compute_gradient_norms
        model = tiny_model("llama")
        modules = prunable_modules(model)
        ids = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(3))
        # progress saved after every sequence: each save fails too
        norms = cached_gradient_norms(model, ids, modules, cache_dir=os.environ["DISK"], show_progress=False,
                                      progress_seconds=0)
        expected = compute_gradient_norms(model, ids, modules, show_progress=False)
        assert all(torch.equal(norms[n], expected[n]) for n in expected)
        print("LEFT", sorted(os.listdir(os.environ["DISK"])))
    """, tmp_path, 16 * 1024)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "could not write gradient cache" in done.stderr and "the disk is full" in done.stderr
    assert "could not save gradient progress" in done.stderr
    assert done.stdout.strip().splitlines()[-1] == "LEFT []", "no temporary file or lock is left behind"


@pytest.mark.parametrize("overwrite", [True, False])
def test_two_saves_into_one_folder_at_once_end_with_one_complete_checkpoint(tmp_path, monkeypatch, overwrite):
    """The second save runs whole inside the first one, between its weights and its masks (a forced interleaving):
    it must not remove the first one's staging folder, and the first one must see that the folder is taken."""
    from optimum_gblm import checkpoint
    from optimum_gblm.checkpoint import save_pretrained_atomically

    target = tmp_path / "ckpt"
    first, second = pruned_model(seed=0), pruned_model(seed=1)
    seen = {}

    write_masks = checkpoint.write_masks

    def second_save_meanwhile(model, folder):
        if model is first and not seen:
            owners = [p.read_text().split()[0] for p in tmp_path.glob(".ckpt.tmp-*.lock")]
            seen["owners"] = owners
            seen["second"] = save_pretrained_atomically(second, target, overwrite=overwrite)
        return write_masks(model, folder)

    monkeypatch.setattr(checkpoint, "write_masks", second_save_meanwhile)
    if overwrite:
        save_pretrained_atomically(first, target, overwrite=True)
        winner = first  # the later save wins
    else:
        with pytest.raises(ValueError, match="already holds files"):
            save_pretrained_atomically(first, target)
        winner = second
    assert same_weights(target, winner), "one complete checkpoint, the winner's"
    assert not leftovers(tmp_path)
    assert seen["owners"] == [str(os.getpid())], "the first save's staging folder named its owner"


def test_only_leftovers_of_dead_saves_are_removed(tmp_path):
    from optimum_gblm.checkpoint import save_pretrained_atomically
    from optimum_gblm.files import OwnerLock

    live = tmp_path / ".ckpt.tmp-live"
    live.mkdir()
    lock = OwnerLock(f"{live}.lock")
    assert lock.acquire(blocking=False)  # a save in progress (its owner alive: this process)
    dead = tmp_path / ".ckpt.tmp-dead"
    dead.mkdir()
    Path(f"{dead}.lock").write_text("12345 elsewhere\n")  # its owner died: nobody holds the lock
    (tmp_path / ".ckpt.tmp-old").mkdir()  # an earlier version's leftover: no lock file at all
    save_pretrained_atomically(pruned_model(), tmp_path / "ckpt")
    assert leftovers(tmp_path) == [".ckpt.tmp-live", ".ckpt.tmp-live.lock"]
    lock.release()  # its owner is done (or died): the next save removes the folder
    save_pretrained_atomically(pruned_model(), tmp_path / "ckpt", overwrite=True)
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("recovery", ["next save", "recover_interrupted_save"])
def test_a_save_killed_between_the_two_renames_is_undone_by_the_next_save(tmp_path, recovery):
    from optimum_gblm.checkpoint import save_pretrained_atomically

    target = (tmp_path / "ckpt").resolve()
    save_pretrained_atomically(pruned_model(), target)
    before = digest(target)
    run_killed(f"""
        import os, signal
        from test_reliability import pruned_model
        from optimum_gblm import checkpoint
        model = pruned_model(seed=1)
        checkpoint._rename_exchange = lambda first, second: False  # a system without an exchange rename
        rename = os.replace
        def replace(source, destination):
            rename(source, destination)
            if os.fspath(source) == {str(target)!r}:  # the old checkpoint was moved aside, the new one not yet in
                os.kill(os.getpid(), signal.SIGKILL)
        os.replace = replace
        checkpoint.save_pretrained_atomically(model, {str(target)!r}, overwrite=True)
    """, tmp_path)
    assert not target.exists(), "the kill left no checkpoint at the target (what the next save must undo)"
    if recovery == "next save":
        # The next save first puts the previous checkpoint back: without overwrite it is then refused.
        with pytest.raises(ValueError, match="already holds files"):
            save_pretrained_atomically(pruned_model(seed=2), target)
    else:
        from optimum_gblm.checkpoint import recover_interrupted_save

        assert recover_interrupted_save(target)
    assert digest(target) == before and same_weights(target, pruned_model())
    assert not leftovers(tmp_path)
    other = pruned_model(seed=2)
    save_pretrained_atomically(other, target, overwrite=True)
    assert same_weights(target, other) and not leftovers(tmp_path)


def exchange_rename_works_here(folder: Path) -> bool:
    from optimum_gblm import checkpoint

    (folder / "a").mkdir()
    (folder / "b").mkdir()
    try:
        return checkpoint._rename_exchange(folder / "a", folder / "b")
    finally:
        shutil.rmtree(folder / "a")
        shutil.rmtree(folder / "b")


def test_on_linux_a_kill_during_the_swap_always_leaves_a_checkpoint(tmp_path):
    from optimum_gblm.checkpoint import save_pretrained_atomically

    if not exchange_rename_works_here(tmp_path):
        pytest.skip("no exchange rename (renameat2 RENAME_EXCHANGE) on this system; the test above covers the fallback")
    target = (tmp_path / "ckpt").resolve()
    save_pretrained_atomically(pruned_model(), target)
    run_killed(f"""
        import os, signal
        from test_reliability import pruned_model
        from optimum_gblm import checkpoint
        exchange = checkpoint._rename_exchange
        def exchange_then_die(first, second):
            assert exchange(first, second)
            os.kill(os.getpid(), signal.SIGKILL)  # the old checkpoint not yet removed
        checkpoint._rename_exchange = exchange_then_die
        checkpoint.save_pretrained_atomically(pruned_model(seed=1), {str(target)!r}, overwrite=True)
    """, tmp_path)
    assert same_weights(target, pruned_model(seed=1)), "one step swapped the new checkpoint in"
    save_pretrained_atomically(pruned_model(seed=2), target, overwrite=True)
    assert same_weights(target, pruned_model(seed=2)) and not leftovers(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_checkpoints_get_the_permissions_of_a_plain_save(tmp_path, umask):
    from optimum_gblm.checkpoint import save_pretrained_atomically

    def modes(folder: Path) -> dict[str, int]:
        return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}

    previous = os.umask(umask)
    try:
        model = pruned_model()
        model.save_pretrained(tmp_path / "plain")
        save_pretrained_atomically(model, tmp_path / "atomic")  # what the CLI and the examples call
        pruner = GBLMPruner.from_pretrained(tiny_model("llama"), config=GBLMConfig(method="magnitude", pattern="2:4"))
        pruner.quantize(tmp_path / "quantized")
    finally:
        os.umask(previous)
    plain = modes(tmp_path / "plain")
    assert plain["."] == 0o777 & ~umask
    assert plain["gblm_masks.safetensors"] == plain["README.md"] == plain["config.json"] == 0o666 & ~umask
    assert modes(tmp_path / "atomic") == plain
    assert modes(tmp_path / "quantized") == plain
