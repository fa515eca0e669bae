"""`compute_device`: the layer-wise pass moves each decoder block to the compute device for its turn and back, as
optimum's GPTQQuantizer does, leaving everything else where it is.

This machine may have no GPU, so the movement itself is checked on a fake compute device: moves to the meta device
are recorded instead of done (blocks and activations stay real CPU tensors), which shows what the engine moves, when,
and where it puts it back. With a GPU, the last test runs the real thing.
"""

import pytest
import torch
import transformers
from conftest import FAMILIES, VOCAB, tiny_model, weights_of
from torch import nn

from optimum_gblm import GBLMConfig, GBLMPruner, load_model, modeling, pruner
from optimum_gblm import engine as engine_module
from optimum_gblm.config import PruningRuntime
from optimum_gblm.layer_masks import prune_layers
from optimum_gblm.placement import NO_COMPUTE_DEVICE, check_compute_device, compute_on
from optimum_gblm.registry import METHODS, get_method
from optimum_gblm.structure import find_decoder_blocks, prunable_modules

FAKE = torch.device("meta")


def prune(model, ids, cache_dir, **kwargs):
    runtime = {k: kwargs.pop(k) for k in ("compute_device",) if k in kwargs}
    GBLMPruner(GBLMConfig(**kwargs), cache_dir=cache_dir, show_progress=False, **runtime).prune(model, ids)
    return model


def assert_same_result(model, reference):
    assert set(model.hf_quantizer.packed_masks) == set(reference.hf_quantizer.packed_masks)
    for name, packed in reference.hf_quantizer.packed_masks.items():
        assert torch.equal(model.hf_quantizer.packed_masks[name], packed), name
    for (name, value), expected in zip(weights_of(model).items(), weights_of(reference).values()):
        assert torch.equal(value, expected), name
    assert model.config.quantization_config.record.layer_sparsity == reference.config.quantization_config.record.layer_sparsity


