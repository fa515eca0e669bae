"""Command-line options generated from the recipe: each option is defined once, in `config.GBLMConfig` (and each
registered method's / profile's `Options` dataclass), and this module turns those fields into

- argparse flags for `optimum-gblm prune` (`add_config_arguments`, `add_runtime_arguments`),
- the example scripts' HfArgumentParser dataclasses (`pruning_arguments_dataclass`, `runtime_arguments_dataclass`,
  and `arguments_dataclass` for any options dataclass such as the prune job's model, evaluation and output options),
- the flags that reproduce a recipe (`command_line_arguments`, used by the model card's reproduce line),

so that a new recipe field or method option shows up everywhere without a hand-written flag. The same machinery
serves any dataclass whose fields are declared with `config.setting` (`option_flags`, `add_option_arguments`,
`options_from_arguments`, `arguments_dataclass`): `optimum_gblm.jobs` declares the prune job's own settings that way.

Naming: a recipe field `num_samples` is `--num-samples` (examples: `--num_samples`, which HfArgumentParser also
accepts as `--num-samples`); a method or profile option `damping` of `sparsegpt` is `--sparsegpt-damping`, and an
option several methods share (`methods.base.ScoreOptions`, `GradientOptions`: metadata `shared_by`) keeps its plain
name, `--alpha`, `--scope` (`config.option_flag` is the rule). A method option left unset (None) means "the Options
default", so the flag of another method can be told apart and refused.

Layering: this module imports `config` and `registry` only. It reads the registries when called, by which time
`import optimum_gblm` has registered every method.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .config import GBLMConfig, PruningRuntime, option_flag
from .registry import METHODS, PROFILES

logger = logging.getLogger(__name__)

OWNER_FLAGS = {"method": "--method", "profile": "--sparsity-profile"}


@dataclass(frozen=True)
class Flag:
    """One generated option: where its value goes, how it is spelt and parsed, and its help."""

    dest: str  # attribute of the parsed namespace and field name of the generated dataclass
    flags: tuple[str, ...]  # primary flag first, then aliases
    help: str  # already escaped for argparse (a literal % is %%)
    kind: str  # "value", "list" or "bool"
    convert: Callable[[str], Any]  # text -> value (argparse's `type`)
    annotation: Any  # the dataclass field type for HfArgumentParser
    choices: tuple[Any, ...] | None
    default: Any  # the argparse / dataclass default (None for method and profile options: "their default")
    option: str  # the GBLMConfig field, or the Options field for a method / profile option
    option_default: Any  # the value the recipe holds when the flag is not given
    # ("method" | "profile", the registered names whose option it is) for a method / profile option
    owner: tuple[str, tuple[str, ...]] | None = None
    negative_flag: str | None = None  # bool defaulting to True: the flag that turns it off
    parse: Callable[[str], Any] | None = None  # config-level parser (e.g. alpha's "auto"), applied to text values
    hf_dest: str | None = None  # the example scripts' name when transformers spells it otherwise (model_name_or_path)
    required: bool = False  # a field without a default
    metavar: str | None = None  # the value's name in --help (REPO_ID)

    @property
    def primary(self) -> str:
        return self.flags[0]

    @property
    def example_dest(self) -> str:
        """The field name in the example scripts' HfArgumentParser dataclass (and in their JSON files)."""
        return self.hf_dest or self.dest


# -- reading the fields ----------------------------------------------------------------------------------------
def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation we cannot evaluate: fall back to the defaults' types
        return {}


def _strip_optional(hint: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); a union of several types stays a union."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) == 1:
            return args[0], optional
        return typing.Union[tuple(args)], optional  # noqa: UP007 (built from a runtime tuple)
    return hint, False


def _argument_type(function: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """Wrap a parser so that its ValueError becomes argparse's one-line usage error."""

    def convert(text: str) -> Any:
        try:
            return function(text)
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = name  # argparse names the type in "invalid <name> value"
    return convert


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(format_value, value))
    return format_value(value)


