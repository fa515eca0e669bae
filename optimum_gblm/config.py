"""`GBLMConfig`: the pruning recipe, validated on construction and round-tripped through JSON.

Every option is defined once, here (and in each method's `Options` dataclass), with its help text in the field's
metadata; `optimum_gblm.flags` generates the CLI flags, the example scripts' arguments and the model card's
reproduce command from these fields. What a run measured lives apart, in `record.PruningRecord`; settings that
change how a run executes but not its result (caches, progress bars, gradient checkpointing) live in
`PruningRuntime`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config
from transformers.utils.quantization_config import QuantizationConfigMixin

from .files import write_atomically
from .record import FLAT_RESULT_KEYS, PruningRecord
from .registry import METHODS, PROFILES, get_method, get_profile

# How save_pretrained writes pruned weights (see `optimum_gblm.compressed`); not part of what pruning did.
STORAGES = ("dense", "compressed")
# Keys of earlier versions that from_dict still reads (see `translate_stored_recipe`): old name -> new name.
RENAMED_KEYS = {"gradient_scale": "alpha"}
# Flat per-method keys of earlier versions: old key -> (method or profile it belonged to, option name).
FLAT_METHOD_KEYS = {"sparsegpt_damping": ("sparsegpt", "damping"), "sparsegpt_blocksize": ("sparsegpt", "blocksize")}
FLAT_PROFILE_KEYS = {"owl_threshold": ("owl", "threshold"), "owl_lambda": ("owl", "spread")}
# Settings that earlier versions kept flat on the recipe and that now live in the options of the methods that have
# them (`methods.base.ScoreOptions`, `GradientOptions`): old key -> the value it held, in a recipe of a method without
# that option, that meant nothing (None: any value; earlier versions ignored alpha and gradient_norm there, and
# refused scope and use_variant off their defaults).
FLAT_OPTION_KEYS = {"alpha": None, "gradient_norm": None, "scope": "row", "use_variant": False}
# Runtime settings that earlier versions stored in the recipe; they never changed the result.
RUNTIME_KEYS = ("gradient_checkpointing",)
# Files transformers, PEFT and tokenizers write beside the weights: a mask file must never take one of their names.
RESERVED_FILE = re.compile(r"(model|pytorch_model|adapter_model|tokenizer|consolidated)([-.].*)?\.safetensors", re.IGNORECASE)


@dataclass(frozen=True)
class SparsityPattern:
    """A pattern string, parsed: `kind` names its mask selector (`masks.register_pattern`), `n` and `m` an N:M
    pattern's "n removed in every m inputs" (0 for unstructured)."""

    kind: str
    n: int = 0
    m: int = 0

    @property
    def nm(self) -> tuple[int, int] | None:
        """(n, m) for an N:M pattern, None otherwise."""
        return (self.n, self.m) if self.kind == "nm" else None


UNSTRUCTURED = SparsityPattern("unstructured")


def parse_pattern(pattern: str) -> SparsityPattern:
    """The one parser of pattern strings: "unstructured", or N:M such as "2:4". Raises `ValueError` naming the fix
    for anything else."""
    if pattern == "unstructured":
        return UNSTRUCTURED
    if isinstance(pattern, str) and pattern.count(":") == 1:
        n_text, m_text = pattern.split(":")
        if re.fullmatch(r"[0-9]+", n_text.strip()) and re.fullmatch(r"[0-9]+", m_text.strip()):
            n, m = int(n_text), int(m_text)
            if 0 < n < m:
                return SparsityPattern("nm", n, m)
            raise ValueError(
                f"pattern {pattern!r}: N:M needs 0 < N < M (N weights removed in every group of M), "
                f"for example '2:4' or '4:8'."
            )
    raise ValueError(f"pattern {pattern!r} is not understood: use 'unstructured' or an N:M pattern such as '2:4'.")


