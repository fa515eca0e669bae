"""`GBLMPruner`: calibration data -> (gradient norms) -> layer-wise masks from a registered method -> a sparse model
that records what was done in its config.

The pruner knows no method by name: it asks the registry for the configured method and sparsity profile, checks
everything it can before the first weight changes, and hands the rest to the engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from optimum.quantization_base import OptimumQuantizer
from torch import nn
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantizer

from .checkpoint import check_output_dir, save_pretrained_atomically
from .config import GBLMConfig, PruningRuntime
from .data import CalibrationSource, get_calibration_data, source_description
from .files import OwnedFolder, kill_unwinds, remove_dead_folders
from .gradients import (
    block_inputs_bytes,
    cached_gradient_norms,
    check_gradient_norms,
    check_not_fsdp1,
    default_cache_dir,
    is_dtensor,
    load_gradient_norms,
    loss_gradient_norms_by_block,
    rescale_factor,
    rescaled_to_all_sequences,
)
from .layer_masks import prune_layers
from .methods.base import MODEL_LOSS_GRADIENTS
from .modeling import base_model_info, load_model, strip_gguf_quantization
from .placement import check_compute_device, check_offload_writable, compute_on, is_offloaded
from .quantizer import GBLMHfQuantizer, attach_masks
from .record import PruningRecord
from .registry import get_method, get_profile
from .sparse_state import detach_masks, sparsity_report
from .structure import find_decoder_blocks, layers_by_block, prunable_modules, weight_matrix

logger = logging.getLogger(__name__)


class GBLMPruner(OptimumQuantizer):
    """Prunes a causal LM in place with the method, sparsity and pattern of a `GBLMConfig`.

    >>> model = GBLMPruner(GBLMConfig(sparsity=0.5, pattern="2:4")).prune(model, calibration, tokenizer=tokenizer)

    The result is recorded as `model.config.quantization_config` (a `GBLMConfig` holding the recipe, calibration and
    measured sparsity) and the masks travel with `save_pretrained`.
    """

    def __init__(
        self,
        config: GBLMConfig | None = None,
        runtime: PruningRuntime | None = None,
        **kwargs: Any,
    ):
        """`GBLMPruner(config)`, or `GBLMPruner(method="wanda", ...)` with the recipe's fields; how the run executes
        (`cache_dir`, `use_cache`, `show_progress`, `gradient_checkpointing`, `compute_device`) as a `PruningRuntime`
        or keywords."""
        runtime_names = {f.name for f in dataclasses.fields(PruningRuntime)}
        runtime_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in runtime_names}
        if runtime is not None and runtime_kwargs:
            raise ValueError("pass either runtime=PruningRuntime(...) or its fields as keyword arguments, not both.")
        if config is None:
            config = GBLMConfig(**kwargs)
        elif kwargs:
            raise ValueError("pass either a GBLMConfig or its fields as keyword arguments, not both.")
        if not isinstance(config, GBLMConfig):
            raise ValueError(f"config must be a GBLMConfig, got {type(config).__name__}.")
        config.validate()
        self.config = config
        if "cache_dir" in runtime_kwargs and runtime_kwargs["cache_dir"] is not None:
            runtime_kwargs["cache_dir"] = os.fspath(runtime_kwargs["cache_dir"])
        self.runtime = runtime if runtime is not None else PruningRuntime(**runtime_kwargs)
        self.model: nn.Module | None = None
        self.tokenizer: Any = None

    # -- optimum's OptimumQuantizer interface --------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_or_path: nn.Module | str | os.PathLike,
        file_name: str | None = None,
        config: GBLMConfig | None = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> GBLMPruner:
        """Bind a model (an instance, or a Hub id / folder loaded with `load_model`; `file_name` names a GGUF file
        in it) to a new pruner, for `quantize(save_dir)`."""
        if isinstance(model_or_path, nn.Module):
            model = model_or_path
        else:
            model, loaded_tokenizer = load_model(model_or_path, gguf_file=file_name)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        pruner = cls(config, **kwargs)
        pruner.model, pruner.tokenizer = model, tokenizer
        return pruner

    def quantize(
        self,
        save_dir: str | os.PathLike,
        file_prefix: str | None = None,
        calibration: CalibrationSource | None = None,
        overwrite: bool = False,
        **kwargs: Any,
    ) -> Path:
        """Prune the model bound by `from_pretrained` and save it (with its masks) to `save_dir`, atomically."""
        if self.model is None:
            raise ValueError("no model is bound: call GBLMPruner.from_pretrained(model_or_path) first, or use prune().")
        if file_prefix is not None:
            raise ValueError("file_prefix is not supported: pruned checkpoints keep transformers' file names.")
        check_output_dir(save_dir, overwrite)
        self.prune(self.model, calibration, tokenizer=self.tokenizer, **kwargs)
        return save_pretrained_atomically(self.model, save_dir, tokenizer=self.tokenizer, overwrite=overwrite)

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        """Upload the pruned bound model (weights, config, masks, model card) in one commit."""
        if self.model is None or not isinstance(getattr(self.model.config, "quantization_config", None), GBLMConfig):
            raise ValueError("nothing to push: bind a model with from_pretrained() and prune it (quantize()) first.")
        return self.model.push_to_hub(repo_id, tokenizer=self.tokenizer, **kwargs)

    def prune(
        self,
        model: nn.Module,
        calibration: CalibrationSource | None = None,
        tokenizer: Any = None,
        gradient_norms: dict[str, torch.Tensor] | str | os.PathLike | None = None,
        text_column: str = "text",
    ) -> nn.Module:
        """Prune `model` in place and return it.

        Args:
            model: a transformers causal LM (any decoder-only model whose blocks form an nn.ModuleList).
            calibration: token ids (N, T), a BatchEncoding or lists of ids, texts, a datasets.Dataset (text or
                input_ids), a file/folder, "c4" or "wikitext2"; defaults to `config.dataset`. Not needed for
                magnitude pruning.
            tokenizer: tokenizer (or its name) for text calibration data; defaults to `config.tokenizer`.
            gradient_norms: precomputed norms (a dict or a safetensors path) instead of computing/caching them.
            text_column: the text column of a datasets.Dataset (ignored when it has input_ids).

        Stages: check (everything that can fail, before the model changes), calibrate (the data, and the effective
        recipe built once from it), gradients (stage 1, when the method needs them), prune (the layer-wise pass),
        record (what was done, attached with the masks).
        """
        start = time.perf_counter()
        plan = self._check(model, gradient_norms)
        run = self._calibrate(model, calibration, tokenizer, text_column)
        if plan.scratch_dir is not None:  # the by-block gradient stage's host memory depends on the calibration size
            check_room_for_block_inputs(model, run)
        # gradient_loss="model_by_block" keeps its norms in the scratch folder, made before the model first changes
        with self._scratch_folder(plan) as scratch:
            strip_gguf_quantization(model)  # GGUF's quantizer state would clash with ours
            detach_masks(model)  # a fresh prune replaces any earlier one
            norms, gradient_seconds = self._gradients(model, plan, run, scratch)
            tick = time.perf_counter()
            method = get_method(run.config.method)(run.config, norms)
            with compute_on(plan.compute_device):  # the profile's measuring pass, if any, moves blocks there too
                profile = get_profile(run.config.sparsity_profile)(run.config)
                show = self.runtime.show_progress
                sparsities = profile.layer_sparsities(model, run.input_ids, method, plan.modules, show_progress=show)
                masks = prune_layers(model, run.input_ids, method, sparsities, run.config.target_modules, show)
            # Block-local gradients are measured inside the layer pass: their seconds count as the gradient stage's.
            layer_pass = time.perf_counter() - tick
        timings = {
            "gradients": gradient_seconds + method.block_gradient_seconds,
            "prune": layer_pass - method.block_gradient_seconds,
            "total": time.perf_counter() - start,
        }
        self._record(model, plan, run, method, masks, timings)
        return model

    # -- the stages ---------------------------------------------------------------------------------------------
    def _check(self, model: nn.Module, gradient_norms: dict[str, torch.Tensor] | str | os.PathLike | None) -> PrunePlan:
        """Everything that can be checked before touching the model: bad input must leave it as it was."""
        config = self.config
        gradient_loss = get_method(config.method).gradient_loss(config)
        needs_gradients = gradient_loss in MODEL_LOSS_GRADIENTS  # "block" ones are measured in the layer pass
        if gradient_loss not in (None, "model") and gradient_norms is not None:
            raise ValueError(
                f"gradient_norms are the model loss's gradients taken beforehand, but this recipe takes its own "
                f"(gradient_loss={gradient_loss!r}): drop gradient_norms, or set method_options={{'gradient_loss': "
                f"'model'}} (--gradient-loss model) to use them."
            )
        if gradient_norms is not None and config.method_options.get("gradient_samples") is not None:
            raise ValueError(
                "gradient_samples chooses the sequences the gradient stage takes, but gradient_norms are given, so no "
                "gradient stage runs: drop gradient_samples (the record would claim it), or drop gradient_norms."
            )
        find_decoder_blocks(model)
        check_not_fsdp1(model, "pruning")
        modules = prunable_modules(model, config.target_modules)
        check_not_sharded(modules)
        check_offload_writable(modules)
        compute_device = check_compute_device(model, self.runtime.compute_device)
        check_pattern_fits(modules, config)
        check_finite_weights(modules)
        norms, scratch_dir = None, None
        if gradient_loss == "model_by_block":
            scratch_dir = self._scratch_parent()
            check_room_for_norms(modules, scratch_dir)
        elif needs_gradients and gradient_norms is None:
            check_gradients_computable(modules)
        elif needs_gradients and isinstance(gradient_norms, (str, os.PathLike)):
            norms = load_gradient_norms(gradient_norms, modules)
        elif needs_gradients:
            check_gradient_norms(gradient_norms, modules)
            norms = gradient_norms
        return PrunePlan(modules, compute_device, needs_gradients, norms, scratch_dir)

    def _calibrate(self, model: nn.Module, calibration: CalibrationSource | None, tokenizer: Any, text_column: str) -> PruneRun:
        """The calibration token ids, and the effective recipe: the configured one with the calibration size actually
        used (a tensor of token ids sets its own), validated now, while the model is untouched (a method may need
        more sequences than were given)."""
        config = self.config
        if not needs_calibration(config):
            return PruneRun(config.with_values(), None, None)
        if calibration is None:
            calibration = config.dataset
        if calibration is None:
            raise ValueError(
                f"method {config.method!r} needs calibration data: pass prune(model, calibration) or set "
                f"GBLMConfig(dataset=...)."
            )
        input_ids = get_calibration_data(
            calibration,
            tokenizer if tokenizer is not None else config.tokenizer,
            num_samples=config.num_samples,
            seqlen=config.seqlen,
            seed=config.seed,
            text_column=text_column,
        )
        check_token_ids(model, input_ids)
        effective = config.with_values(num_samples=int(input_ids.shape[0]), seqlen=int(input_ids.shape[1]))
        return PruneRun(effective, input_ids, source_description(calibration, text_column))

    def _scratch_parent(self) -> Path:
        """Where gradient_loss="model_by_block" writes its norms: a fresh folder inside the cache folder (never
        /tmp, often memory-backed). The cache folder is made now, for its free space to be measured."""
        parent = Path(self.runtime.cache_dir) if self.runtime.cache_dir is not None else default_cache_dir()
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise _unwritable_cache_folder(parent, error) from error
        return parent

    @contextlib.contextmanager
    def _scratch_folder(self, plan: PrunePlan) -> Iterator[Path | None]:
        """A folder for this prune's on-disk gradient norms, owned by this process and removed when the prune ends,
        however it ends: an exception, Ctrl-C or a `kill` unwinds through here, and the folders of by-block prunes
        that died harder (SIGKILL, power) are removed at the next one's start."""
        if plan.scratch_dir is None:
            yield None
            return
        try:  # only the creation: an OSError of the prune itself must pass unchanged
            remove_dead_folders(plan.scratch_dir, SCRATCH_PREFIX, "a by-block prune")
            folder = OwnedFolder(plan.scratch_dir, SCRATCH_PREFIX)
        except OSError as error:
            raise _unwritable_cache_folder(plan.scratch_dir, error) from error
        with folder, kill_unwinds():
            yield folder.path

    def _gradients(
        self, model: nn.Module, plan: PrunePlan, run: PruneRun, scratch: Path | None
    ) -> tuple[Mapping[str, torch.Tensor] | None, float]:
        """Stage 1: the gradient norms the method needs (given, cached or computed) and the seconds spent."""
        if not plan.needs_gradients or plan.gradient_norms is not None:
            return plan.gradient_norms, 0.0
        tick = time.perf_counter()
        method = get_method(run.config.method)
        norm, total = method.gradient_norm(run.config), run.input_ids.shape[0]
        used = method.gradient_samples(run.config, total)
        if method.gradient_loss(run.config) == "model_by_block":
            norms = loss_gradient_norms_by_block(
                model, layers_by_block(model, run.config.target_modules), run.input_ids[:used], scratch, norm,
                self.runtime.show_progress,
            )
            norms.factor = rescale_factor(norm, used, total)
            return norms, time.perf_counter() - tick
        norms = cached_gradient_norms(
            model,
            run.input_ids[:used],  # the cache is keyed by these very sequences
            plan.modules,
            norm=norm,  # stored without alpha: one cache, every alpha
            cache_dir=self.runtime.cache_dir,
            use_cache=self.runtime.use_cache,
            gradient_checkpointing=self.runtime.gradient_checkpointing,
            show_progress=self.runtime.show_progress,
        )
        return rescaled_to_all_sequences(norms, norm, used, total), time.perf_counter() - tick

    def _record(
        self, model: nn.Module, plan: PrunePlan, run: PruneRun, method: Any, masks: Any, timings: dict[str, float]
    ) -> None:
        """Attach the masks and the effective recipe with its record (calibration, sparsity, per-layer settings)."""
        config = run.config
        report = sparsity_report(plan.modules, {name: masks.mask(name) for name in masks.packed})
        calibration = None
        if run.input_ids is not None:
            calibration = {"source": run.source, "num_samples": config.num_samples, "seqlen": config.seqlen, "seed": config.seed}
        config.record = PruningRecord(
            base_model=base_model_info(model),
            calibration=calibration,
            global_sparsity=report["global_sparsity"],
            layer_sparsity=report["layer_sparsity"],
            layer_settings=method.layer_settings,
            timings_seconds={stage: round(seconds, 3) for stage, seconds in timings.items()},
        )
        attach_masks(model, config, masks.packed, masks.shapes)
        logger.info(
            "pruned %d layers with %s (%s): global sparsity %.4f; gradients %.1fs, prune %.1fs",
            len(plan.modules),
            config.method,
            config.pattern,
            report["global_sparsity"],
            timings["gradients"],
            timings["prune"],
        )