def format_value(value: Any) -> str:
    """A value as command-line text that parses back to the same value (floats: shortest exact form)."""
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return str(value)


def _flag_for(
    f: dataclasses.Field, hint: Any, dest: str, primary: str, option_default: Any, owner: tuple[str, tuple[str, ...]] | None
) -> Flag:
    meta = f.metadata
    text = str(meta.get("help") or "").strip()
    if not text:
        where = f"{owner[0]} {owner[1][0]!r}'s option" if owner else "GBLMConfig field"
        raise ValueError(f"{where} {f.name!r} has no help text: give it `setting(default, 'help ...')`.")
    inner, optional = _strip_optional(hint)
    if isinstance(inner, str):  # unresolved annotation
        inner = type(option_default) if option_default is not None else str
    parse = meta.get("parse")
    choices = meta.get("choices")
    if callable(choices):
        choices = choices()
    choices = tuple(choices) if choices is not None else None
    nargs = meta.get("nargs")
    origin = typing.get_origin(inner)
    negative = None
    if inner is bool:
        kind, element, annotation = "bool", bool, (bool | None) if owner else bool
        if owner is None and option_default is True:
            negative = meta.get("negative_flag") or f"--no-{primary[2:]}"
    elif nargs or origin in (list, tuple) or inner in (list, tuple):
        element_args = typing.get_args(inner)
        element = meta.get("type") or (element_args[0] if element_args and isinstance(element_args[0], type) else str)
        if parse is not None:
            element = str  # parsed item by item by to_config
        optional = optional or owner is not None or option_default is None
        kind, annotation = "list", list[element] | None if optional else list[element]
    else:
        element = meta.get("type") or (inner if inner in (int, float, str) else str)
        kind = "value"
        if parse is not None:
            element = str  # HfArgumentParser allows one type: text, parsed by to_config
        annotation = element | None if (optional or owner is not None or option_default is None) else element
    convert = _argument_type(parse, f.name) if parse is not None else element
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    if owner is not None:
        default = "" if "default" in text.lower() else f"default: {_show(option_default)}; "
        text = f"{text} ({default}only with {OWNER_FLAGS[owner[0]]} {', '.join(owner[1])})"
    elif kind != "bool" and not required and "default" not in text.lower():
        text = f"{text} (default: {_show(option_default)})"
    aliases = meta.get("aliases") or ()
    if isinstance(aliases, str):
        aliases = (aliases,)
    return Flag(
        dest=dest,
        flags=(primary, *aliases),
        help=text.replace("%", "%%"),
        kind=kind,
        convert=convert,
        annotation=annotation,
        choices=choices,
        default=None if owner is not None else option_default,
        option=f.name,
        option_default=option_default,
        owner=owner,
        negative_flag=negative,
        parse=parse,
        hf_dest=meta.get("hf_name"),
        required=required,
        metavar=meta.get("metavar"),
    )


def option_flags(option_class: type) -> list[Flag]:
    """One flag per field of an options dataclass meant for the command line (metadata `cli` not False): a field
    `eval_seqlen` is `--eval-seqlen`. Fields are declared with `config.setting(default, help, ...)`; metadata
    `hf_name` names the field in the example scripts where transformers spells it otherwise (`model_name_or_path`)."""
    hints = _type_hints(option_class)
    return [
        _flag_for(f, hints.get(f.name, f.type), f.name, "--" + f.name.replace("_", "-"), _field_default(f), None)
        for f in dataclasses.fields(option_class)
        if f.init and f.metadata.get("cli", True) is not False
    ]


def recipe_flags() -> list[Flag]:
    """One flag per `GBLMConfig` field meant for the command line."""
    return option_flags(GBLMConfig)


