"""`GBLMPruner`: calibration data -> (gradient norms) -> layer-wise scores and masks -> a sparse model that records
what was done in its config."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from optimum.quantization_base import OptimumQuantizer
from torch import nn

from .config import GBLMConfig
from .data import CalibrationSource, get_calibration_data, source_description
from .engine import InputStats, as_matrix, find_decoder_blocks, prunable_modules, run_layerwise, weight_matrix
from .engine import check_offload_writable, is_offloaded, prune_without_calibration
from .gradients import cached_gradient_norms, check_gradient_norms, check_not_fsdp1, is_dtensor, load_gradient_norms
from .integration import attach_masks, check_output_dir, detach_masks, save_pretrained_atomically
from .masks import pack_mask, select_mask, unpack_mask
from .modeling import base_model_info, load_model, strip_gguf_quantization
from .scores import ScoreSpec, auto_alpha, get_score
from .owl import OutlierMeter, block_of, owl_sparsities
from .sparsegpt import SparseGPTPruner

logger = logging.getLogger(__name__)


class ScorePruner:
    """Prunes a layer by masking its lowest-scoring weights (magnitude, Wanda, GBLM and variants)."""

    def __init__(self, config: GBLMConfig, score: ScoreSpec, gradient_norms: dict[str, torch.Tensor] | None):
        self.config, self.score, self.gradient_norms = config, score, gradient_norms
        self.collects_inputs = score.needs_activations
        self.packed_masks: dict[str, torch.Tensor] = {}
        self.mask_shapes: dict[str, tuple[int, ...]] = {}
        self.layer_sparsity: dict[str, float] = {}  # per-layer overrides (OWL); others use config.sparsity
        self.layer_alpha: dict[str, float] = {}  # alpha each layer was scored with, when alpha="auto"

    def new_stats(self, name: str, module: nn.Module):
        return InputStats(weight_matrix(module).shape[1], module.weight.device)

    def scores_for(self, name: str, module: nn.Module, stats: Any) -> torch.Tensor:
        weight = weight_matrix(module)
        input_sq_mean = stats.sq_mean if stats is not None else None
        gradient = None
        if self.score.needs_gradients:
            gradient = as_matrix(module, self.gradient_norms[name]).to(weight.device)
            # alpha only matters where the gradient term is weighed against the activation term.
            if self.score.needs_activations:
                alpha = self.config.alpha
                if alpha == "auto":
                    alpha = self.layer_alpha[name] = auto_alpha(input_sq_mean, gradient)
                gradient = gradient * alpha
        return self.score.fn(weight, input_sq_mean, gradient)

    @torch.no_grad()
    def prune_layer(self, name: str, module: nn.Module, stats: Any) -> None:
        weight = weight_matrix(module)
        mask = select_mask(self.scores_for(name, module, stats), self.config, self.layer_sparsity.get(name))
        weight.masked_fill_(~mask, 0)
        # Stored bit-packed in the weight's own layout: 1/8 byte per weight, whatever the model size.
        self.packed_masks[name] = pack_mask(as_matrix(module, mask))
        self.mask_shapes[name] = tuple(module.weight.shape)


class GBLMPruner(OptimumQuantizer):
    """Prunes a causal LM in place with the method, sparsity and pattern of a `GBLMConfig`.

    >>> model = GBLMPruner(GBLMConfig(sparsity=0.5, pattern="2:4")).prune(model, calibration, tokenizer=tokenizer)

    The result is recorded as `model.config.quantization_config` (a `GBLMConfig` holding the recipe, calibration and
    measured sparsity) and the masks travel with `save_pretrained`.
    """

    def __init__(
        self,
        config: GBLMConfig | None = None,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        show_progress: bool = True,
        **config_kwargs: Any,
    ):
        if config is None:
            config = GBLMConfig(**config_kwargs)
        elif config_kwargs:
            raise ValueError("pass either a GBLMConfig or its fields as keyword arguments, not both.")
        if not isinstance(config, GBLMConfig):
            raise ValueError(f"config must be a GBLMConfig, got {type(config).__name__}.")
        config.validate()
        self.config = config
        self.cache_dir, self.use_cache, self.show_progress = cache_dir, use_cache, show_progress
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
    ) -> "GBLMPruner":
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
        from .hub import push_to_hub

        if self.model is None or not hasattr(getattr(self.model, "config", None), "quantization_config"):
            raise ValueError("nothing to push: bind a model with from_pretrained() and prune it (quantize()) first.")
        return push_to_hub(self.model, repo_id, tokenizer=self.tokenizer, **kwargs)

    def prune(
        self,
        model: nn.Module,
        calibration: CalibrationSource | None = None,
        tokenizer: Any = None,
        gradient_norms: dict[str, torch.Tensor] | str | os.PathLike | None = None,
    ) -> nn.Module:
        """Prune `model` in place and return it.

        Args:
            model: a transformers causal LM (any decoder-only model whose blocks form an nn.ModuleList).
            calibration: token ids (N, T), texts, a datasets.Dataset, a file/folder, "c4" or "wikitext2";
                defaults to `config.dataset`. Not needed for magnitude pruning.
            tokenizer: tokenizer (or its name) for text calibration data; defaults to `config.tokenizer`.
            gradient_norms: precomputed norms (a dict or a safetensors path) instead of computing/caching them.
        """
        config = self.config
        score = get_score(config.method) if config.method != "sparsegpt" else None
        needs_activations = score is None or score.needs_activations
        needs_gradients = score is not None and score.needs_gradients
        start = time.perf_counter()
        # Check everything before touching the model: bad input must leave it as it was.
        find_decoder_blocks(model)
        check_not_fsdp1(model, "pruning")
        modules = prunable_modules(model, config.target_modules)
        check_not_sharded(modules)
        check_offload_writable(modules)
        if needs_gradients and gradient_norms is None:
            check_gradients_computable(modules)

        input_ids = None
        if needs_activations or needs_gradients:
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
            )

        strip_gguf_quantization(model)  # GGUF's quantizer state would clash with ours
        detach_masks(model)  # a fresh prune replaces any earlier one
        norms = None
        gradient_seconds = 0.0
        if needs_gradients:
            if gradient_norms is not None:
                if isinstance(gradient_norms, (str, os.PathLike)):
                    norms = load_gradient_norms(gradient_norms, modules)
                else:
                    check_gradient_norms(gradient_norms, modules)
                    norms = gradient_norms
            else:
                tick = time.perf_counter()
                norms = cached_gradient_norms(
                    model,
                    input_ids,
                    modules,
                    norm=config.gradient_norm,  # stored without alpha: one cache serves every alpha
                    cache_dir=self.cache_dir,
                    use_cache=self.use_cache,
                    gradient_checkpointing=config.gradient_checkpointing,
                    show_progress=self.show_progress,
                )
                gradient_seconds = time.perf_counter() - tick

        tick = time.perf_counter()
        layer_pruner = SparseGPTPruner(config) if score is None else ScorePruner(config, score, norms)

        def run(pruner) -> None:
            if needs_activations:
                run_layerwise(model, input_ids, pruner, config.target_modules, show_progress=self.show_progress)
            else:
                prune_without_calibration(modules, pruner)

        if config.sparsity_profile == "owl":
            # One measuring pass over the dense model, then per-block sparsities for the pruning pass.
            scorer = layer_pruner if score is not None else ScorePruner(config, get_score("wanda"), None)
            meter = OutlierMeter(scorer.scores_for, config.owl_threshold)
            run(meter)
            meter.finish()
            per_block = owl_sparsities(meter.outlier_share, meter.block_params, config.sparsity, config.owl_lambda)
            layer_pruner.layer_sparsity = {name: per_block[block_of(name)] for name in modules}
            logger.info("OWL per-block sparsity: %s", {b: round(v, 4) for b, v in per_block.items()})
        run(layer_pruner)
        prune_seconds = time.perf_counter() - tick

        report = sparsity_report(
            modules,
            {n: unpack_mask(p, layer_pruner.mask_shapes[n]) for n, p in layer_pruner.packed_masks.items()},
        )
        calibration_record = None
        if input_ids is not None:
            calibration_record = {
                "source": source_description(calibration),
                "num_samples": int(input_ids.shape[0]),
                "seqlen": int(input_ids.shape[1]),
                "seed": config.seed,
            }
        result = GBLMConfig.from_dict(
            {
                **config.recipe(),
                # What was actually used: a tensor of token ids sets its own size.
                **({} if input_ids is None else {"num_samples": calibration_record["num_samples"], "seqlen": calibration_record["seqlen"]}),
                "base_model": base_model_info(model),
                "calibration": calibration_record,
                **report,
                "layer_alpha": dict(layer_pruner.layer_alpha) if config.alpha == "auto" and score is not None else None,
                "masks_checksum": None,
            }
        )
        attach_masks(model, result, layer_pruner.packed_masks, layer_pruner.mask_shapes)
        record = {
            "config": result,
            "timings_seconds": {
                "gradients": round(gradient_seconds, 3),
                "prune": round(prune_seconds, 3),
                "total": round(time.perf_counter() - start, 3),
            },
        }
        self.last_record = record
        logger.info(
            "pruned %d layers with %s (%s): global sparsity %.4f; gradients %.1fs, prune %.1fs",
            len(modules),
            config.method,
            config.pattern,
            report["global_sparsity"],
            gradient_seconds,
            prune_seconds,
        )
        return model


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
            f"({len(offloaded)} layers, first: {offloaded[0]}): their gradients would be lost. Pass precomputed "
            f"norms, GBLMPruner(config).prune(model, calibration, gradient_norms=...) (a dict, or a safetensors file "
            f"as optimum_gblm.gradients.save_gradient_norms writes, computed on the model loaded without offload), or "
            f"load the model without CPU/disk offload."
        )


def sparsity_report(
    modules: dict[str, nn.Module], masks: dict[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """Share of pruned weights per layer and over all of them: from keep-masks when given, else the exact zeros.

    Masks are what pruning removed; zeros can also include kept weights that happen to be 0.0 (dequantized GGUF
    weights have some) and that fine-tuning may move.
    """
    pruned = total = 0
    per_layer = {}
    for name, module in modules.items():
        layer_pruned = int((~masks[name]).sum()) if masks is not None else int((module.weight == 0).sum())
        per_layer[name] = round(layer_pruned / module.weight.numel(), 6)
        pruned += layer_pruned
        total += module.weight.numel()
    return {"global_sparsity": round(pruned / total, 6), "layer_sparsity": per_layer}


def prune(
    model: nn.Module,
    calibration: CalibrationSource | None = None,
    config: GBLMConfig | None = None,
    tokenizer: Any = None,
    gradient_norms: dict[str, torch.Tensor] | str | os.PathLike | None = None,
    **config_kwargs: Any,
) -> nn.Module:
    """Functional form: `prune(model, calibration, method="wanda", sparsity=0.5, tokenizer=tok)`."""
    return GBLMPruner(config, **config_kwargs).prune(model, calibration, tokenizer=tokenizer, gradient_norms=gradient_norms)
