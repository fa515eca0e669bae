"""`GBLMConfig`: the pruning recipe, validated on construction and round-tripped through JSON."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config
from transformers.utils.quantization_config import QuantizationConfigMixin

GRADIENT_NORMS = ("l1", "l2")
RESULT_FIELDS = (
    "base_model", "calibration", "global_sparsity", "layer_sparsity", "layer_alpha", "masks_checksum", "evaluation"
)
# Keys of earlier versions that from_dict still reads: old name -> new name.
RENAMED_KEYS = {"gradient_scale": "alpha"}
SCOPES = ("row", "layer")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """Return `(n, m)` for an N:M pattern such as "2:4", `None` for "unstructured".

    Raises `ValueError` naming the fix for anything else.
    """
    if pattern == "unstructured":
        return None
    if isinstance(pattern, str) and pattern.count(":") == 1:
        n_text, m_text = pattern.split(":")
        if n_text.strip().isdigit() and m_text.strip().isdigit():
            n, m = int(n_text), int(m_text)
            if 0 < n < m:
                return n, m
            raise ValueError(
                f"pattern {pattern!r}: N:M needs 0 < N < M (N weights removed in every group of M), "
                f"for example '2:4' or '4:8'."
            )
    raise ValueError(f"pattern {pattern!r} is not understood: use 'unstructured' or an N:M pattern such as '2:4'.")


def parse_alpha(value: str | float) -> float | str:
    """alpha from a command line or a form: "auto" or a number >= 0."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number >= 0 (default 100; 0 is Wanda) or 'auto', got {value!r}.") from None
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a number >= 0 (default 100; 0 is Wanda) or 'auto', got {value!r}.")
    return alpha


def _check_int(name: str, value: Any, minimum: int) -> None:
    # bool is an int subclass; `num_samples=True` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


