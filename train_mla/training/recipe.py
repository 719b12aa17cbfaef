"""Parse a YAML recipe (plus `--key value` overrides) into dataclasses, checking every key and type first.

An unknown key or a value of the wrong type is an error that names the key, raised before any model loads.
"""

import dataclasses
import difflib
import enum
import sys
import types
import typing
from pathlib import Path

import yaml


class RecipeError(ValueError):
    pass


def _coerce(key: str, value, tp):
    """Return `value` converted to the annotation `tp`, or raise RecipeError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any or tp is object or isinstance(tp, (str, typing.TypeVar)):
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):  # str last
            try:
                return _coerce(key, value, a)
            except RecipeError:
                continue
        hint = " (YAML reads yes/no/on/off as booleans: quote the word)" if isinstance(value, bool) else ""
        raise RecipeError(f"recipe key '{key}': {value!r} is not a valid {_name(tp)}{hint}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise RecipeError(f"recipe key '{key}': {value!r} is not one of {list(args)}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [e.value for e in tp]
        if isinstance(value, tp) or value in allowed:
            return value
        raise RecipeError(f"recipe key '{key}': {value!r} is not one of {allowed}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"recipe key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"recipe key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 8e-5 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"recipe key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"recipe key '{key}': expected a string, got {value!r}")
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"recipe key '{key}': expected a list, got {value!r}")
        inner = args[0] if args else typing.Any
        return [_coerce(key, v, inner) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"recipe key '{key}': expected a mapping, got {value!r}")
        return value
    return value


def _name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _fields(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints.get(f.name, typing.Any), f) for f in dataclasses.fields(cls) if f.init}


def _parse_overrides(tokens: list[str]) -> dict:
    out, i = {}, 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise RecipeError(f"unexpected argument {tok!r}: overrides are written --key value")
        if "=" in tok:
            key, raw = tok[2:].split("=", 1)
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            key, raw = tok[2:], tokens[i + 1]
            i += 2
        else:
            key, raw = tok[2:], _BARE_FLAG
            i += 1
        out[key] = _RawCLI(raw)
    return out


_BARE_FLAG = "\0bare"  # `--key` with no value: true for a boolean key, an error for any other


class _RawCLI(str):
    """A command-line value: read as YAML (numbers, lists, booleans), or kept as the literal text when the
    field wants a string (so `--eval_strategy no` stays "no")."""

    def parsed(self):
        return yaml.safe_load(self) if self != "" else ""


def _help(types_, prog, description) -> str:
    lines = [f"usage: {prog} [recipe.yaml] [--key value ...]", "", description, ""]
    for cls in types_:
        lines.append(f"{cls.__name__}: {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}")
        for name, (tp, f) in _fields(cls).items():
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else ("<required>" if f.default_factory is dataclasses.MISSING else f.default_factory())
            )
            lines.append(f"  --{name} ({_name(tp)}, default {default!r}): {f.metadata.get('help', '')}")
        lines.append("")
    return "\n".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (plain YAML keeps the last value silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise RecipeError(
                    f"key '{key}' appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); keep one"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def parse_recipe(types_, argv=None, *, prog=None, description="", ignore_unknown_from=None, defaults=None):
    """Return one instance per dataclass in `types_`, from `[recipe.yaml] [--key value ...]`.

    `ignore_unknown_from` names a script ('train_distill' or 'train_dpo') whose recipe keys may be present and
    are skipped (so the converter can read a training recipe). `defaults` are applied under the recipe's values.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or Path(sys.argv[0]).name
    if "-h" in argv or "--help" in argv:
        print(_help(types_, prog, description))
        raise SystemExit(0)
    values, source = dict(defaults or {}), "command line"
    if argv and not argv[0].startswith("--"):
        path = Path(argv.pop(0))
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        try:
            loaded = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except RecipeError as e:
            raise RecipeError(f"recipe file {str(path)!r}: {e}") from None
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe file {str(path)!r} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise RecipeError(f"recipe file {str(path)!r} must be a mapping of key: value")
        values, source = {**values, **loaded}, str(path)
    overrides = _parse_overrides(argv)
    values.update(overrides)

    owners = {}
    for cls in types_:
        for name, spec in _fields(cls).items():
            owners.setdefault(name, (cls, spec))
    ignorable = set(recipe_keys(ignore_unknown_from)) if ignore_unknown_from else set()
    per_class = {cls: {} for cls in types_}
    for key, value in values.items():
        if key not in owners:
            if key in ignorable:
                continue
            near = difflib.get_close_matches(key, list(owners), n=1)
            where = "on the command line" if key in overrides else f"in {source}"
            raise RecipeError(f"unknown recipe key '{key}' {where}" + (f" (did you mean '{near[0]}'?)" if near else ""))
        cls, (tp, _) = owners[key]
        if isinstance(value, _RawCLI) and value == _BARE_FLAG:
            if tp is not bool and not (
                typing.get_origin(tp) in (typing.Union, types.UnionType) and bool in typing.get_args(tp)
            ):
                raise RecipeError(f"command-line flag '--{key}' has no value: write --{key} VALUE ({_name(tp)})")
            value = _RawCLI("true")
        if isinstance(value, _RawCLI):
            try:
                value = _coerce(key, value.parsed(), tp)
            except RecipeError:
                value = _coerce(key, str(value), tp)
            per_class[cls][key] = value
        else:
            per_class[cls][key] = _coerce(key, value, tp)
    out = []
    for cls in types_:
        missing = [
            n
            for n, (_, f) in _fields(cls).items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and n not in per_class[cls]
        ]
        if missing:
            raise RecipeError(f"recipe {source} lacks the required key(s) {missing}")
        try:
            out.append(cls(**per_class[cls]))
        except (ValueError, TypeError) as e:
            raise RecipeError(f"recipe {source}: {e}") from e
    return tuple(out)


def recipe_keys(script: str) -> list[str]:
    """All keys a training script's recipe may hold."""
    from train_mla.training import arguments

    names = []
    for cls in arguments.RECIPE_TYPES[script]:
        names += list(_fields(cls))
    return names