def parse_auto_or_number(value: str | float, what: str, hint: str = "") -> float | str:
    """"auto" or a finite number >= 0, from a command line, a form or Python; `what` names the setting in errors."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number < 0:
        raise ValueError(f"{what} must be a number >= 0 or 'auto'{hint}, got {value!r}.")
    return number


def parse_alpha(value: str | float) -> float | str:
    """alpha from a command line or a form: "auto" or a number >= 0."""
    return parse_auto_or_number(value, "alpha", " (0 is Wanda; leave it out for the method's default)")


def check_int(name: str, value: Any, minimum: int) -> int:
    # bool is an int subclass; `num_samples=True` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


def check_number(name: str, value: Any, low: float, high: float, fix: str = "") -> float:
    """A finite number in [low, high]; returns it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}.{(' ' + fix) if fix else ''}")
    return float(value)


def module_name_list(value: Any, requirement: str, label: str) -> list[str] | None:
    """A list of non-empty module names or regexes (one name is a list of one), or None; else ValueError: the
    `requirement` with the value, or, for an entry that does not compile, what `label` (the setting) accepts."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(name, str) and name for name in value):
        raise ValueError(f"{requirement}, got {value!r}.")
    for name in value:
        try:
            re.compile(name)
        except re.error as error:
            raise ValueError(
                f"{label} entry {name!r} is neither a module name nor a valid regex ({error}); use a name suffix such "
                f"as 'q_proj' or escape special characters (re.escape)."
            ) from None
    return list(value)


def setting(default: Any = dataclasses.MISSING, help: str = "", **metadata: Any) -> Any:  # noqa: A002 (argparse's name)
    """A dataclass field carrying its help text (and CLI hints such as `choices`, `aliases`, `cli=False`)."""
    kwargs: dict[str, Any] = {"metadata": {"help": help, **metadata}}
    if isinstance(default, (list, dict)):
        kwargs["default_factory"] = lambda: copy.deepcopy(default)
    elif default is not dataclasses.MISSING:
        kwargs["default"] = default
    return field(**kwargs)


def _fill_absent_options(values: dict[str, Any], options_class: type | None) -> None:
    """A stored recipe lacking an option that has `absent=` metadata was written before that option existed: give it
    the value that matches what was done then (e.g. gblm_obs gradient_form="bonus"), not today's default."""
    stored = values.get("method_options")
    if not isinstance(stored, dict) or not stored or options_class is None:
        return
    fields = dataclasses.fields(options_class)
    missing = {f.name: f.metadata["absent"] for f in fields if "absent" in f.metadata and f.name not in stored}
    # A stored recipe lists every option of its day, so it has all the options that never had an `absent` value; a
    # hand-written partial dict does not, and gets today's defaults.
    if missing and all(f.name in stored for f in fields if "absent" not in f.metadata):
        values["method_options"] = {**stored, **missing}


def _move_flat_keys(values: dict[str, Any], table: dict[str, tuple[str, str]], target: str, owner_key: str) -> None:
    for old, (owner, name) in table.items():
        if old in values:
            value = values.pop(old)
            # An old recipe listed every method's settings; only the chosen method's ones mean anything.
            if values.get(owner_key, GBLMConfig.__dataclass_fields__[owner_key].default) == owner:
                values[target] = {**(values.get(target) or {}), name: value}


def _move_flat_options(values: dict[str, Any], options_class: type | None) -> None:
    """alpha, gradient_norm, scope and use_variant were flat recipe fields: they go into the method's options when it
    has them, and are dropped where they meant nothing (see FLAT_OPTION_KEYS); anything else is refused by name."""
    names = {f.name for f in dataclasses.fields(options_class)} if options_class is not None else set()
    options = values.get("method_options")
    options = dict(options) if isinstance(options, dict) else options
    for key in FLAT_OPTION_KEYS:
        if key not in values:
            continue
        value = values.pop(key)
        if isinstance(options, dict) and key in options:
            raise ValueError(f"GBLMConfig got {key!r} both flat (an old recipe's) and in method_options; keep one.")
        ignored = FLAT_OPTION_KEYS[key]
        if key in names or (ignored is not None and not (value == ignored and type(value) is type(ignored))):
            options = {**(options or {}), key: value}
    if options is not None:
        values["method_options"] = options


