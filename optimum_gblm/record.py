"""`PruningRecord`: what a pruning run measured and did, kept apart from the recipe that asked for it.

It travels in `config.json` as `quantization_config["record"]`, beside the recipe (`GBLMConfig`), and is checked when
read back: a hand-edited or damaged file must fail here, not deep inside a model card.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

# Result keys that earlier versions kept flat beside the recipe: GBLMConfig.from_dict moves them in here.
FLAT_RESULT_KEYS = ("base_model", "calibration", "global_sparsity", "layer_sparsity", "layer_alpha", "masks_checksum", "evaluation")
EVALUATION_KEYS = {"data": str, "seqlen": int, "num_tokens": int, "perplexity": (int, float)}


def _fraction(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 <= value <= 1.0


def _perplexity(value: Any) -> bool:
    # inf is a real outcome (a broken model); NaN, negatives and strings are damage
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value >= 1.0


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


@dataclass
class PruningRecord:
    """Filled in by the pruner and saved with the checkpoint.

    Args:
        base_model: the model that was pruned (name, GGUF file, licence when known).
        calibration: source, num_samples, seqlen and seed of the calibration data actually used.
        global_sparsity / layer_sparsity: the share of weights the masks remove, overall and per pruned layer.
        layer_settings: values a method chose per layer, by setting: {"alpha": {layer: alpha}} for alpha="auto".
        masks_checksum: sha256 over the recipe and the mask bits (see `masks.masks_checksum`).
        evaluation: perplexity measurements (data, seqlen, num_tokens, dense_perplexity, perplexity).
        timings_seconds: gradients, prune and total wall-clock seconds of the run.
    """

    base_model: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    global_sparsity: float | None = None
    layer_sparsity: dict[str, float] | None = None
    layer_settings: dict[str, dict[str, float]] = field(default_factory=dict)
    masks_checksum: str | None = None
    evaluation: list[dict[str, Any]] = field(default_factory=list)
    timings_seconds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("base_model", "calibration"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise ValueError(f"record.{name} must be a mapping or null, got {type(getattr(self, name)).__name__}.")
        if self.global_sparsity is not None and not _fraction(self.global_sparsity):
            raise ValueError(f"record.global_sparsity must be a number in [0, 1] or null, got {self.global_sparsity!r}.")
        if self.layer_sparsity is not None and (
            not isinstance(self.layer_sparsity, dict)
            or not all(isinstance(k, str) and _fraction(v) for k, v in self.layer_sparsity.items())
        ):
            raise ValueError("record.layer_sparsity must map layer names to numbers in [0, 1].")
        if self.layer_settings is None:
            self.layer_settings = {}
        if not isinstance(self.layer_settings, dict) or not all(
            isinstance(setting, str)
            and isinstance(values, dict)
            and all(isinstance(k, str) and _finite(v) and v >= 0 for k, v in values.items())
            for setting, values in self.layer_settings.items()
        ):
            raise ValueError("record.layer_settings must map a setting name to {layer name: finite number >= 0}.")
        if self.masks_checksum is not None and not (
            isinstance(self.masks_checksum, str) and re.fullmatch(r"[0-9a-f]{64}", self.masks_checksum)
        ):
            raise ValueError(f"record.masks_checksum must be a sha256 hex digest, got {self.masks_checksum!r}.")
        if self.evaluation is None:
            self.evaluation = []
        if not isinstance(self.evaluation, list) or not all(
            isinstance(e, dict)
            and all(isinstance(e.get(k), t) and not isinstance(e.get(k), bool) for k, t in EVALUATION_KEYS.items())
            and (e.get("dense_perplexity") is None or _perplexity(e["dense_perplexity"]))
            and _perplexity(e["perplexity"])
            for e in self.evaluation
        ):
            raise ValueError(f"record.evaluation must be a list of {{{', '.join(EVALUATION_KEYS)}, dense_perplexity}} entries.")
        if self.timings_seconds is None:
            self.timings_seconds = {}
        if not isinstance(self.timings_seconds, dict) or not all(
            isinstance(k, str) and _finite(v) and v >= 0 for k, v in self.timings_seconds.items()
        ):
            raise ValueError("record.timings_seconds must map stage names to seconds >= 0.")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PruningRecord:
        if not isinstance(values, dict):
            raise ValueError(f"record must be a mapping, got {type(values).__name__}.")
        values = dict(values)
        if "layer_alpha" in values:  # flat key of earlier versions
            alpha = values.pop("layer_alpha")
            if alpha is not None:
                values.setdefault("layer_settings", {})
                values["layer_settings"] = {**(values["layer_settings"] or {}), "alpha": alpha}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"record got unknown keys {unknown}; valid keys are {sorted(names)}.")
        return cls(**values)

    def record_evaluation(self, entry: dict[str, Any]) -> None:
        """Add a perplexity measurement, replacing an earlier one of the same text and seqlen; a re-measurement
        without a dense number keeps the earlier dense number of the same protocol (the dense model is gone)."""
        protocol = (entry["data"], entry["seqlen"])
        for earlier in self.evaluation:
            same = (earlier["data"], earlier["seqlen"], earlier["num_tokens"]) == (*protocol, entry["num_tokens"])
            if same and entry.get("dense_perplexity") is None and earlier.get("dense_perplexity") is not None:
                entry = {**entry, "dense_perplexity": earlier["dense_perplexity"]}
        kept = [e for e in self.evaluation if (e["data"], e["seqlen"]) != protocol]
        self.evaluation = kept + [entry]
        self.validate()
