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
            key, raw = tok[2:], "true"
            i += 1
        out[key] = _RawCLI(raw)
    return out


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
            default = f.default if f.default is not dataclasses.MISSING else (
                "<required>" if f.default_factory is dataclasses.MISSING else f.default_factory())
            lines.append(f"  --{name} ({_name(tp)}, default {default!r}): {f.metadata.get('help', '')}")
        lines.append("")
    return "\n".join(lines)


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
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise RecipeError(f"recipe file {str(path)!r} must be a mapping of key: value")
        values, source = {**values, **loaded}, str(path)
    values.update(_parse_overrides(argv))

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
            raise RecipeError(f"unknown recipe key '{key}' in {source}" + (f" (did you mean '{near[0]}'?)" if near else ""))
        cls, (tp, _) = owners[key]
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
        missing = [n for n, (_, f) in _fields(cls).items() if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and n not in per_class[cls]]
        if missing:
            raise RecipeError(f"recipe {source} lacks the required key(s) {missing}")
        try:
            out.append(cls(**per_class[cls]))
        except (ValueError, TypeError) as e:
            raise RecipeError(f"recipe {source}: {e}") from e
    return tuple(out)


def recipe_keys(script: str) -> list[str]:
    """All keys a training script's recipe may hold."""
    from . import arguments

    names = []
    for cls in arguments.RECIPE_TYPES[script]():
        names += list(_fields(cls))
    return names


def refuse_existing_output(path: str | Path, overwrite: bool) -> None:
    """Never write into a non-empty directory unless told to: the user's earlier results stay intact."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise RecipeError(f"output path {str(p)!r} exists and is not a directory")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise RecipeError(f"output directory {str(p)!r} exists and is not empty; choose another one.")


KNOWN_RUN_ENTRIES = {"upcycled", "runs", "train.log"}  # written before the first checkpoint


def resume_point(args) -> str | None:
    """The checkpoint to resume from, or None for a fresh start; refuses to clobber a finished run."""
    from transformers.trainer_utils import get_last_checkpoint

    if args.resume_from_checkpoint:
        if not Path(args.resume_from_checkpoint).is_dir():
            raise RecipeError(f"resume_from_checkpoint={args.resume_from_checkpoint!r} is not a directory")
        return args.resume_from_checkpoint
    out = Path(args.output_dir)
    if not out.is_dir() or not any(out.iterdir()) or args.overwrite_output_dir:
        return None
    if (out / "config.json").exists():
        raise RecipeError(f"output_dir {str(out)!r} holds a finished model; choose another output_dir "
                          "or set overwrite_output_dir: true")
    last = get_last_checkpoint(str(out))
    if last is not None:
        return last
    unknown = sorted(p.name for p in out.iterdir() if p.name not in KNOWN_RUN_ENTRIES)
    if unknown:
        raise RecipeError(f"output_dir {str(out)!r} is not empty ({', '.join(unknown[:5])}); choose another "
                          "output_dir or set overwrite_output_dir: true")
    return None


def start_run(types_, argv, description: str):
    """Shared start of the training scripts: parse the recipe (gloo on CPU when distributed), decide where to
    resume, set up logging and the seed. Returns (*dataclasses, checkpoint to resume from or None)."""
    import logging
    import os

    import torch

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    gpu = torch.cuda.is_available()
    defaults = {"ddp_backend": "gloo"} if distributed and not gpu else {}  # no NCCL on CPU
    if not gpu and not distributed:
        defaults["use_cpu"] = True  # recipes are written for GPUs: on a machine without one, run on the CPU
    try:
        parsed = parse_recipe(types_, argv, defaults=defaults, description=description)
        checkpoint = resume_point(parsed[-1])
    except RecipeError as e:
        raise SystemExit(f"error: {e}") from None
    import transformers
    from transformers import set_seed

    args = parsed[-1]
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])
    logging.getLogger("train_mla").setLevel(args.get_process_log_level())
    transformers.utils.logging.set_verbosity(args.get_process_log_level())
    set_seed(args.seed)
    if "use_cpu" in defaults and args.use_cpu:
        logging.getLogger("train_mla").info(
            f"No GPU found: training on the CPU (use_cpu: true), {'bf16 autocast' if args.bf16 else 'float32'} compute")
    return (*parsed, checkpoint)


def finish_run(trainer, result, source_dir: str | Path, what: str) -> None:
    """Shared end of the training scripts: metrics and state, the model (gathered from ZeRO-3 shards), the KV-cache
    record of the source checkpoint copied beside it, and the DeepSeek-V3 export when the recipe asks for one."""
    import json
    import logging
    import shutil

    log = logging.getLogger("train_mla")
    args = trainer.args
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    trainer.save_model(args.output_dir)
    if not trainer.is_world_process_zero():
        return
    record = Path(source_dir, "kv_cache.json")  # written by the upcycling from the real source config
    if record.is_file():
        from train_mla.kv_cache_size import format_kv_table

        shutil.copy(record, Path(args.output_dir, "kv_cache.json"))
        log.info("KV cache per token:\n" + format_kv_table(json.loads(record.read_text())))
    log.info(f"Saved the {what} to {args.output_dir}: {json.dumps(result.metrics)}")
    if args.export_deepseek_dir:
        from train_mla.export_deepseek import export_checkpoint
        from train_mla.model_loading import full_weights_here

        with full_weights_here(args):  # reload the gathered 16-bit model, whole, on this process
            export_checkpoint(args.output_dir, args.export_deepseek_dir)
        log.info(f"Exported a DeepSeek-V3 checkpoint to {args.export_deepseek_dir}")