def translate_stored_recipe(stored: dict[str, Any]) -> dict[str, Any]:
    """Today's `GBLMConfig` keyword arguments from a recipe of any earlier version: the one place that knows the
    old layouts (renamed keys, flat method / profile / result keys, runtime keys, options added since)."""
    values = dict(stored)
    for old, new in RENAMED_KEYS.items():
        if old in values:
            if new in values:
                raise ValueError(f"GBLMConfig got both {old!r} and its new name {new!r}; keep only {new!r}.")
            values[new] = values.pop(old)
    results = {k: values.pop(k) for k in FLAT_RESULT_KEYS if k in values}
    if results and any(v is not None for v in results.values()):
        if values.get("record") is not None:
            raise ValueError(f"GBLMConfig got both a record and the flat result keys {sorted(results)}; keep the record.")
        values["record"] = PruningRecord.from_dict({k: v for k, v in results.items() if v is not None})
    for key in RUNTIME_KEYS:
        values.pop(key, None)
    _move_flat_keys(values, FLAT_METHOD_KEYS, "method_options", "method")
    _move_flat_keys(values, FLAT_PROFILE_KEYS, "profile_options", "sparsity_profile")
    method_name = values.get("method", GBLMConfig.__dataclass_fields__["method"].default)
    method = METHODS.get(method_name) if isinstance(method_name, str) else None
    options_class = getattr(method, "Options", None)
    _move_flat_options(values, options_class)
    _fill_absent_options(values, options_class)
    return values


def _shared_by(name: str) -> str | None:
    """What a registered method's shared option `name` applies to (its `shared_by` metadata), if any has it."""
    for method in METHODS.values():
        options_class = getattr(method, "Options", None)
        for f in dataclasses.fields(options_class) if options_class is not None else ():
            if f.name == name and f.metadata.get("shared_by"):
                return f.metadata["shared_by"]
    return None


def options_dict(options_class: type | None, values: Any, what: str) -> dict[str, Any]:
    """Validate `values` (a mapping or an instance of `options_class`) and return every option, defaults filled in."""
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        if options_class is None or not isinstance(values, options_class):
            expected = options_class.__name__ if options_class is not None else "no options"
            raise ValueError(f"{what} needs {expected}, got {type(values).__name__}.")
        values = dataclasses.asdict(values)
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"{what} options must be a mapping such as {{'damping': 0.01}}, got {type(values).__name__}.")
    names = {f.name for f in dataclasses.fields(options_class)} if options_class is not None else set()
    unknown = sorted(set(values) - names)
    if unknown:
        shared = sorted({s for s in map(_shared_by, unknown) if s})
        where = f": {'/'.join(unknown)} apply to {' and '.join(shared)}, not to {what}" if shared else ""
        if options_class is None:
            raise ValueError(f"{what} takes no options, got {values!r}{where}.")
        raise ValueError(f"{what} has no options {unknown}{where}; its options are {sorted(names)}.")
    return dataclasses.asdict(options_class(**values)) if options_class is not None else {}


def option_flag(owner: str, name: str, kind: str = "method") -> str:
    """The command-line flag of option `name` of a registered method (or, with kind="profile", sparsity profile):
    `--<owner>-<name>` (`--sparsegpt-damping`, `--owl-spread`), or `--<name>` for an option several methods share
    (metadata `shared_by`: `--alpha`, `--scope`). The one rule: the CLI and every error message that names a flag
    use it."""
    table = METHODS if kind == "method" else PROFILES
    options_class = getattr(table.get(owner), "Options", None)
    fields = {f.name: f for f in dataclasses.fields(options_class)} if options_class is not None else {}
    if name not in fields:
        raise ValueError(f"{kind} {owner!r} has no option {name!r}.")
    stem = name if fields[name].metadata.get("shared_by") else f"{owner}_{name}"
    return "--" + stem.replace("_", "-")