@pytest.mark.parametrize("method", sorted(METHODS))  # every registered method: a new one is covered without new code
def test_compute_device_cpu_equals_the_plain_run(method, calibration_ids, tmp_path):
    reference = prune(tiny_model("llama"), calibration_ids, tmp_path, method=method)
    model = prune(tiny_model("llama"), calibration_ids, tmp_path, method=method, compute_device="cpu")
    assert_same_result(model, reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_compute_device_cpu_equals_the_plain_run_in_every_family(family, calibration_ids, tmp_path):
    recipe = dict(method="sparsegpt", sparsity_profile="owl")  # a measuring pass, then a pass that updates weights
    reference = prune(tiny_model(family), calibration_ids, tmp_path, **recipe)
    model = prune(tiny_model(family), calibration_ids, tmp_path, compute_device="cpu", **recipe)
    assert_same_result(model, reference)


# -- the movement, on a fake compute device ---------------------------------------------------------------------
class Placement:
    """Where the engine has put things: nn.Module.to and the engine's send_to_device are wrapped so that a move to
    the fake device is recorded (and not done), a move elsewhere recorded and done. `events` lists, in order, every
    module move, activation move, block forward and layer visit, each with the blocks then on the fake device."""

    def __init__(self, model, monkeypatch):
        _, self.blocks = find_decoder_blocks(model)
        self.names = {id(m): n for n, m in model.named_modules()}
        self.index = {id(b): i for i, b in enumerate(self.blocks)}
        self.on_fake: set[int] = set()
        self.events: list[tuple] = []
        real_to, real_send, real_visit = nn.Module.to, engine_module.send_to_device, engine_module._visit_and_store

        def to(module, *args, **kwargs):
            device = torch._C._nn._parse_to(*args, **kwargs)[0]
            who = self.index.get(id(module), self.names.get(id(module), type(module).__name__))
            self.events.append(("to", who, device.type if device is not None else None))
            if isinstance(who, int):
                (self.on_fake.add if device == FAKE else self.on_fake.discard)(who)
            return module if device == FAKE else real_to(module, *args, **kwargs)

        def send_to_device(tensor, device, *args, **kwargs):
            self.events.append(("send", torch.device(device).type, self.fake()))
            return tensor if torch.device(device) == FAKE else real_send(tensor, device, *args, **kwargs)

        def visit(visitor, name, module, stats, onloaded):
            self.events.append(("visit", int(name.split(".")[2]), self.fake()))
            return real_visit(visitor, name, module, stats, onloaded)

        monkeypatch.setattr(nn.Module, "to", to)
        monkeypatch.setattr(engine_module, "send_to_device", send_to_device)
        monkeypatch.setattr(engine_module, "_visit_and_store", visit)
        for i, block in enumerate(self.blocks):
            block.register_forward_pre_hook(lambda module, inputs, i=i: self.events.append(("run", i, self.fake())))

    def fake(self) -> frozenset:
        return frozenset(self.on_fake)

    def of(self, kind):
        return [event[1:] for event in self.events if event[0] == kind]


def fake_compute_device(monkeypatch):
    # The pruner rightly refuses the meta device; here it stands for an accelerator this machine lacks.
    monkeypatch.setattr(pruner, "check_compute_device", lambda model, device: None if device is None else torch.device(device))


@pytest.mark.parametrize(
    "recipe, passes",
    [
        (dict(method="wanda"), 1),
        (dict(method="sparsegpt", pattern="2:4"), 1),
        (dict(method="wanda", sparsity_profile="owl"), 2),  # OWL's measuring pass moves blocks too
    ],
)
def test_each_block_is_on_the_compute_device_exactly_for_its_turn(recipe, passes, calibration_ids, tmp_path, monkeypatch):
    reference = prune(tiny_model("llama"), calibration_ids, tmp_path, **recipe)
    model = tiny_model("llama")
    fake_compute_device(monkeypatch)
    placement = Placement(model, monkeypatch)
    prune(model, calibration_ids, tmp_path, compute_device="meta", **recipe)
    monkeypatch.undo()

    n = calibration_ids.shape[0]
    # Only decoder blocks are moved: to the compute device for their turn, then back home, one after the other.
    assert placement.of("to") == [(0, "meta"), (0, "cpu"), (1, "meta"), (1, "cpu")] * passes
    # Capture runs where the model is, before anything moved: the first sequence through every block (each block's
    # own mask and position tables), the others only up to block 0; then each block runs twice per sequence
    # (statistics, pruned outputs) alone on the compute device, and is pruned there.
    capture = [(0, frozenset()), (1, frozenset())] + [(0, frozenset())] * (n - 1)
    assert placement.of("run") == (capture + [(0, {0})] * 2 * n + [(1, {1})] * 2 * n) * passes
    assert placement.of("visit") == ([(0, {0})] * 7 + [(1, {1})] * 7) * passes
    # The activations (hidden states, the blocks' extra arguments) follow each block onto the compute device.
    assert placement.of("send") == ([("meta", {0})] * 3 + [("meta", {1})] * 3) * passes
    assert placement.on_fake == set()
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert_same_result(model, reference)


def test_magnitude_moves_each_block_for_its_turn_without_activations(calibration_ids, tmp_path, monkeypatch):
    reference = prune(tiny_model("llama"), None, tmp_path, method="magnitude")
    model = tiny_model("llama")
    fake_compute_device(monkeypatch)
    placement = Placement(model, monkeypatch)
    prune(model, None, tmp_path, method="magnitude", compute_device="meta")
    monkeypatch.undo()
    assert placement.of("to") == [(0, "meta"), (0, "cpu"), (1, "meta"), (1, "cpu")]
    assert placement.of("visit") == [(0, {0})] * 7 + [(1, {1})] * 7
    assert placement.of("run") == [] and placement.of("send") == []
    assert_same_result(model, reference)


def test_a_failing_block_goes_back_home(calibration_ids, monkeypatch):
    model = tiny_model("llama")
    config = GBLMConfig(method="wanda")
    method = get_method("wanda")(config)

    def fail_in_block_1(name, module, stats, sparsity):
        if ".1." in name:
            raise FloatingPointError("boom")
        return torch.ones_like(module.weight, dtype=torch.bool)

    method.prune_layer = fail_in_block_1
    placement = Placement(model, monkeypatch)
    with pytest.raises(FloatingPointError, match="boom"), compute_on(FAKE):
        prune_layers(model, calibration_ids, method, dict.fromkeys(prunable_modules(model), 0.5), show_progress=False)
    monkeypatch.undo()
    assert placement.of("to") == [(0, "meta"), (0, "cpu"), (1, "meta"), (1, "cpu")]
    assert placement.on_fake == set()


# -- refusals, before anything changes --------------------------------------------------------------------------
def assert_untouched(model, before):
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    for name, value in weights_of(model).items():
        assert value.device == before[name].device, name
        assert value.device.type == "meta" or torch.equal(value, before[name]), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_refused_before_anything_changes(device, calibration_ids, tmp_path):
    model = tiny_model("llama")
    before = weights_of(model)
    with pytest.raises(ValueError, match=r"needs a CUDA GPU.*torch.cuda.is_available\(\) is False.*drop compute_device"):
        prune(model, calibration_ids, tmp_path, method="gblm", compute_device=device)
    assert_untouched(model, before)


@pytest.mark.parametrize(
    "device, message",
    [
        ("gpu", "'gpu' is not a torch device: use e.g. 'cuda'"),
        ("meta", "'meta' holds no values"),
        (3, "must be a device name such as 'cuda'"),
    ],
)
def test_unusable_compute_devices_are_refused(device, message, calibration_ids, tmp_path):
    model = tiny_model("llama")
    before = weights_of(model)
    with pytest.raises(ValueError, match=message):
        prune(model, calibration_ids, tmp_path, method="wanda", compute_device=device)
    assert_untouched(model, before)


def test_a_block_spread_over_devices_is_refused(calibration_ids, tmp_path):
    model = tiny_model("llama")
    up_proj = model.model.layers[1].mlp.up_proj
    up_proj.weight = nn.Parameter(torch.empty_like(up_proj.weight, device="meta"))
    before = weights_of(model)
    with pytest.raises(ValueError, match=r"model.layers.1 has weights on \['cpu', 'meta'\].*one device"):
        prune(model, calibration_ids, tmp_path, method="wanda", compute_device="cpu")
    assert_untouched(model, before)


@pytest.mark.parametrize("device", ["gpu", "meta", "cuda", "cuda:3", "mps"])
def test_the_library_and_the_command_line_refuse_devices_with_one_check(device, monkeypatch):
    from optimum_gblm.jobs import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda:3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError) as library:
        check_compute_device(tiny_model("llama"), device)
    with pytest.raises(ValueError) as command_line:
        resolve_device(device, flag="--device")
    # The same message, each naming its own setting and way out.
    as_flag = str(library.value).replace(f"compute_device={device!r}", f"--device {device}")
    assert as_flag.replace(NO_COMPUTE_DEVICE, "run with --device cpu") == str(command_line.value)