@dataclass
class PrunePlan:
    """What the check stage found: the layers to prune, where to compute, and the gradient norms given."""

    modules: dict[str, nn.Module]
    compute_device: torch.device | None
    needs_gradients: bool  # the model-loss gradient stage runs before the layer pass (not for gradient_loss="block")
    gradient_norms: dict[str, torch.Tensor] | None  # precomputed and checked; None: the gradient stage computes them
    scratch_dir: Path | None = None  # gradient_loss="model_by_block": where its folder of norms goes


@dataclass
class PruneRun:
    """What the calibrate stage produced: the effective recipe (built once per prune), the token ids and their
    source's description (None without calibration)."""

    config: GBLMConfig
    input_ids: torch.Tensor | None
    source: str | None


def needs_calibration(config: GBLMConfig) -> bool:
    """Whether this recipe reads calibration data (magnitude pruning does not)."""
    method = get_method(config.method)
    profile = get_profile(config.sparsity_profile)(config)
    return method.needs_activations or method.gradients_needed(config) or profile.needs_calibration(method)


def check_token_ids(model: nn.Module, input_ids: torch.Tensor) -> None:
    """Ids from another tokenizer would fail deep inside the embedding (or, within range, prune on nonsense)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is not None and input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise ValueError(
            f"calibration token ids range over [{int(input_ids.min())}, {int(input_ids.max())}] but the model's "
            f"vocabulary has {vocab} entries: the ids come from another tokenizer. Tokenize with this model's "
            f"tokenizer (or pass the text and tokenizer=...)."
        )


def check_finite_weights(modules: dict[str, nn.Module]) -> None:
    """NaN or inf weights make every score meaningless; saving such a model would ship the damage silently."""
    for name, module in modules.items():
        weight = module.weight
        if weight.device.type != "meta" and not is_dtensor(weight) and not bool(torch.isfinite(weight).all()):
            raise ValueError(
                f"{name} has NaN or inf weights: the model is damaged (or overflowed after a half-precision "
                f"conversion). Reload it from its checkpoint, in float32 if it was converted, before pruning."
            )


def check_pattern_fits(modules: dict[str, nn.Module], config: GBLMConfig) -> None:
    """N:M groups run along each row's inputs: every targeted layer's input width must be a multiple of M."""
    nm = config.nm
    if nm is None:
        return
    misfits = [name for name, module in modules.items() if weight_matrix(module).shape[1] % nm[1]]
    if misfits:
        width = weight_matrix(modules[misfits[0]]).shape[1]
        raise ValueError(
            f"pattern {config.pattern!r} needs every pruned layer's input width to be a multiple of {nm[1]}, but "
            f"{misfits[0]} has {width} inputs ({len(misfits)} such layers): leave them out with target_modules, or "
            f"choose an M that divides their width."
        )


def check_not_sharded(modules: dict[str, nn.Module]) -> None:
    """The layer-wise stage needs whole weights: on an FSDP-sharded model only the gradient stage runs."""
    sharded = [name for name, module in modules.items() if is_dtensor(module.weight)]
    if sharded:
        raise ValueError(
            f"the layer-wise stage cannot prune a model sharded with FSDP ({len(sharded)} layers, first: {sharded[0]}). "
            f"Compute the gradient norms on the sharded model, optimum_gblm.gradients.cached_gradient_norms(model, "
            f"input_ids, prunable_modules(model)) on every rank, save them from rank 0 (save_gradient_norms), then prune "
            f"the model loaded without FSDP (device_map/offload if it is large) with "
            f"GBLMPruner(config).prune(model, calibration, gradient_norms=path)."
        )


def check_gradients_computable(modules: dict[str, nn.Module]) -> None:
    """The gradient stage needs every prunable weight resident: accelerate's hooks onload an offloaded weight into a
    fresh tensor for each forward, so its gradient lands on that copy and never reaches the accumulators."""
    offloaded = [name for name, module in modules.items() if is_offloaded(module)]
    if offloaded:
        raise ValueError(
            f"the gradient stage cannot run on a model whose decoder weights are offloaded by accelerate "
            f"({len(offloaded)} layers, first: {offloaded[0]}): their gradients would be lost. Take the same "
            f"gradients one block at a time instead, method_options={{'gradient_loss': 'model_by_block'}} "
            f"(--gradient-loss model_by_block: each block is onloaded for its turn), or pass precomputed "
            f"norms, GBLMPruner(config).prune(model, calibration, gradient_norms=...) (a dict, or a safetensors file "
            f"as optimum_gblm.gradients.save_gradient_norms writes, computed on the model loaded without offload), or "
            f"load the model without CPU/disk offload."
        )


SCRATCH_PREFIX = "block-gradient-norms-"


def _unwritable_cache_folder(folder: Path, error: OSError) -> ValueError:
    return ValueError(
        f"gradient_loss='model_by_block' writes its gradient norms under the cache folder {folder}, where no folder "
        f"can be made ({error}): set cache_dir (--cache-dir) to a writable folder."
    )


def check_room_for_norms(modules: dict[str, nn.Module], folder: Path) -> None:
    """gradient_loss="model_by_block" writes one fp32 norm per prunable weight: refuse before the run, not when the
    disk fills half-way through it."""
    needed = sum(weight_matrix(module).numel() for module in modules.values()) * 4
    free = shutil.disk_usage(folder).free
    if free < needed * 1.05:  # safetensors headers, and a little room for everything else
        raise ValueError(
            f"gradient_loss='model_by_block' writes {needed / 2**30:.2f} GiB of gradient norms under {folder}, which has "
            f"{free / 2**30:.2f} GiB free: set cache_dir (--cache-dir) to a disk with room, or free some space."
        )


def check_room_for_block_inputs(model: nn.Module, run: PruneRun) -> None:
    """gradient_loss="model_by_block" keeps every block's input for each gradient sequence in host memory: refuse a
    run that cannot hold them before it starts, not when the machine starts swapping or the process is killed."""
    sequences = get_method(run.config.method).gradient_samples(run.config, run.input_ids.shape[0])
    needed = block_inputs_bytes(model, sequences, run.input_ids.shape[1])
    available = psutil.virtual_memory().available
    if needed > available:
        raise ValueError(
            f"gradient_loss='model_by_block' keeps every block's input for its {sequences} gradient sequences of "
            f"{run.input_ids.shape[1]} tokens in memory, {needed / 2**30:.2f} GiB, and {available / 2**30:.2f} GiB is "
            f"available: take the gradients on fewer sequences (method_options gradient_samples, --gradient-samples), "
            f"use shorter ones (seqlen), or free memory."
        )


def prune(
    model: nn.Module,
    calibration: CalibrationSource | None = None,
    config: GBLMConfig | None = None,
    tokenizer: Any = None,
    gradient_norms: dict[str, torch.Tensor] | str | os.PathLike | None = None,
    text_column: str = "text",
    **config_kwargs: Any,
) -> nn.Module:
    """Functional form: `prune(model, calibration, method="wanda", sparsity=0.5, tokenizer=tok)`."""
    pruner = GBLMPruner(config, **config_kwargs)
    return pruner.prune(model, calibration, tokenizer=tokenizer, gradient_norms=gradient_norms, text_column=text_column)


class PruneAtLoadQuantizer(GBLMHfQuantizer):
    """The quantizer transformers instantiates for quant_method "gblm": a pruned checkpoint loads as
    `GBLMHfQuantizer` loads it; `from_pretrained(dense, quantization_config=GBLMConfig(dataset=...))` prunes the
    model once its weights are in."""

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        config = self.quantization_config
        if not self.pre_quantized and config.dataset is None and needs_calibration(config):
            raise ValueError(
                "pruning while loading needs calibration data: GBLMConfig(dataset='c4' | 'wikitext2' | a local path, "
                "tokenizer=...)."
            )

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.pre_quantized:
            return super()._process_model_after_weight_loading(model, **kwargs)
        config = self.quantization_config
        tokenizer = config.tokenizer if config.tokenizer is not None else model.name_or_path
        GBLMPruner(config).prune(model, config.dataset, tokenizer=tokenizer)
        return model


if AUTO_QUANTIZER_MAPPING.get("gblm") is not PruneAtLoadQuantizer:
    AUTO_QUANTIZER_MAPPING.pop("gblm", None)
    register_quantizer("gblm")(PruneAtLoadQuantizer)
