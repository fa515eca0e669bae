"""Stage 1 of GBLM: per-weight l1 / l2 norms of the per-sequence gradients of the causal-LM loss.

    l1: G = sum_n |s g_n|          l2: G = sqrt(sum_n (s g_n)^2)          (no division by N)

`block_gradient_norms` is the block-local form (gradient_loss="block"): g_n is the gradient of one decoder block's
output norm ||f(X_n)||_2, back-propagated through that block only, during its turn in the layer pass.

`loss_gradient_norms_by_block` is the same causal-LM loss's gradients taken one block at a time
(gradient_loss="model_by_block"): one forward keeps each block's dense inputs, then the backward goes block by block
from the last, recomputing each block's forward, folding its weight gradients and passing the gradient at its input
down; each block's finished norms go to disk. By the chain rule they are the full-model gradients; no accumulator
for the whole model's weights and no whole-model autograd graph exist.

Each parameter's gradient is folded into its fp32 accumulator the moment autograd produces it (a post-accumulate
hook), then freed, so a second full copy of the gradients never exists. Results are cached on disk as safetensors,
keyed by model identity, calibration tokens and settings.

Under torch.distributed the work is split one of two ways. A replicated model: sequences are sharded over the ranks
and the sums are all-reduced. A sharded model (FSDP2 `fully_shard`, as accelerate's FSDP plugin v2 prepares it; its
weights are DTensors): every rank runs every sequence, because FSDP reduce-scatters each gradient over the ranks and
gradients of different sequences must never be added before |.| or (.)^2. Each rank folds its own shard of the
gradient into a shard-sized accumulator, and the shards are gathered into full tensors at the end.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate.utils import send_to_device
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .files import OwnerLock, write_atomically
from .placement import Onloaded, execution_device
from .structure import find_decoder_blocks, replay_arguments

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = "1"


def default_cache_dir() -> Path:
    """`$OPTIMUM_GBLM_CACHE`, else `$HF_HOME/optimum_gblm/gradients` (huggingface_hub's own home)."""
    if os.environ.get("OPTIMUM_GBLM_CACHE"):
        return Path(os.environ["OPTIMUM_GBLM_CACHE"])
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "optimum_gblm" / "gradients"


class _EvalWithCheckpointing:
    """transformers only checkpoints in train mode: enter train mode for that, with every dropout kept off."""

    def __init__(self, model: nn.Module, enabled: bool):
        self.model, self.enabled = model, enabled

    def __enter__(self):
        self.was_training = self.model.training
        if self.enabled:
            if not getattr(self.model, "supports_gradient_checkpointing", False):
                raise ValueError(
                    f"{type(self.model).__name__} does not support gradient checkpointing; set "
                    f"gradient_checkpointing=False."
                )
            # transformers >= 5.x renamed gradient_checkpointing_* to activation_checkpointing_*.
            if hasattr(self.model, "activation_checkpointing_enable"):
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.train()
            for module in self.model.modules():
                if isinstance(module, nn.Dropout):
                    module.eval()
        else:
            self.model.eval()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            disable = getattr(self.model, "activation_checkpointing_disable", None) or self.model.gradient_checkpointing_disable
            disable()
        self.model.train(self.was_training)


class _DeferredInterrupts:
    """Ctrl-C (SIGINT) and `kill` (SIGTERM) take effect between sequences, never inside a backward pass: the
    accumulators then hold whole sequences and the progress saved just before stopping is exact."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if self.enabled:
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._remember)
        return self

    def _remember(self, number, frame) -> None:
        self.received = number

    def raise_if_received(self) -> None:
        if self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is not None:
            raise SystemExit(128 + self.received)

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def compute_gradient_norms(
    model: nn.Module,
    input_ids: torch.Tensor,
    modules: dict[str, nn.Module],
    norm: str = "l1",
    scale: float = 1.0,
    gradient_checkpointing: bool = False,
    show_progress: bool = True,
    resume_from: tuple[int, dict[str, torch.Tensor]] | None = None,
    save_progress: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
    progress_seconds: float = 600.0,
) -> dict[str, torch.Tensor]:
    """Accumulated gradient norms for the weight of every module in `modules` (same layout as the weight, fp32).

    One forward/backward per sequence (batch size 1), labels = input ids, no optimizer step: weights are unchanged.
    `resume_from=(n, sums)` continues after the first n sequences from raw sums (|s g| or (s g)^2) saved earlier;
    `save_progress(n, sums)` is called with the raw sums at most every `progress_seconds` while running.

    Under torch.distributed (e.g. `torchrun` or `accelerate launch`, process group initialised), sequence i goes to
    rank i % world_size, and the raw sums are all-reduced (summed) before the l2 square root: every rank returns
    the single-process result.

    On a model sharded with FSDP2 (`fully_shard`; its prunable weights are DTensors) every rank runs every sequence,
    accumulates its shard of each gradient, and the shards are gathered at the end: every rank returns the full
    single-process norms, on CPU. All ranks must call it together, with the same `input_ids` and `modules`.
    """
    _check_can_compute(model, norm)
    sums = _NormSums(modules, norm, scale)
    first = 0
    if resume_from is not None:
        first, saved = resume_from
        sums.resume(saved, modules)
    rank, world = distributed_rank_and_size()
    if world > 1 and (resume_from is not None or save_progress is not None):
        raise ValueError("resuming a gradient stage is single-process only; run without a process group to resume.")
    if world > 1:
        check_same_calibration(input_ids)
    if sums.sharded:
        logger.info("gradient norms: sharded (FSDP) model, every rank runs all %d sequences", input_ids.shape[0])
    # A sharded model sums gradients over ranks inside its backward: all ranks must run the same sequence.
    mine = [i for i in range(first, input_ids.shape[0]) if sums.sharded or i % world == rank]
    with sums.hooked(model), _EvalWithCheckpointing(model, gradient_checkpointing), torch.enable_grad():
        _backward_each(model, input_ids, mine, sums.sums, save_progress, progress_seconds, show_progress and rank == 0)
    return sums.finish(world)


def check_norm(norm: str) -> None:
    """The two ways per-sequence gradients are folded: l1 or l2."""
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}.")


def _check_can_compute(model: nn.Module, norm: str) -> None:
    """Refuse, before any forward, a norm that does not exist and a model whose gradients would not be its own."""
    check_norm(norm)
    if getattr(model, "_gblm_gradient_hooks", None):
        # Their hooks zero the gradients of weights an earlier prune masked: the norms would describe that mask and
        # be cached under the key of whatever weights the model now holds.
        raise ValueError(
            "this model still carries the masks of an earlier prune, whose hooks zero the masked weights' gradients. "
            "Call optimum_gblm.sparse_state.detach_masks(model) first (or restore_dense(model, dense_state_dict)); "
            "GBLMPruner.prune does this itself."
        )
    check_not_fsdp1(model)


class _NormSums:
    """One fp32 accumulator per weight (the size of this rank's shard of it when the weight is sharded), into which
    each gradient is folded the moment autograd produces it, then freed."""

    def __init__(self, modules: dict[str, nn.Module], norm: str, scale: float):
        self.norm, self.scale = norm, scale
        self.weights = {name: module.weight for name, module in modules.items()}
        self.sharded = any(is_dtensor(w) for w in self.weights.values())
        self.sums = {
            name: torch.zeros(local_tensor(w).shape, dtype=torch.float32, device=local_tensor(w).device)
            for name, w in self.weights.items()
        }

    def resume(self, saved: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> None:
        check_gradient_norms(saved, modules, source="the partial gradient stage")
        for name, accumulator in self.sums.items():
            accumulator.copy_(saved[name])

    def _fold_into(self, accumulator: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            # FSDP2 calls this hook on the sharded parameter once its gradient is reduce-scattered: param.grad is then
            # a DTensor whose local tensor is this rank's shard, the shape of the accumulator.
            grad = local_tensor(param.grad).to(torch.float32) * self.scale  # a new fp32 tensor, transient
            if self.norm == "l1":
                accumulator.add_(grad.abs_())
            else:
                accumulator.addcmul_(grad, grad)
            param.grad = None

        return hook

    @contextlib.contextmanager
    def hooked(self, model: nn.Module) -> Iterator[None]:
        """Only the prunable weights need gradients (nothing else gets a .grad buffer), each folded by a hook; every
        parameter's requires_grad is restored on exit."""
        handles = []
        try:
            with _no_weight_gradients(model):
                for name, weight in self.weights.items():
                    weight.requires_grad_(True)
                    weight.grad = None
                    handles.append(weight.register_post_accumulate_grad_hook(self._fold_into(self.sums[name])))
                yield
        finally:
            for handle in handles:
                handle.remove()
            for p in model.parameters():
                p.grad = None

    def finish(self, world: int) -> dict[str, torch.Tensor]:
        """The norms: shards joined or ranks' sums added, l2's square root taken, checked finite."""
        sums = self.sums
        if self.sharded:
            # Every rank ran every sequence: nothing to add up, only this rank's shards to join with the others'.
            sums = {name: gather_shard(acc, self.weights[name]) for name, acc in sums.items()}
        elif world > 1:
            import torch.distributed as dist

            for accumulator in sums.values():
                dist.all_reduce(accumulator, op=dist.ReduceOp.SUM)  # l1: sums; l2: sums of squares
        for name, accumulator in sums.items():
            if self.norm == "l2":
                accumulator.sqrt_()
            if not torch.isfinite(accumulator).all():
                raise FloatingPointError(
                    f"gradient norms of {name} contain NaN or inf. Load the model in float32 (dtype=torch.float32)"
                    + (f" or lower the scale (now {self.scale:g})." if self.scale != 1.0
                       else "; its half-precision gradients overflowed.")
                )
        return sums


class BlockSequences(Protocol):
    """What a decoder block is called with in its turn (`engine.BlockInputs`): one row of `hidden` per sequence."""

    hidden: torch.Tensor

    def output(self, block: nn.Module, index: int) -> torch.Tensor: ...


def block_gradient_norms(
    block: nn.Module, modules: dict[str, nn.Module], inputs: BlockSequences, norm: str = "l1",
    num_sequences: int | None = None,
) -> dict[str, torch.Tensor]:
    """Block-local gradient norms of the weights of `modules` (layers inside `block`), laid out as the weights, fp32.

    For each sequence n, g_n is the gradient of ||f(X_n)||_2, the l2 norm of the block's output on its inputs X_n,
    back-propagated through this block only (Wanda++'s regional gradient), and folded into G as the full-model stage
    folds the LM loss's (l1 or l2 over sequences). A loss of the output against the dense model's output would have
    no gradient at the dense weights (it is at its minimum there), so the output's own norm is the local loss.
    Memory is one block's weights, one accumulator per weight and one sequence's activations; the model and its
    requires_grad flags are left as they were. Forward pre-hooks on the layers see every sequence once, with the
    inputs the layer pass's statistics need (detach them: they carry the autograd graph).

    `num_sequences`: only the first ones get a backward (the others a plain forward, for those hooks), and the norms
    are rescaled to all sequences (`rescaled_to_all_sequences`).
    """
    check_norm(norm)
    total = inputs.hidden.shape[0]
    used = total if num_sequences is None else num_sequences
    sums = _NormSums(modules, norm, 1.0)
    with sums.hooked(block):
        for index in range(total):
            if index < used:
                with torch.enable_grad():
                    torch.linalg.vector_norm(inputs.output(block, index).float()).backward()
            else:
                with torch.no_grad():
                    inputs.output(block, index)
    return rescaled_to_all_sequences(sums.finish(world=1), norm, used, total)


class GradientNormsOnDisk(Mapping[str, torch.Tensor]):
    """Gradient norms kept in a folder, one safetensors file per decoder block, each layer's read when it is asked
    for: the whole model's fp32 norms (the model's size in fp32) never sit in memory at once. Values are multiplied by
    `factor` as they are read (`rescale_factor`: gradient_samples' rescaling). The folder belongs to the caller."""

    def __init__(self, folder: str | os.PathLike, factor: float = 1.0):
        self.folder, self.factor = Path(folder), factor
        self._file_of: dict[str, Path] = {}

    def add(self, norms: dict[str, torch.Tensor], block: int) -> None:
        """Write the norms of block number `block` (its index in the model) to their own file."""
        path = self.folder / f"block-{block:05d}.safetensors"
        try:
            save_file({name: value.detach().cpu().contiguous() for name, value in norms.items()}, str(path))
        except (OSError, SafetensorError) as error:  # safetensors reports a full disk as its own error
            path.unlink(missing_ok=True)
            reason = describe_os_error(error) if isinstance(error, OSError) else str(error)
            raise OSError(
                f"could not write gradient norms to {self.folder}: {reason}; free some space or point cache_dir "
                f"(--cache-dir) to a disk with room for them."
            ) from error
        self._file_of.update(dict.fromkeys(norms, path))

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(str(self._file_of[name]), framework="pt") as f:
            value = f.get_tensor(name)
        return value if self.factor == 1.0 else value.mul_(self.factor)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def _no_weight_gradients(model: nn.Module) -> Iterator[None]:
    """No parameter requires grad inside (graphs then reach the hidden states only); flags restored on exit, by name:
    accelerate replaces an offloaded weight's Parameter at every onload, so the objects at exit may be new ones."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


def _dense_block_inputs(
    model: nn.Module, blocks: list[nn.Module], input_ids: torch.Tensor, show_progress: bool
) -> tuple[list[list[torch.Tensor]], list[tuple[tuple, dict[str, Any]]], list[torch.Tensor]]:
    """Per sequence, one forward of the whole model (no weight requires grad): every block's input, the other
    arguments each block is called with, and dL_n / d(last block's output), which comes from the head alone because
    the graph is cut at that output. The hidden states are kept in host memory (`block_inputs_bytes` of them), where
    there is room for all blocks' at once."""
    index_of = {id(block): i for i, block in enumerate(blocks)}
    device = next(model.parameters()).device
    inputs: list[list[torch.Tensor]] = [[] for _ in blocks]
    extras: list[tuple[tuple, dict[str, Any]] | None] = [None] * len(blocks)
    last_gradients: list[torch.Tensor] = []
    cut: list[torch.Tensor] = []

    def keep_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        i = index_of[id(module)]
        inputs[i].append(args[0].detach().to("cpu"))  # all blocks' inputs at once: host memory, not the accelerator's
        if extras[i] is None:
            extras[i] = replay_arguments(args, kwargs)

    def cut_output(module: nn.Module, args: tuple, output: Any) -> Any:
        leaf = _hidden(output).detach().requires_grad_(True)
        cut.append(leaf)
        return (leaf, *output[1:]) if isinstance(output, (tuple, list)) else leaf

    with _no_weight_gradients(model), torch.enable_grad():
        for n in tqdm(range(input_ids.shape[0]), desc="Dense block inputs", disable=not show_progress):
            sequence = input_ids[n : n + 1].to(device)
            handles = [block.register_forward_pre_hook(keep_input, with_kwargs=True) for block in blocks]
            handles.append(blocks[-1].register_forward_hook(cut_output))
            try:
                loss = model(input_ids=sequence, labels=sequence, use_cache=False).loss
            finally:
                for handle in handles:
                    handle.remove()
            (gradient,) = torch.autograd.grad(loss, cut.pop())
            last_gradients.append(gradient.detach().to("cpu"))
    return inputs, extras, last_gradients


def block_inputs_bytes(model: nn.Module, num_sequences: int, seqlen: int) -> int:
    """The host memory `loss_gradient_norms_by_block` keeps its dense block inputs in: one hidden state per block and
    sequence, in the model's dtype, and one more per sequence (the gradient passed down)."""
    _, blocks = find_decoder_blocks(model)
    embeddings = model.get_input_embeddings()
    width, itemsize = embeddings.embedding_dim, embeddings.weight.element_size()
    return (len(blocks) + 1) * num_sequences * seqlen * width * itemsize


def loss_gradient_norms_by_block(
    model: nn.Module,
    modules_by_block: Sequence[dict[str, nn.Module]],
    input_ids: torch.Tensor,
    folder: str | os.PathLike,
    norm: str = "l1",
    show_progress: bool = True,
) -> GradientNormsOnDisk:
    """The causal-LM loss's gradient norms (labels = input ids) of the weights of `modules_by_block` (the layers of
    each decoder block, in the model's order), taken one block at a time (gradient_loss="model_by_block"), written to
    `folder` one file per block. By the chain rule they are the full-model stage's norms, up to rounding.

    One forward per sequence keeps every block's dense input (`_dense_block_inputs`); then, from the last block down,
    each block is recomputed on its inputs and back-propagated from the loss's gradient at its output, its weight
    gradients folded per sequence as the full-model stage folds them, the gradient at its input passed down to the
    block before. An offloaded block is onloaded once for its turn. Memory: one block's weights, accumulators and
    activations on the compute device, plus one hidden state per block and sequence in host memory
    (`block_inputs_bytes`); compute: the model's backward plus one more forward.
    The model is left in its mode, with its weights and requires_grad flags as they were.
    """
    check_norm(norm)
    _, blocks = find_decoder_blocks(model)
    if len(modules_by_block) != len(blocks):
        raise ValueError(f"modules_by_block has {len(modules_by_block)} entries for the model's {len(blocks)} blocks.")
    store = GradientNormsOnDisk(folder)
    was_training = model.training
    model.eval()
    try:
        inputs, extras, gradients = _dense_block_inputs(model, blocks, input_ids, show_progress)
        turns = tqdm(range(len(blocks) - 1, -1, -1), desc="Gradient norms by block", disable=not show_progress)
        for i in turns:
            block = blocks[i]
            with Onloaded(block):
                device = execution_device(block)
                args, kwargs = send_to_device(extras[i][0], device), send_to_device(extras[i][1], device)
                sums = _NormSums(modules_by_block[i], norm, 1.0)  # after onloading: the weights autograd will see
                with sums.hooked(block), torch.enable_grad():
                    for n, block_input in enumerate(inputs[i]):
                        x = block_input.to(device).requires_grad_(i > 0)
                        _hidden(block(x, *args, **kwargs)).backward(gradients[n].to(device))
                        if i > 0:
                            gradients[n] = x.grad.detach().to(gradients[n].device)
                        inputs[i][n] = None  # done with
                store.add(sums.finish(world=1), i)
    finally:
        model.train(was_training)
    return store


def rescale_factor(norm: str, used: int, total: int) -> float:
    """What norms taken on `used` of `total` calibration sequences are multiplied by (`rescaled_to_all_sequences`)."""
    if used == total:
        return 1.0
    return total / used if norm == "l1" else math.sqrt(total / used)


def rescaled_to_all_sequences(norms: dict[str, torch.Tensor], norm: str, used: int, total: int) -> dict[str, torch.Tensor]:
    """Norms taken on `used` of `total` calibration sequences, scaled to what all of them would sum to on average
    (l1, a sum: total / used; l2, the root of a sum of squares: sqrt(total / used)), so that a fixed alpha weighs
    the gradient term alike whatever gradient_samples is. Identity when every sequence was used."""
    factor = rescale_factor(norm, used, total)
    return norms if factor == 1.0 else {name: value * factor for name, value in norms.items()}


def _backward_each(
    model: nn.Module,
    input_ids: torch.Tensor,
    sequences: list[int],
    sums: dict[str, torch.Tensor],
    save_progress: Callable[[int, dict[str, torch.Tensor]], None] | None,
    progress_seconds: float,
    show_progress: bool,
) -> None:
    """One forward and backward per sequence (the hooks fold the gradients); progress is saved at most every
    `progress_seconds`, and Ctrl-C or a `kill` stops the run between sequences, just after progress was saved."""
    device = next(model.parameters()).device
    total = input_ids.shape[0]
    last_saved = time.monotonic()
    with _DeferredInterrupts(enabled=save_progress is not None) as interrupts:
        for i in tqdm(sequences, desc="Gradient norms", disable=not show_progress):
            sequence = input_ids[i : i + 1].to(device)
            model(input_ids=sequence, labels=sequence, use_cache=False).loss.backward()
            due = time.monotonic() - last_saved >= progress_seconds or interrupts.received is not None
            if save_progress is not None and i + 1 < total and due:
                save_progress(i + 1, sums)
                last_saved = time.monotonic()
            interrupts.raise_if_received()


def distributed_rank_and_size() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_dtensor(tensor: Any) -> bool:
    """True for a torch.distributed DTensor (what FSDP2's `fully_shard` turns every parameter into)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed
        return False
    return isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; any other tensor as is."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def gather_shard(shard: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The full tensor from every rank's `shard`, each laid out as `like`'s local shard on this rank (a collective:
    all ranks call it, weight by weight in the same order). The result goes to CPU: the full norms of a model that
    does not fit one device do not fit it either. A tensor that is not a DTensor is this rank's whole tensor already."""
    if not is_dtensor(like):
        return shard
    from torch.distributed.tensor import DTensor

    mesh = like.device_mesh
    # With FSDP2's CPU offload the shards live on CPU while the mesh (and its collectives) is on the accelerator.
    if mesh.device_type != "cpu":
        shard = shard.to(torch.device(mesh.device_type, getattr(torch, mesh.device_type).current_device()))
    full = DTensor.from_local(shard, mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride())
    return full.full_tensor().cpu()


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """A weight as one full tensor: gathered from the ranks when it is a DTensor (a collective)."""
    return gather_shard(weight.to_local(), weight) if is_dtensor(weight) else weight


def check_not_fsdp1(model: nn.Module, what: str = "the gradient stage") -> None:
    """FSDP1 (`FullyShardedDataParallel`) flattens parameters into FlatParameters and renames modules; only FSDP2 is
    supported."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return
    if isinstance(model, FullyShardedDataParallel) or any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise NotImplementedError(
            f"{what} does not support FSDP1 (FullyShardedDataParallel) models. Use FSDP2: "
            "torch.distributed.fsdp.fully_shard, or accelerate's FSDP plugin with fsdp_version=2 "
            "(`accelerate launch --use_fsdp --fsdp_version 2 ...`)."
        )


def check_same_calibration(input_ids: torch.Tensor) -> None:
    """Every rank must hold the same calibration tokens (sharding assumes it; a sharded model would silently average
    the gradients of different sequences otherwise)."""
    import torch.distributed as dist

    digest = hashlib.sha256(input_ids.to(torch.int64).cpu().contiguous().numpy().tobytes()).hexdigest()
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, (tuple(input_ids.shape), digest))
    if len(set(digests)) != 1:
        raise ValueError(
            "the ranks hold different calibration tokens: build the calibration set with the same data, seed and "
            "tokenizer on every rank."
        )


def all_ranks(flag: bool) -> bool:
    """True when `flag` is true on every rank of the process group (a collective), `flag` outside one."""
    if distributed_rank_and_size()[1] == 1:
        return flag
    import torch.distributed as dist

    flags: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(flags, bool(flag))
    return all(flags)


# -- cache -----------------------------------------------------------------------------------------------------
def model_fingerprint(modules: dict[str, nn.Module], model: nn.Module | None = None) -> str:
    """A cheap identity of the weights: names, shapes, dtypes and a strided sample of every prunable weight."""
    digest = hashlib.sha256()
    if model is not None and getattr(model, "config", None) is not None:
        digest.update(str(getattr(model.config, "model_type", "")).encode())
    for name in sorted(modules):
        weight = full_weight(modules[name].weight.detach())  # sharded weights: gathered, so all ranks agree
        flat = weight.reshape(-1)
        step = max(1, flat.numel() // 4096)
        digest.update(f"{name}|{tuple(weight.shape)}|{weight.dtype}".encode())
        digest.update(flat[::step].to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()


def cache_key(model: nn.Module, modules: dict[str, nn.Module], input_ids: torch.Tensor, norm: str, scale: float) -> str:
    digest = hashlib.sha256()
    digest.update(CACHE_FORMAT_VERSION.encode())
    digest.update(model_fingerprint(modules, model).encode())
    digest.update(f"{tuple(input_ids.shape)}".encode())
    digest.update(input_ids.to(torch.int64).cpu().contiguous().numpy().tobytes())
    digest.update(f"{norm}|{float(scale)!r}".encode())
    return digest.hexdigest()[:32]


def save_gradient_norms(norms: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write norms as safetensors atomically: a temporary file in the same folder, renamed into place when complete."""
    tensors = {k: v.contiguous().cpu() for k, v in norms.items()}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or {}))


def load_gradient_norms(path: str | os.PathLike, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Read norms written by `save_gradient_norms` and check they belong to these modules."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"gradient norms file {str(path)!r} does not exist.")
    norms = load_file(str(path))
    check_gradient_norms(norms, modules, source=str(path))
    return norms


def check_gradient_norms(norms: dict[str, torch.Tensor], modules: dict[str, nn.Module], source: str = "gradient_norms") -> None:
    missing = sorted(set(modules) - set(norms))
    if missing:
        raise ValueError(
            f"{source} has no gradient norms for {len(missing)} layers (first: {missing[0]}): it was computed for "
            f"another model or other target_modules. Recompute it for this model."
        )
    for name, module in modules.items():
        value = norms[name]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ValueError(
                f"{source}: gradient norms for {name} must be a floating-point tensor, got "
                f"{getattr(value, 'dtype', type(value).__name__)}; recompute them with compute_gradient_norms."
            )
        if tuple(value.shape) != tuple(module.weight.shape):
            raise ValueError(
                f"{source}: gradient norms for {name} have shape {tuple(value.shape)} but the weight has "
                f"shape {tuple(module.weight.shape)}; the norms come from another model. Recompute them."
            )
        # Norms are sums of |g| or sqrt of sums of g^2: NaN, inf or a negative value means a broken run or file,
        # and scoring with them would silently prune by column position.
        if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
            raise ValueError(
                f"{source}: gradient norms for {name} contain NaN, inf or negative values; recompute them (in float32 "
                f"if the model is in half precision) or delete the broken cache entry."
            )


def cached_gradient_norms(
    model: nn.Module, input_ids: torch.Tensor, modules: dict[str, nn.Module], norm: str = "l1", scale: float = 1.0,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    gradient_checkpointing: bool = False,
    show_progress: bool = True,
    progress_seconds: float = 600.0,
) -> dict[str, torch.Tensor]:
    """`compute_gradient_norms`, reusing a cached result when model, calibration tokens and settings match.

    While it runs, progress is saved to `<key>.partial.safetensors` at most every `progress_seconds`; an interrupted
    run with the same key resumes after the last saved sequence. A partial file is never taken for a result.

    Other processes may use the same cache at the same time. A single process computes a key while holding
    `<key>.lock` (another one asking for the same key waits, then reuses the result); every file is read through one
    open, so its metadata and tensors always belong together; and an entry is trusted only when its metadata says
    what it is (complete or partial) for this very key and its norms pass `check_gradient_norms` (float, this
    model's shapes, finite, not negative). Anything else is recomputed. A cache that cannot be written (a full disk)
    costs a warning, never the result.
    """
    compute = lambda **extra: compute_gradient_norms(  # noqa: E731
        model, input_ids, modules, norm, scale, gradient_checkpointing, show_progress, **extra
    )
    if not use_cache:
        return compute()
    key = cache_key(model, modules, input_ids, norm, scale)
    folder = Path(cache_dir or default_cache_dir())
    path = folder / f"{key}.safetensors"
    # compute_gradient_norms returns the full norms of a sharded (FSDP) model on CPU; a cache hit does the same.
    sharded = any(is_dtensor(m.weight) for m in modules.values())
    device = torch.device("cpu") if sharded else next(model.parameters()).device
    norms = _cached_result(path, key, modules)
    # Under a process group the ranks reuse the cache together or compute together (a rank that computed alone
    # would wait forever in the collectives).
    if all_ranks(norms is not None):
        logger.info("gradient norms: reusing cache %s", path)
        return {k: v.to(device) for k, v in norms.items() if k in modules}
    # One process at a time per key. Not under a process group: a rank waiting for a lock another rank holds would
    # never reach the collectives that rank waits in (and only rank 0 writes there).
    lock = _lock_cache_key(folder, key) if distributed_rank_and_size()[1] == 1 else None
    try:
        if lock is not None:
            norms = _cached_result(path, key, modules)  # the process we waited for may have computed it
            if norms is not None:
                logger.info("gradient norms: reusing cache %s, written by another process meanwhile", path)
                return {k: v.to(device) for k, v in norms.items() if k in modules}
        metadata = _entry_metadata(model, input_ids, key, norm, scale)
        return _compute_into_cache(compute, folder, metadata, modules, input_ids, device, progress_seconds)
    finally:
        if lock is not None:
            lock.release()


def _entry_metadata(model: nn.Module, input_ids: torch.Tensor, key: str, norm: str, scale: float) -> dict[str, str]:
    """What a cache entry says about itself: checked on reading, so that a file is never taken for another one."""
    return {
        "format": CACHE_FORMAT_VERSION,
        "key": key,
        "model": str(getattr(getattr(model, "config", None), "_name_or_path", "")),
        "num_samples": str(input_ids.shape[0]),
        "seqlen": str(input_ids.shape[1]),
        "norm": norm,
        "scale": repr(float(scale)),
    }


def _compute_into_cache(
    compute: Callable[..., dict[str, torch.Tensor]],
    folder: Path,
    metadata: dict[str, str],
    modules: dict[str, nn.Module],
    input_ids: torch.Tensor,
    device: torch.device,
    progress_seconds: float,
) -> dict[str, torch.Tensor]:
    """Compute the norms (resuming from the entry's partial file when one fits, saving progress to it), then write
    the complete entry and drop the partial file. A cache that cannot be written costs a warning, never the result."""
    key = metadata["key"]
    path, partial = folder / f"{key}.safetensors", folder / f"{key}.partial.safetensors"

    def save_progress(completed: int, sums: dict[str, torch.Tensor]) -> None:
        try:
            save_gradient_norms(sums, partial, {**metadata, "state": "partial", "completed": str(completed)})
        except OSError as error:  # progress is a convenience: a full disk must not stop the run
            logger.warning("could not save gradient progress to %s: %s", partial, describe_os_error(error))

    rank, world = distributed_rank_and_size()
    if world > 1:  # progress files are per process; a sharded run is not resumable
        norms = compute()
    else:
        resume_from = _partial_progress(partial, key, modules, input_ids.shape[0], device)
        norms = compute(resume_from=resume_from, save_progress=save_progress, progress_seconds=progress_seconds)
    if rank != 0:
        return norms
    try:
        save_gradient_norms(norms, path, {**metadata, "state": "complete"})
        logger.info("gradient norms cached at %s", path)
    except OSError as error:  # a full disk must not cost the run its result
        logger.warning("could not write gradient cache %s: %s; going on without it", path, describe_os_error(error))
    try:
        partial.unlink(missing_ok=True)  # another process may have removed it already
    except OSError as error:
        logger.warning("could not remove the partial gradient state %s: %s", partial, describe_os_error(error))
    return norms


def _lock_cache_key(folder: Path, key: str) -> OwnerLock | None:
    """Hold `<key>.lock` in the cache folder, waiting for a process that computes the same key; None (computing
    without the lock) when the folder cannot hold the lock file (read-only, full)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = OwnerLock(folder / f"{key}.lock")
        if not lock.acquire(blocking=False):
            logger.info("gradient norms: another process is computing the same norms (%s holds the lock): waiting "
                        "for it, then reusing its result", lock.path)
            lock.acquire()
        return lock
    except OSError as error:
        logger.warning("could not lock the gradient cache entry %s in %s: %s; going on without the lock", key, folder,
                       describe_os_error(error))
        return None


def read_cache_entry(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of a cache file, read through one open: another process may replace the file at any
    moment, and an open file stays the file it was (so metadata and tensors always belong together)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    return metadata, tensors


def _cached_result(path: Path, key: str, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor] | None:
    """The complete result cached at `path` for `key`, or None when there is none to trust."""
    if not path.is_file():
        return None
    try:
        metadata, norms = read_cache_entry(path)
        if metadata.get("state") != "complete" or metadata.get("key") != key:
            raise ValueError(f"its metadata says {metadata.get('state')!r} for key {metadata.get('key')!r}")
        check_gradient_norms(norms, modules, source=str(path))
        return norms
    except FileNotFoundError:  # removed by another process since the check
        return None
    except Exception as error:  # a damaged or foreign cache entry is recomputed, never trusted
        logger.warning("ignoring gradient cache %s (%s); recomputing", path, error)
        return None


def _partial_progress(
    partial: Path, key: str, modules: dict[str, nn.Module], total: int, device: torch.device
) -> tuple[int, dict[str, torch.Tensor]] | None:
    """(completed sequences, raw sums) saved by an interrupted run with this key, or None to start over."""
    if not partial.is_file():
        return None
    try:
        info, sums = read_cache_entry(partial)
        if info.get("key") != key or info.get("state") != "partial":
            raise ValueError("written for other settings")
        completed = int(info["completed"])
        if not 0 < completed < total:
            raise ValueError(f"it says {completed} of {total} sequences were done")
        check_gradient_norms(sums, modules, source=str(partial))
    except FileNotFoundError:
        return None
    except Exception as error:
        logger.warning("ignoring unusable partial gradient state %s (%s); starting over", partial, error)
        return None
    logger.info("gradient norms: resuming after %d of %d sequences from %s", completed, total, partial)
    return completed, {k: v.to(device) for k, v in sums.items() if k in modules}


def describe_os_error(error: OSError) -> str:
    if getattr(error, "errno", None) == errno.ENOSPC:
        return f"the disk is full ({error}); free some space"
    return str(error)


def cache_metadata(path: str | os.PathLike) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


__all__ = [
    "compute_gradient_norms",
    "cached_gradient_norms",
    "load_gradient_norms",
    "save_gradient_norms",
    "cache_key",
    "default_cache_dir",
]