def owner_flags() -> list[Flag]:
    """One flag per option of every registered method and sparsity profile (`config.option_flag`): `--{name}-{option}`,
    or one `--{option}` for an option several methods share."""
    owners: dict[str, tuple[str, str, dataclasses.Field, Any, list[str]]] = {}
    for kind, table in (("method", METHODS), ("profile", PROFILES)):
        for name in sorted(table):
            options_class = getattr(table[name], "Options", None)
            if options_class is None:
                continue
            hints = _type_hints(options_class)
            for f in dataclasses.fields(options_class):
                if not f.init or f.metadata.get("cli", True) is False:
                    continue
                primary = option_flag(name, f.name, kind)
                if primary in owners:
                    owners[primary][4].append(name)  # a shared option: one flag for every method that has it
                else:
                    owners[primary] = (kind, primary, f, hints.get(f.name, f.type), [name])
    return [
        _flag_for(f, hint, primary[2:].replace("-", "_"), primary, _field_default(f), (kind, tuple(names)))
        for kind, primary, f, hint, names in owners.values()
    ]


def runtime_flags() -> list[Flag]:
    """One flag per `PruningRuntime` field meant for the command line (cache folder, gradient checkpointing...)."""
    return option_flags(PruningRuntime)


def _checked(flags: list[Flag]) -> list[Flag]:
    """Two fields must never share a flag or a destination (a method named like a recipe field could)."""
    seen_dest: dict[str, str] = {}
    seen_flag: dict[str, str] = {}
    for flag in flags:
        spellings = [*flag.flags, *([flag.negative_flag] if flag.negative_flag else [])]
        if flag.kind == "bool" and flag.owner is not None and not (flag.dest == flag.option and flag.option_default is False):
            spellings.append("--no-" + flag.primary[2:])
        for spelling in spellings:
            if spelling in seen_flag:
                raise ValueError(
                    f"option {flag.option!r} and {seen_flag[spelling]!r} would both be {spelling}: rename one."
                )
            seen_flag[spelling] = flag.option
        if flag.dest in seen_dest:
            raise ValueError(
                f"options {flag.option!r} and {seen_dest[flag.dest]!r} both map to {flag.dest!r}: rename one."
            )
        seen_dest[flag.dest] = flag.option
    return flags


def all_flags() -> list[Flag]:
    """Recipe, method / profile and runtime flags, checked for clashes."""
    return _checked(recipe_flags() + owner_flags() + runtime_flags())