# -- command line and loading -----------------------------------------------------------------------------------
def test_compute_device_has_a_generated_flag():
    from optimum_gblm.cli import build_parser
    from optimum_gblm.flags import runtime_from_arguments

    prune_parser = build_parser()._subparsers._group_actions[0].choices["prune"]
    flag = {s: a for a in prune_parser._actions for s in a.option_strings}["--compute-device"]
    assert "moved there for its turn and back" in flag.help and flag.default is None
    parsed = prune_parser.parse_args(["--output", "x", "--compute-device", "cuda:1"])
    assert runtime_from_arguments(parsed) == PruningRuntime(compute_device="cuda:1")
    assert runtime_from_arguments(prune_parser.parse_args(["--output", "x"])).compute_device is None


def test_load_model_passes_device_map(monkeypatch):
    calls = []
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda name, **kwargs: calls.append(kwargs) or tiny_model()
    )
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda name, **kwargs: None)
    load_model("some/folder", device_map="auto", offload_folder="offload")
    assert calls[-1]["device_map"] == "auto" and calls[-1]["offload_folder"] == "offload"
    load_model("some/folder")
    assert calls[-1]["device_map"] is None
    assert modeling.load_model is load_model


def test_a_model_loaded_with_a_cpu_device_map_prunes_with_a_compute_device(tokenizer, calibration_ids, tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    reference = prune(load_model(tmp_path / "tiny", dtype="float32")[0], calibration_ids, tmp_path, method="wanda")
    model, _ = load_model(tmp_path / "tiny", dtype="float32", device_map="cpu")
    prune(model, calibration_ids, tmp_path, method="wanda", compute_device="cpu")
    assert_same_result(model, reference)


# -- the real thing ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_cpu_model_is_pruned_block_by_block_on_the_gpu(method, calibration_ids, tmp_path):
    reference = prune(tiny_model("llama"), calibration_ids, tmp_path, method=method)
    model = tiny_model("llama")
    blocks = model.model.layers
    seen = []
    for block in blocks:
        block.register_forward_pre_hook(lambda module, inputs: seen.append(
            (inputs[0].device.type, tuple(b.mlp.up_proj.weight.device.type for b in blocks),
             model.model.embed_tokens.weight.device.type)))
    prune(model, calibration_ids, tmp_path, method=method, compute_device="cuda")
    n = calibration_ids.shape[0]
    assert seen == ([("cpu", ("cpu", "cpu"), "cpu")] * n + [("cuda", ("cuda", "cpu"), "cpu")] * 2 * n
                    + [("cuda", ("cpu", "cuda"), "cpu")] * 2 * n)
    assert all(p.device.type == "cpu" for p in model.parameters())
    for name in reference.hf_quantizer.packed_masks:
        agreement = (model.hf_quantizer.mask(name) == reference.hf_quantizer.mask(name)).float().mean()
        assert agreement > 0.98, name  # GPU arithmetic may flip weights whose scores tie to rounding
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    assert model(ids).logits.device.type == "cpu"