@dataclass
class PruningRuntime:
    """How a run executes, not what it produces: never part of the recipe or the checkpoint."""

    cache_dir: str | None = setting(None, "gradient cache folder (default: $OPTIMUM_GBLM_CACHE or $HF_HOME/optimum_gblm)")
    use_cache: bool = setting(True, "read and write the gradient cache", negative_flag="--no-cache")
    gradient_checkpointing: bool = setting(False, "recompute activations in the gradient stage to save memory")
    show_progress: bool = setting(True, "progress bars", cli=False)
    compute_device: str | None = setting(
        None,
        "compute device for the layer-wise pass, e.g. cuda: each decoder block is moved there for its turn and back "
        "(default: where the weights are)",
    )


@dataclass
class GBLMConfig(QuantizationConfigMixin):
    """How to prune a causal LM: the recipe, saved as `quantization_config` in the checkpoint's config.json.

    `method_options` holds the chosen method's own settings (its `Options` dataclass: GBLM's alpha and gradient_norm,
    the score methods' scope and use_variant, SparseGPT's damping and block size, ...) and `profile_options` the
    sparsity profile's (OWL's threshold and spread); both accept a mapping or the dataclass and are stored with every
    default filled in; `method_settings()` and `profile_settings()` give them back as the dataclasses. `record` is
    what the run measured (see `PruningRecord`); it is filled in by the pruner. Recipes of earlier versions (flat
    `alpha`, `sparsegpt_damping`, `owl_lambda`, `layer_sparsity`, ...) still load through `from_dict`
    (`translate_stored_recipe`).
    """

    method: str = setting(
        "gblm",
        "pruning method: gblm (|W| (||X||/sqrt(N) + alpha G)), wanda, magnitude, sparsegpt, ... (see --help)",
        choices=lambda: sorted(METHODS),
    )
    sparsity: float = setting(0.5, "share of each layer's weights removed, in [0, 1); with N:M it must equal N/M")
    pattern: str = setting("unstructured", "'unstructured' or N:M such as 2:4 / 4:8 (N removed in every M inputs)")
    num_samples: int = setting(128, "calibration sequences N (reference: 128)")
    seqlen: int = setting(2048, "tokens per calibration sequence T (reference: 2048)")
    seed: int = setting(0, "seed for drawing calibration windows")
    target_modules: list[str] | None = setting(
        None, "only these linears inside the decoder blocks: name suffixes such as q_proj, or regexes matching a whole name "
        "within a block or in full (model\\.layers\\.(2[4-7])\\..* picks blocks 24-27); default: all", nargs="+"
    )
    sparsity_profile: str = setting(
        "uniform", "sparsity per layer: uniform, or owl (outlier-weighted per block, unstructured)", choices=lambda: sorted(PROFILES)
    )
    method_options: dict[str, Any] = setting({}, "the method's own settings (its Options dataclass)", cli=False)
    profile_options: dict[str, Any] = setting({}, "the sparsity profile's own settings", cli=False)
    dataset: str | None = setting(
        None,
        "calibration text: a file, folder, 'c4' or 'wikitext2' (default: Pride and Prejudice, shipped in the package, "
        "less its last 4096 tokens, on which optimum-gblm prune measures perplexity)",
        aliases=("--calibration",),
    )
    tokenizer: str | None = setting(None, "tokenizer name or path for text calibration data (default: the model's)", cli=False)
    masks_file: str = setting("gblm_masks.safetensors", "file name of the bit-packed masks beside the weights", cli=False)
    storage: str = setting(
        "dense",
        "how save_pretrained writes pruned weights: dense (exact zeros; loads anywhere) or compressed (kept values "
        "only, beside the mask file: about 56% of dense for 2:4 in bf16; loading needs optimum-gblm)",
        choices=STORAGES,
    )
    record: PruningRecord | None = setting(None, "what the run measured (filled in by the pruner)", cli=False)
    quant_method: str = field(default="gblm", init=False)

    def __post_init__(self) -> None:
        # The recipe as config.json stored it, when from_dict read it: the masks checksum of a checkpoint written by
        # an earlier version covers that form (see checksum_recipes).
        self._stored_recipe: dict[str, Any] | None = None
        self.validate()

    # -- validation -------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field (raising `ValueError` with the fix) and normalise it: numbers to float, the pattern
        parsed once (`sparsity_pattern`), options with their defaults filled in."""
        method = get_method(self.method) if isinstance(self.method, str) else None
        if method is None:
            raise ValueError(f"method {self.method!r} is unknown: choose one of {sorted(METHODS)}.")
        self._validate_sparsity_and_pattern()
        check_int("num_samples", self.num_samples, 1)
        check_int("seqlen", self.seqlen, 2)
        check_int("seed", self.seed, 0)
        self._validate_target_modules()
        self._validate_names()
        self._validate_storage()
        self.method_options = options_dict(method.Options, self.method_options, f"method {self.method!r}")
        profile = get_profile(self.sparsity_profile) if isinstance(self.sparsity_profile, str) else None
        if profile is None:
            raise ValueError(f"sparsity_profile must be one of {sorted(PROFILES)}, got {self.sparsity_profile!r}.")
        self.profile_options = options_dict(profile.Options, self.profile_options, f"sparsity_profile {self.sparsity_profile!r}")
        method.check_config(self)
        method.gradient_samples(self, self.num_samples)  # refuses more gradient sequences than calibration ones
        profile.check_config(self)
        if isinstance(self.record, dict):
            self.record = PruningRecord.from_dict(self.record)
        if self.record is not None and not isinstance(self.record, PruningRecord):
            raise ValueError(f"record must be a PruningRecord, a mapping or None, got {type(self.record).__name__}.")

    def _validate_sparsity_and_pattern(self) -> None:
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or math.isnan(self.sparsity):
            raise ValueError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}.")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must lie in [0, 1), got {self.sparsity!r}; 0.5 removes half of each layer.")
        self.sparsity = float(self.sparsity)
        self._sparsity_pattern = parse_pattern(self.pattern)
        nm = self._sparsity_pattern.nm
        if nm is not None and not math.isclose(self.sparsity, nm[0] / nm[1], abs_tol=1e-9):
            n, m = nm
            raise ValueError(
                f"pattern {self.pattern!r} removes exactly {n}/{m} = {n / m:g} of the weights, but sparsity is "
                f"{self.sparsity:g}: set sparsity={n / m:g} or choose another pattern."
            )

    def _validate_target_modules(self) -> None:
        if self.target_modules is None:
            return
        self.target_modules = module_name_list(
            self.target_modules, "target_modules must be a list of module names such as ['q_proj', 'down_proj']",
            "target_modules",
        )

    def _validate_names(self) -> None:
        # Names and paths only: objects (datasets, tokenizers) are run-time inputs of prune(), not part of a recipe.
        for name, fix in (
            ("dataset", "a name ('c4', 'wikitext2') or a path; pass other calibration data to prune(model, calibration)"),
            ("tokenizer", "a tokenizer's name or path; pass a tokenizer object to prune(model, calibration, tokenizer=tokenizer)"),
        ):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, value := os.fspath(value))
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be {fix} instead; got {type(value).__name__}.")

    def _validate_storage(self) -> None:
        if (
            not isinstance(self.masks_file, str)
            or not self.masks_file.endswith(".safetensors")
            or "/" in self.masks_file
            or "\\" in self.masks_file
            or self.masks_file.startswith(".")
        ):
            raise ValueError(f"masks_file must be a file name ending in .safetensors, got {self.masks_file!r}.")
        if RESERVED_FILE.fullmatch(self.masks_file):
            raise ValueError(
                f"masks_file {self.masks_file!r} would overwrite the checkpoint's weights, adapter or tokenizer files; "
                f"choose another name such as 'gblm_masks.safetensors'."
            )
        if not isinstance(self.storage, str) or self.storage not in STORAGES:
            raise ValueError(
                f"storage must be one of {STORAGES} (dense: zero-filled weights any stack loads; compressed: kept "
                f"values only, needs optimum-gblm to load), got {self.storage!r}."
            )

    # -- derived ----------------------------------------------------------------------------------------------
    @property
    def sparsity_pattern(self) -> SparsityPattern:
        """The pattern, parsed when the config was validated."""
        return self._sparsity_pattern

    @property
    def nm(self) -> tuple[int, int] | None:
        """(n, m) of an N:M pattern, None for unstructured."""
        return self._sparsity_pattern.nm

    def method_settings(self) -> Any:
        """The method's options as its `Options` dataclass (None for a method without options)."""
        options_class = get_method(self.method).Options
        return None if options_class is None else options_class(**self.method_options)

    def profile_settings(self) -> Any:
        """The sparsity profile's options as its `Options` dataclass (None for a profile without options)."""
        options_class = get_profile(self.sparsity_profile).Options
        return None if options_class is None else options_class(**self.profile_options)

    def with_values(self, **values: Any) -> GBLMConfig:
        """A validated copy with some fields replaced (e.g. the calibration size a run actually used, its record)."""
        copied = GBLMConfig(**{**{f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}, **values})
        copied._stored_recipe = self._stored_recipe
        return copied

    # -- (de)serialisation ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        values = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "record"}
        values["record"] = None if self.record is None else self.record.to_dict()
        return values

    def recipe(self) -> dict[str, Any]:
        """The settings that define the pruning, without what the run measured."""
        values = self.to_dict()
        values.pop("record")
        return values

    def checksum_recipes(self) -> list[dict[str, Any]]:
        """Recipes a stored masks checksum may cover: today's, the form config.json stored it in (a checkpoint of an
        earlier version checksummed its own layout), and each under another `storage` or without it (a checkpoint
        written before the field existed).

        `storage` is how the weights were written, not what pruning did: re-saving a pruned model in the other
        storage must not invalidate its checksum.
        """
        bases = [self.recipe()] + ([self._stored_recipe] if self._stored_recipe is not None else [])
        candidates = list(bases)
        for base in bases:
            candidates.append({k: v for k, v in base.items() if k != "storage"})
            candidates += [{**base, "storage": storage} for storage in STORAGES if storage != base.get("storage")]
        return candidates

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Build a config from `to_dict()` output, or from a recipe of an earlier version (see
        `translate_stored_recipe`). Unknown keys are an error (a typo must not pass silently)."""
        if not isinstance(config_dict, dict):
            raise ValueError(f"GBLMConfig.from_dict needs a dict, got {type(config_dict).__name__}.")
        stored = {**config_dict, **kwargs}
        values = translate_stored_recipe(stored)
        quant_method = values.pop("quant_method", "gblm")
        if quant_method != "gblm":
            raise ValueError(f"quant_method is {quant_method!r}; a GBLMConfig always has quant_method='gblm'.")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"GBLMConfig got unknown keys {unknown}; valid keys are {sorted(names)}.")
        config = cls(**values)
        recipe = {k: copy.deepcopy(v) for k, v in stored.items() if k not in FLAT_RESULT_KEYS and k != "record"}
        config._stored_recipe = recipe if recipe != config.recipe() else None
        return (config, {}) if return_unused_kwargs else config

    def to_json_string(self, use_diff: bool = False) -> str:
        # The full recipe, always: a reader must not need our defaults to know what was done.
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_string(cls, text: str) -> GBLMConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"GBLMConfig JSON is not valid JSON: {error}") from None
        return cls.from_dict(data)

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        text = self.to_json_string()
        write_atomically(json_file_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), suffix=".json")

    @classmethod
    def from_json_file(cls, json_file_path: str | os.PathLike) -> GBLMConfig:
        with open(json_file_path, encoding="utf-8") as handle:
            return cls.from_json_string(handle.read())


# transformers reads `quant_method: "gblm"` in config.json back into a GBLMConfig once optimum_gblm is imported.
if AUTO_QUANTIZATION_CONFIG_MAPPING.get("gblm") is not GBLMConfig:
    AUTO_QUANTIZATION_CONFIG_MAPPING.pop("gblm", None)
    register_quantization_config("gblm")(GBLMConfig)