# -- argparse ----------------------------------------------------------------------------------------------------
def _add(group: Any, flag: Flag, required: bool = False) -> None:
    if flag.kind == "bool":
        if flag.owner is not None and flag.dest == flag.option and flag.option_default is False:
            # a shared switch that is off by default (--use-variant): turned on or left unset, as before it was shared
            action, names, default, text = "store_const", flag.flags, None, flag.help
            group.add_argument(*names, dest=flag.dest, action=action, const=True, default=default, help=text)
            return
        if flag.owner is not None:  # unset (None) = the option's default, so both directions are spelt out
            action, names, default, text = argparse.BooleanOptionalAction, flag.flags, None, flag.help
        elif flag.negative_flag:
            action, names, default, text = "store_false", (flag.negative_flag,), True, f"turn off: {flag.help}"
        else:
            action, names, default, text = "store_true", flag.flags, bool(flag.default), flag.help
        group.add_argument(*names, dest=flag.dest, action=action, default=default, help=text)
        return
    kwargs: dict[str, Any] = {"dest": flag.dest, "type": flag.convert, "default": flag.default, "help": flag.help}
    if flag.required or required:
        kwargs["required"] = True
    if flag.metavar:
        kwargs["metavar"] = flag.metavar
    if flag.choices is not None:
        kwargs["choices"] = flag.choices
    if flag.kind == "list":
        kwargs["nargs"] = "+"
    group.add_argument(*flag.flags, **kwargs)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag per recipe field and per registered method / profile option (grouped by owner in --help)."""
    flags = _checked(recipe_flags() + owner_flags())
    listing = "; ".join(
        f"{kind} {name}: {getattr(table[name], 'help', '') or '-'}"
        for kind, table in (("method", METHODS), ("profile", PROFILES))
        for name in sorted(table)
    )
    recipe = parser.add_argument_group("pruning recipe", listing.replace("%", "%%") or None)
    for flag in flags:
        if flag.owner is None:
            _add(recipe, flag)
    groups: dict[tuple[str, tuple[str, ...]], Any] = {}
    for flag in flags:
        if flag.owner is None:
            continue
        if flag.owner not in groups:
            kind, names = flag.owner
            table = METHODS if kind == "method" else PROFILES
            description = getattr(table[names[0]], "help", "") or "" if len(names) == 1 else ""
            groups[flag.owner] = parser.add_argument_group(
                f"{kind} {', '.join(names)} options", description.replace("%", "%%") or None
            )
        _add(groups[flag.owner], flag)


def add_option_arguments(
    parser: argparse.ArgumentParser,
    option_class: type,
    title: str,
    description: str | None = None,
    required: Iterable[str] = (),
) -> None:
    """Add a flag per field of an options dataclass, as one group of --help; `required` names fields a command
    cannot do without although they have a default (`optimum-gblm eval --model`)."""
    group = parser.add_argument_group(title, description.replace("%", "%%") if description else None)
    flags = option_flags(option_class)
    unknown = set(required) - {flag.dest for flag in flags}
    if unknown:
        raise ValueError(f"cannot require {sorted(unknown)}: {option_class.__name__} has no such option.")
    for flag in flags:
        _add(group, flag, required=flag.dest in set(required))


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `PruningRuntime`: how the run executes, not what it produces."""
    add_option_arguments(parser, PruningRuntime, "runtime (does not change the result)")


# -- namespace -> config -------------------------------------------------------------------------------------------
def _value(flag: Flag, value: Any) -> Any:
    """Apply the field's parser to text (HfArgumentParser and JSON files hand over text, argparse parsed values)."""
    if flag.parse is None:
        return value
    if flag.kind == "list" and isinstance(value, (list, tuple)):
        return [flag.parse(v) if isinstance(v, str) else v for v in value]
    return flag.parse(value) if isinstance(value, str) else value


_ABSENT = object()


def _given(flag: Flag, namespace: Any) -> Any:
    """The flag's value in an argparse namespace (CLI name) or a generated dataclass (example name), else _ABSENT."""
    for name in (flag.dest, flag.example_dest):
        if hasattr(namespace, name):
            return getattr(namespace, name)
    return _ABSENT


def _values(flags: Iterable[Flag], namespace: Any) -> dict[str, Any]:
    """{field: value} of the flags the namespace holds, text parsed by the field's parser."""
    found = ((flag, _given(flag, namespace)) for flag in flags)
    return {flag.option: _value(flag, value) for flag, value in found if value is not _ABSENT}


def options_from_arguments(option_class: type, namespace: Any, **overrides: Any) -> Any:
    """Build an options dataclass (`PruningRuntime`, the job's model / evaluation / output options) from parsed flags
    (an argparse namespace or a generated dataclass instance); missing attributes keep their defaults."""
    return option_class(**{**_values(option_flags(option_class), namespace), **overrides})