@dataclass
class GBLMConfig(QuantizationConfigMixin):
    """How to prune a causal LM.

    Args:
        method: importance score, a name from `optimum_gblm.scores.SCORES`: "gblm" (|W| (||X||/sqrt(N) + G)),
            "wanda", "magnitude", "gradient" (|W| G only) or "gblm_inverse"; or "sparsegpt" (prunes and updates).
        sparsity: share of each layer's weights removed, in [0, 1). With an N:M pattern it must equal N/M.
        pattern: "unstructured" or N:M such as "2:4" / "4:8" (N removed in every M consecutive inputs of a row).
        gradient_norm: "l1" (the paper's headline) or "l2" accumulation of per-sequence gradients.
        alpha: weight of the gradient term, a number >= 0 (the paper's 100; 0 is Wanda) or "auto": per layer,
            median(||X||/sqrt(N)) / median(G), which puts both terms on the same scale (see `scores.auto_alpha`).
        num_samples: number of calibration sequences N (reference: 128).
        seqlen: tokens per calibration sequence T (reference: 2048).
        seed: seed for drawing calibration windows.
        target_modules: names (suffixes such as "q_proj", or regexes) of the linears inside the decoder blocks
            to prune; `None` prunes every linear there. Embeddings and `lm_head` are never pruned.
        use_variant: Wanda's variant for unstructured masks (one cumulative-score threshold per matrix).
        scope: "row" removes the same share from every output row (Wanda/GBLM); "layer" uses one threshold over
            the whole matrix (the reference magnitude baseline). Unstructured only.
        dataset: calibration source recorded with the recipe ("c4", "wikitext2", a local path); used when
            `prune()` gets no calibration data.
        tokenizer: tokenizer name or path, used to tokenize text calibration data.
        gradient_checkpointing: recompute activations in the gradient stage to save memory.
        sparsegpt_damping / sparsegpt_blocksize: SparseGPT's dampening (share of mean diag H) and column block.
        sparsity_profile: "uniform" (every layer at `sparsity`) or "owl" (outlier-weighted per block, unstructured).
        owl_threshold / owl_lambda: OWL's M (outlier = score above M x mean) and lambda (sparsity within +-lambda).

    Filled in by the pruner and saved with the checkpoint (`config.json`, `quantization_config`):
        base_model: the model that was pruned (name, GGUF file, licence when known).
        calibration: source, num_samples, seqlen and seed of the calibration data actually used.
        global_sparsity / layer_sparsity: the measured share of zeros, overall and per pruned layer.
        layer_alpha: with alpha="auto", the alpha each layer was scored with.
        masks_file / masks_checksum: the bit-packed masks beside the weights and the sha256 of their bits.
        evaluation: perplexity measurements (text, seqlen, tokens, dense and pruned ppl), see `record_evaluation`.
    """

    method: str = "gblm"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    gradient_norm: str = "l1"
    alpha: float | str = 100.0
    num_samples: int = 128
    seqlen: int = 2048
    seed: int = 0
    target_modules: list[str] | None = None
    use_variant: bool = False
    scope: str = "row"
    dataset: str | None = None
    tokenizer: str | None = None
    gradient_checkpointing: bool = False
    sparsegpt_damping: float = 0.01
    sparsegpt_blocksize: int = 128
    sparsity_profile: str = "uniform"
    owl_threshold: float = 5.0
    owl_lambda: float = 0.08
    base_model: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    global_sparsity: float | None = None
    layer_sparsity: dict[str, float] | None = None
    layer_alpha: dict[str, float] | None = None
    masks_file: str = "gblm_masks.safetensors"
    masks_checksum: str | None = None
    evaluation: list[dict[str, Any]] | None = None
    quant_method: str = field(default="gblm", init=False)

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -------------------------------------------------------------------------------------------
    def validate(self) -> None:
        from .scores import METHODS  # late import: scores registers methods, config only names them

        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is unknown: choose one of {sorted(METHODS)}.")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise ValueError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}.")
        if not (0.0 <= float(self.sparsity) < 1.0) or math.isnan(self.sparsity):
            raise ValueError(f"sparsity must lie in [0, 1), got {self.sparsity!r}; 0.5 removes half of each layer.")
        self.sparsity = float(self.sparsity)
        nm = parse_pattern(self.pattern)
        if nm is not None:
            n, m = nm
            if not math.isclose(self.sparsity, n / m, abs_tol=1e-9):
                raise ValueError(
                    f"pattern {self.pattern!r} removes exactly {n}/{m} = {n / m:g} of the weights, but sparsity is "
                    f"{self.sparsity:g}: set sparsity={n / m:g} or choose another pattern."
                )
            if self.use_variant:
                raise ValueError("use_variant (Wanda's variant) only applies to pattern='unstructured'.")
            if self.scope != "row":
                raise ValueError("scope='layer' only applies to pattern='unstructured'; N:M masks are per row.")
        if not isinstance(self.gradient_norm, str) or self.gradient_norm not in GRADIENT_NORMS:
            raise ValueError(f"gradient_norm must be one of {GRADIENT_NORMS}, got {self.gradient_norm!r}.")
        if self.alpha != "auto":
            if (
                isinstance(self.alpha, bool)
                or not isinstance(self.alpha, (int, float))
                or not math.isfinite(self.alpha)
                or self.alpha < 0
            ):
                raise ValueError(
                    f"alpha must be a finite number >= 0 (default 100; 0 is Wanda) or 'auto', got {self.alpha!r}."
                )
            self.alpha = float(self.alpha)
        _check_int("num_samples", self.num_samples, 1)
        _check_int("seqlen", self.seqlen, 2)
        _check_int("seed", self.seed, 0)
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):  # one name is a list of one
                self.target_modules = [self.target_modules]
            if not isinstance(self.target_modules, (list, tuple)) or not all(
                isinstance(t, str) and t for t in self.target_modules
            ):
                raise ValueError(
                    f"target_modules must be a list of module names such as ['q_proj', 'down_proj'], "
                    f"got {self.target_modules!r}."
                )
            self.target_modules = list(self.target_modules)
        if not isinstance(self.use_variant, bool):
            raise ValueError(f"use_variant must be True or False, got {self.use_variant!r}.")
        if not isinstance(self.scope, str) or self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}.")
        if self.use_variant and self.scope != "row":
            raise ValueError("use_variant picks per-row thresholds; it cannot be combined with scope='layer'.")
        if self.dataset is not None and not isinstance(self.dataset, (str, os.PathLike)):
            raise ValueError(
                f"dataset must be a name ('c4', 'wikitext2') or a path, got {type(self.dataset).__name__}; pass "
                f"other calibration data to prune(model, calibration) instead."
            )
        if isinstance(self.dataset, os.PathLike):
            self.dataset = os.fspath(self.dataset)
        if isinstance(self.tokenizer, os.PathLike):
            self.tokenizer = os.fspath(self.tokenizer)
        if self.tokenizer is not None and not isinstance(self.tokenizer, str) and not callable(self.tokenizer):
            raise ValueError(f"tokenizer must be a tokenizer or its name/path, got {type(self.tokenizer).__name__}.")
        if (
            not isinstance(self.masks_file, str)
            or not self.masks_file.endswith(".safetensors")
            or "/" in self.masks_file
            or "\\" in self.masks_file
            or self.masks_file.startswith(".")
        ):
            raise ValueError(f"masks_file must be a file name ending in .safetensors, got {self.masks_file!r}.")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be True or False, got {self.gradient_checkpointing!r}.")
        if (
            isinstance(self.sparsegpt_damping, bool)
            or not isinstance(self.sparsegpt_damping, (int, float))
            or not 0 < self.sparsegpt_damping < 1e6
        ):
            raise ValueError(f"sparsegpt_damping must be a number > 0 (default 0.01), got {self.sparsegpt_damping!r}.")
        self.sparsegpt_damping = float(self.sparsegpt_damping)
        _check_int("sparsegpt_blocksize", self.sparsegpt_blocksize, 1)
        nm = self.nm
        if nm is not None and self.sparsegpt_blocksize % nm[1]:
            raise ValueError(f"sparsegpt_blocksize must be a multiple of M={nm[1]} for pattern {self.pattern!r}.")
        if not isinstance(self.sparsity_profile, str) or self.sparsity_profile not in ("uniform", "owl"):
            raise ValueError(f"sparsity_profile must be 'uniform' or 'owl', got {self.sparsity_profile!r}.")
        if self.sparsity_profile == "owl" and nm is not None:
            raise ValueError("sparsity_profile='owl' varies sparsity per block; it needs pattern='unstructured'.")
        for name, value in (("owl_threshold", self.owl_threshold), ("owl_lambda", self.owl_lambda)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e6:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}.")
        if self.sparsity_profile == "owl" and not (0 <= self.sparsity - self.owl_lambda and self.sparsity + self.owl_lambda < 1):
            raise ValueError(
                f"with owl_lambda={self.owl_lambda:g} per-block sparsity would leave [0, 1) around {self.sparsity:g}; "
                f"lower owl_lambda."
            )
        self.owl_threshold, self.owl_lambda = float(self.owl_threshold), float(self.owl_lambda)
        self._validate_results()

    def _validate_results(self) -> None:
        # Results come back from config.json: a hand-edited or damaged file must fail here, not deep in a card.
        def number(value: Any) -> bool:
            return not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 <= value <= 1.0

        for name in ("base_model", "calibration"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a mapping or null, got {type(getattr(self, name)).__name__}.")
        if self.global_sparsity is not None and not number(self.global_sparsity):
            raise ValueError(f"global_sparsity must be a number in [0, 1] or null, got {self.global_sparsity!r}.")
        if self.layer_sparsity is not None and (
            not isinstance(self.layer_sparsity, dict)
            or not all(isinstance(k, str) and number(v) for k, v in self.layer_sparsity.items())
        ):
            raise ValueError("layer_sparsity must map layer names to numbers in [0, 1].")
        if self.layer_alpha is not None and (
            not isinstance(self.layer_alpha, dict)
            or not all(
                isinstance(k, str) and not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
                for k, v in self.layer_alpha.items()
            )
        ):
            raise ValueError("layer_alpha must map layer names to finite numbers >= 0.")
        if self.masks_checksum is not None and not (
            isinstance(self.masks_checksum, str) and re.fullmatch(r"[0-9a-f]{64}", self.masks_checksum)
        ):
            raise ValueError(f"masks_checksum must be a sha256 hex digest, got {self.masks_checksum!r}.")
        if self.evaluation is not None:
            required = {"data": str, "seqlen": int, "num_tokens": int, "perplexity": (int, float)}
            if not isinstance(self.evaluation, list) or not all(
                isinstance(e, dict) and all(isinstance(e.get(k), t) for k, t in required.items()) for e in self.evaluation
            ):
                raise ValueError(f"evaluation must be a list of {{{', '.join(required)}, dense_perplexity}} entries.")

    # -- derived ----------------------------------------------------------------------------------------------
    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    # -- (de)serialisation ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        values = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "tokenizer"}
        # A tokenizer object is recorded by its name: config.json must stay plain JSON.
        tokenizer = self.tokenizer
        values["tokenizer"] = tokenizer if tokenizer is None or isinstance(tokenizer, str) else getattr(tokenizer, "name_or_path", None)
        return values

    def recipe(self) -> dict[str, Any]:
        """The settings that define the pruning, without the measured results."""
        return {k: v for k, v in self.to_dict().items() if k not in RESULT_FIELDS}

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Build a config from `to_dict()` output. Unknown keys are an error (a typo must not pass silently)."""
        if not isinstance(config_dict, dict):
            raise ValueError(f"GBLMConfig.from_dict needs a dict, got {type(config_dict).__name__}.")
        values = {**config_dict, **kwargs}
        for old, new in RENAMED_KEYS.items():
            if old in values:
                if new in values:
                    raise ValueError(f"GBLMConfig got both {old!r} and its new name {new!r}; keep only {new!r}.")
                values[new] = values.pop(old)
        quant_method = values.pop("quant_method", "gblm")
        if quant_method != "gblm":
            raise ValueError(f"quant_method is {quant_method!r}; a GBLMConfig always has quant_method='gblm'.")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"GBLMConfig got unknown keys {unknown}; valid keys are {sorted(names)}.")
        config = cls(**values)
        return (config, {}) if return_unused_kwargs else config

    def to_json_string(self, use_diff: bool = False) -> str:
        # The full recipe, always: a reader must not need our defaults to know what was done.
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_string(cls, text: str) -> "GBLMConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"GBLMConfig JSON is not valid JSON: {error}") from None
        return cls.from_dict(data)

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        with open(json_file_path, "w", encoding="utf-8") as handle:
            handle.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, json_file_path: str | os.PathLike) -> "GBLMConfig":
        with open(json_file_path, encoding="utf-8") as handle:
            return cls.from_json_string(handle.read())




# transformers reads `quant_method: "gblm"` in config.json back into a GBLMConfig once optimum_gblm is imported.
if AUTO_QUANTIZATION_CONFIG_MAPPING.get("gblm") is not GBLMConfig:
    AUTO_QUANTIZATION_CONFIG_MAPPING.pop("gblm", None)
    register_quantization_config("gblm")(GBLMConfig)