def config_from_arguments(namespace: Any, **overrides: Any) -> GBLMConfig:
    """Build the recipe from parsed flags (an argparse namespace or a generated dataclass instance).

    Attributes the namespace lacks keep their defaults; `overrides` (recipe fields) win over the namespace, for
    values that come from elsewhere (the fine-tuning script's seed, a tokenizer path). Options of a method or profile
    other than the chosen one are refused by name: silently ignoring `--sparsegpt-damping` with `--method wanda`
    would hide a mistake.
    """
    values = {**_values(recipe_flags(), namespace), **overrides}
    chosen = {
        "method": values.get("method", GBLMConfig.__dataclass_fields__["method"].default),
        "profile": values.get("sparsity_profile", GBLMConfig.__dataclass_fields__["sparsity_profile"].default),
    }
    options: dict[str, dict[str, Any]] = {"method": {}, "profile": {}}
    stray = []
    for flag in owner_flags():
        value = getattr(namespace, flag.dest, None)
        if value is None:
            continue
        kind, names = flag.owner  # type: ignore[misc]
        if chosen[kind] not in names:
            stray.append(f"{flag.primary} (only with {OWNER_FLAGS[kind]} {', '.join(names)})")
        else:
            options[kind][flag.option] = _value(flag, value)
    if stray:
        raise ValueError(
            f"{', '.join(stray)} given, but the recipe uses {OWNER_FLAGS['method']} {chosen['method']} and "
            f"{OWNER_FLAGS['profile']} {chosen['profile']}: drop {'it' if len(stray) == 1 else 'them'} or change "
            f"the method / profile."
        )
    values.setdefault("method_options", options["method"])
    values.setdefault("profile_options", options["profile"])
    return GBLMConfig(**values)


def runtime_from_arguments(namespace: Any, **overrides: Any) -> PruningRuntime:
    """Build the runtime settings from parsed flags; missing attributes keep their defaults."""
    return options_from_arguments(PruningRuntime, namespace, **overrides)


# -- config -> flags -----------------------------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def _render(flag: Flag, value: Any) -> list[str]:
    if flag.kind == "bool":
        if flag.owner is not None:
            return [flag.primary if value else "--no-" + flag.primary[2:]]
        return [flag.primary] if value else [flag.negative_flag or "--no-" + flag.primary[2:]]
    if value is None:
        logger.warning("%s cannot express %s=None on the command line; it is left out.", flag.primary, flag.option)
        return []
    if flag.kind == "list":
        items = [format_value(v) for v in value]
        if not items:
            logger.warning("%s cannot express an empty list; it is left out.", flag.primary)
        return [flag.primary, *items] if items else []
    text = format_value(value)
    # A value such as "-1" or "-x" would read as a flag: attach it.
    return [f"{flag.primary}={text}"] if text.startswith("-") else [flag.primary, text]


def command_line_arguments(config: GBLMConfig, always: Iterable[str] = (), **replace: Any) -> list[str]:
    """The flags that reproduce `config`'s recipe: only what differs from the defaults.

    `always` names recipe fields to spell out even at their default (a model card states method, sparsity and
    pattern for its reader); `replace` substitutes recipe values first (e.g. the calibration source the run actually
    used). Parsing the result with `add_config_arguments` and `config_from_arguments` gives back the same recipe.
    """
    recipe = {**config.recipe(), **replace}
    always = set(always)
    arguments: list[str] = []
    for flag in recipe_flags():
        default = flag.option_default
        value = recipe.get(flag.option, default)
        stated = flag.option in always and value is not None and flag.kind != "bool"
        if stated or not _same(value, default):
            arguments += _render(flag, value)
    chosen = {"method": (recipe["method"], recipe.get("method_options") or {}, METHODS),
              "profile": (recipe["sparsity_profile"], recipe.get("profile_options") or {}, PROFILES)}
    for flag in owner_flags():
        kind, names = flag.owner  # type: ignore[misc]
        owner, values, table = chosen[kind]
        if owner in names and flag.option in values:
            # the options' own defaults, as resolved for this owner (gblm_obs's alpha default is "auto", gblm's 100)
            default = dataclasses.asdict(table[owner].Options())[flag.option]
            if not _same(values[flag.option], default):
                arguments += _render(flag, values[flag.option])
    return arguments


# -- HfArgumentParser dataclasses ------------------------------------------------------------------------------------
def _dataclass_field(flag: Flag) -> tuple[str, Any, dataclasses.Field]:
    # HfArgumentParser passes the metadata to argparse's add_argument: only keys argparse knows. It spells a field
    # `--name` and `--name-with-dashes` itself; the CLI's other spellings become aliases.
    name = flag.example_dest
    metadata: dict[str, Any] = {"help": flag.help}
    if flag.choices is not None:
        metadata["choices"] = list(flag.choices)
    if flag.metavar:
        metadata["metavar"] = flag.metavar
    automatic = {f"--{name}", "--" + name.replace("_", "-")}
    aliases = [spelling for spelling in flag.flags if spelling not in automatic]
    if aliases:
        metadata["aliases"] = aliases
    if flag.required:
        return name, flag.annotation, dataclasses.field(metadata=metadata)
    default = flag.default
    if isinstance(default, (list, dict)):
        field = dataclasses.field(default_factory=lambda d=default: list(d), metadata=metadata)  # type: ignore[misc]
        return name, flag.annotation, field
    return name, flag.annotation, dataclasses.field(default=default, metadata=metadata)


def _excluded(flags: list[Flag], exclude: Iterable[str]) -> list[Flag]:
    """The flags without those named in `exclude` (by CLI or example name)."""
    exclude = set(exclude)
    names = {f.dest for f in flags} | {f.example_dest for f in flags}
    unknown = exclude - names
    if unknown:
        raise ValueError(f"cannot exclude {sorted(unknown)}: not among the generated arguments {sorted(names)}.")
    return [f for f in flags if not {f.dest, f.example_dest} & exclude]


def _arguments_dataclass(name: str, flags: list[Flag], exclude: Sequence[str], doc: str, build: dict[str, Any]) -> type:
    """A dataclass of the flags (keyword-only, so a required field may follow one with a default), with the
    builder method(s) in `build`."""
    fields = [_dataclass_field(f) for f in _excluded(flags, exclude)]
    return dataclasses.make_dataclass(name, fields, namespace={**build, "__doc__": doc}, kw_only=True)


def pruning_arguments_dataclass(exclude: Sequence[str] = (), name: str = "PruningArguments") -> type:
    """A dataclass for transformers' HfArgumentParser with the CLI's recipe and method options (underscored names,
    same help); its `to_config(**overrides)` builds the `GBLMConfig`.

    `exclude` drops arguments another dataclass of the same parser already defines (TrainingArguments' `seed`);
    pass their values to `to_config` instead.
    """

    def to_config(self: Any, **overrides: Any) -> GBLMConfig:
        return config_from_arguments(self, **overrides)

    doc = "The pruning recipe, generated from GBLMConfig (see optimum_gblm.flags)."
    return _arguments_dataclass(name, _checked(recipe_flags() + owner_flags()), exclude, doc, {"to_config": to_config})


def arguments_dataclass(option_class: type, exclude: Sequence[str] = (), name: str | None = None) -> type:
    """A dataclass for HfArgumentParser with an options dataclass's fields (the job's model, evaluation and output
    options, `PruningRuntime`), named as transformers' example scripts name them where a field says so
    (`hf_name`: `--model_name_or_path`, with the CLI's `--model` as an alias); `to_options(**overrides)` builds
    the options object."""

    def to_options(self: Any, **overrides: Any) -> Any:
        return options_from_arguments(option_class, self, **overrides)

    name = name or option_class.__name__.replace("Options", "") + "Arguments"
    doc = f"Generated from {option_class.__name__} (see optimum_gblm.flags). {option_class.__doc__ or ''}".strip()
    return _arguments_dataclass(name, option_flags(option_class), exclude, doc, {"to_options": to_options})


def runtime_arguments_dataclass(exclude: Sequence[str] = (), name: str = "RuntimeArguments") -> type:
    """`arguments_dataclass(PruningRuntime)`, whose builder is also called `to_runtime(**overrides)`."""
    generated = arguments_dataclass(PruningRuntime, exclude, name)
    generated.to_runtime = generated.to_options
    return generated
