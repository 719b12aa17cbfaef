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
            default = f.default if f.default is not dataclasses.MISSING else (
                "<required>" if f.default_factory is dataclasses.MISSING else f.default_factory())
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
                raise RecipeError(f"key '{key}' appears twice (lines {seen[key] + 1} and "
                                  f"{key_node.start_mark.line + 1}); keep one")
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
            if tp is not bool and not (typing.get_origin(tp) in (typing.Union, types.UnionType)
                                       and bool in typing.get_args(tp)):
                raise RecipeError(f"command-line flag '--{key}' has no value: write --{key} VALUE "
                                  f"({_name(tp)})")
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


KNOWN_RUN_ENTRIES = {"upcycled", "runs", "train.log", ".lock"}  # written before the first checkpoint


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is unusable (None = its header is whole and the file as long as the header says)."""
    import json
    import struct

    size = path.stat().st_size
    if size < 8:
        return f"{path.name} is {size} bytes long"
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        if 8 + n > size:
            return f"{path.name}: its header runs past the end of the file (cut short)"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return f"{path.name}: its header is not valid JSON"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    return None if 8 + n + end == size else f"{path.name} holds {size} bytes, its header needs {8 + n + end} (cut short)"


def saved_model_problem(folder: Path) -> str | None:
    """Why `folder` holds no complete saved model (config + weights); None = complete."""
    config = folder / "config.json"
    if not config.is_file() or config.stat().st_size == 0:
        return "config.json is missing or empty"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return "no .safetensors weights"
    return next((p for p in map(safetensors_problem, weights) if p), None)


def finished_run_problem(folder: Path) -> str | None:
    """Why `folder` holds no finished training output; None = finished. finish_run writes the weights and config, the
    tokenizer, then the model card (README.md) last: a final model counts once every file a later step reads is there."""
    problem = saved_model_problem(folder)
    if problem:
        return problem
    missing = [n for n in ("tokenizer_config.json", "README.md") if not (folder / n).is_file()]
    return f"{' and '.join(missing)} missing (the final save was cut short)" if missing else None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint-N folder cannot be resumed from; None = complete. The Trainer writes trainer_state.json last,
    so a checkpoint counts only once it is there; every other file must be non-empty, every weight file whole."""
    import json

    state = ckpt / "trainer_state.json"
    if not state.is_file():
        return "trainer_state.json is missing (the save was cut short)"
    try:
        loaded = json.loads(state.read_text())
    except ValueError:
        return "trainer_state.json is not valid JSON"
    if not isinstance(loaded, dict) or not isinstance(loaded.get("global_step"), int):
        return "trainer_state.json holds no global_step (not a trainer state)"
    empty = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.stat().st_size == 0)
    if empty:
        return f"empty file(s): {', '.join(empty[:3])}"
    for p in sorted(ckpt.rglob("*.pt")) + sorted(ckpt.rglob("*.pth")):  # torch.save writes a zip archive
        with open(p, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return f"{p.relative_to(ckpt)} is not a torch.save archive (zero-filled or cut short?)"
    deepspeed = any(ckpt.glob("global_step*"))
    weights = sorted(ckpt.glob("*.safetensors"))
    if not weights and not deepspeed:
        return "no model weights"
    return next((p for p in map(safetensors_problem, weights) if p), None)


def newest_complete_checkpoint(out: Path, log=print) -> str | None:
    """The complete checkpoint-N with the largest N; each newer incomplete one is named with what is wrong with it."""
    found = sorted((int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[1].isdigit())
    for _, ckpt in reversed(found):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return str(ckpt)
        log(f"Skipping the incomplete checkpoint {ckpt}: {problem}")
    return None


def resume_point(args) -> str | None:
    """The checkpoint to resume from, or None for a fresh start; refuses to clobber a finished run."""
    import logging

    log = logging.getLogger("train_mla").warning
    if args.resume_from_checkpoint:
        ckpt = Path(args.resume_from_checkpoint)
        if not ckpt.is_dir():
            raise RecipeError(f"resume_from_checkpoint={args.resume_from_checkpoint!r} is not a directory")
        problem = checkpoint_problem(ckpt)
        if problem:
            raise RecipeError(f"resume_from_checkpoint={args.resume_from_checkpoint!r} is incomplete: {problem}")
        return args.resume_from_checkpoint
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise RecipeError(f"output_dir {str(out)!r} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()) or args.overwrite_output_dir:
        return None
    for tmp in out.glob("upcycled.tmp-*"):  # an upcycled model being written when its run was killed
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            import shutil

            log(f"Removing {tmp}: an upcycled model left half-written by a stopped run (process {pid})")
            shutil.rmtree(tmp, ignore_errors=True)
    last = newest_complete_checkpoint(out, log)
    final = finished_run_problem(out) if (out / "config.json").exists() else "absent"
    if final is None:
        raise RecipeError(f"output_dir {str(out)!r} holds a finished model; choose another output_dir "
                          "or set overwrite_output_dir: true")
    if final != "absent":
        if last is None:
            raise RecipeError(f"output_dir {str(out)!r} holds a half-written final model ({final}) and no complete "
                              "checkpoint: choose another output_dir or set overwrite_output_dir: true")
        log(f"The final model in {out} is incomplete ({final}): resuming from {last}, which saves it again")
    if last is not None:
        return last
    unknown = sorted(p.name for p in out.iterdir() if p.name not in KNOWN_RUN_ENTRIES
                     and not p.name.startswith(("checkpoint-", "upcycled.tmp-")))
    if unknown:
        raise RecipeError(f"output_dir {str(out)!r} is not empty ({', '.join(unknown[:5])}); choose another "
                          "output_dir or set overwrite_output_dir: true")
    return None


class OutputLock:
    """One run per output folder: `output_dir/.lock` holds the PID and host of the run that owns it. A second run stops
    with a message; a lock whose process is gone (same host) is taken over with a warning. Released at exit."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / ".lock"

    def acquire(self) -> None:
        import atexit
        import json
        import logging
        import os
        import socket

        import time

        folder = self.path.parent
        if folder.exists() and not folder.is_dir():
            raise RecipeError(f"output_dir {str(folder)!r} exists and is not a directory")
        self.created = not folder.exists()  # a folder this run made is removed again if the run leaves it empty
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = _read_lock(self.path)
                if owner is None:  # empty: a process is writing it, or was killed between creating and writing it
                    time.sleep(1.0)
                    owner = _read_lock(self.path)
                if owner is None:
                    logging.getLogger("train_mla").warning(
                        f"Taking over the lock {self.path}: it is empty or unreadable (left by a killed run)")
                    self.path.unlink(missing_ok=True)
                    continue
                if owner.get("host") == me["host"] and not process_alive(owner.get("pid")):
                    logging.getLogger("train_mla").warning(
                        f"Taking over the stale lock {self.path} of process {owner.get('pid')} (no longer running)")
                    self.path.unlink(missing_ok=True)
                    continue
                raise RecipeError(f"output_dir {str(self.path.parent)!r} is in use by process {owner.get('pid')} on "
                                  f"{owner.get('host')} (lock file {self.path}); wait for it, or remove the lock if "
                                  "that run is gone") from None
            except OSError as e:
                raise RecipeError(f"output_dir {str(folder)!r} cannot be written: {e.strerror}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            atexit.register(self.release)
            return

    def release(self) -> None:
        import json
        import os

        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
                if getattr(self, "created", False) and not any(self.path.parent.iterdir()):
                    self.path.parent.rmdir()  # a run that failed before writing anything leaves no empty folder
        except (OSError, ValueError):
            pass


def _read_lock(path: Path) -> dict | None:
    """The owner recorded in a lock file; None when it is empty or not a JSON object."""
    import json

    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and owner else None


def process_alive(pid) -> bool:
    import os

    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists (PermissionError: it does, as another user)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def fit_attention_to_machine(model_args, on_gpu: bool | None = None, zero_stage: int | None = None,
                             compiled: bool = False) -> str | None:
    """flex_attention has no backward pass on a CPU: off a GPU (none found, or use_cpu) the same attention runs
    through SDPA (same document masks, same results). Nor does it compile inside ZeRO-3's hooked layers (Inductor's
    `LoweringException: ... 'floor' and 'Add'` on the H200, torch 2.11: docs/bench_h200_2026-12-04/
    train_zero3_flex_failure.log): with compiled layers under ZeRO-3, SDPA too. Returns the line that says so, or None
    when nothing changed."""
    import torch

    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    if getattr(model_args, "attn_implementation", None) != "flex_attention":
        return None
    if not on_gpu:
        model_args.attn_implementation = "sdpa"
        return "Training on the CPU: attn_implementation flex_attention -> sdpa (flex attention trains only on a GPU)"
    if zero_stage == 3 and compiled:
        model_args.attn_implementation = "sdpa"
        return ("ZeRO-3 with compiled layers: attn_implementation flex_attention -> sdpa (the two fail to compile "
                "together; on one GPU --zero_stage 2 keeps flex attention)")
    return None


def fit_loss_to_machine(args, on_gpu: bool, zero_stage: int | None) -> str | None:
    """loss_implementation: liger runs Triton kernels on a GPU and reads the heads' whole weights: off a GPU, or under
    ZeRO-3 (which partitions them), the same KL runs through the chunked loss. Returns the line that says so."""
    if getattr(args, "loss_implementation", None) != "liger":
        return None
    why = "training on the CPU" if not on_gpu else "ZeRO-3 partitions the heads' weights" if zero_stage == 3 else None
    if why:
        args.loss_implementation = "chunked"
        return f"loss_implementation liger -> chunked ({why}; the same KL, liger is the faster one on a GPU)"
    return None


def check_teacher_fp8(args, on_gpu: bool, zero_stage: int | None) -> None:
    """teacher_fp8: true before any model loads: not under ZeRO-3 (it partitions the weights FP8 replaces), and on a
    GPU only one with FP8 matrix units (compute capability >= 8.9)."""
    if not getattr(args, "teacher_fp8", False):
        return
    if zero_stage == 3:
        raise RecipeError("teacher_fp8: true replaces the teacher's linear weights, which ZeRO-3 partitions: add "
                          "--zero_stage 2 (one GPU, or a teacher that fits each GPU) or set teacher_fp8: false")
    import torch

    if on_gpu and torch.cuda.get_device_capability() < (8, 9):
        raise RecipeError(f"teacher_fp8: true needs FP8 matrix units (compute capability >= 8.9); "
                          f"{torch.cuda.get_device_name()} has none: set teacher_fp8: false")


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
        if int(os.environ.get("RANK", "0")) == 0:  # one lock per run, held by its main process
            OutputLock(parsed[-1].output_dir).acquire()
        checkpoint = resume_point(parsed[-1])
    except RecipeError as e:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and int(os.environ.get("RANK", "0")) != 0:
            raise SystemExit(2) from None  # every process finds the same error: the first one says it, once
        hint = ""
        if world > 1 and not gpu:
            hint = (f" ({world} processes were launched on a machine without a GPU: add --bf16 false for CPU processes, "
                    f"or run one process, python train_mla/{Path(sys.argv[0]).name} RECIPE, which trains on the CPU)")
        raise SystemExit(f"error: {e}{hint}") from None
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
    zero_stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")  # set by accelerate launch with a DeepSpeed config
    on_gpu = gpu and not args.use_cpu
    compile_layers = getattr(args, "compile_layers", False)  # stage 1's key (null = on when training on a GPU)
    compiled = on_gpu and (compile_layers is None or bool(compile_layers))
    for note in filter(None, (fit_attention_to_machine(p, on_gpu, int(zero_stage) if zero_stage else None, compiled)
                              for p in parsed[:-1])):
        logging.getLogger("train_mla").info(note)
    if note := fit_loss_to_machine(args, gpu and not args.use_cpu, int(zero_stage) if zero_stage else None):
        logging.getLogger("train_mla").info(note)
    check_teacher_fp8(args, gpu and not args.use_cpu, int(zero_stage) if zero_stage else None)
    return (*parsed, checkpoint)


def finish_run(trainer, result, source_dir: str | Path, what: str) -> None:
    """Shared end of the training scripts: metrics and state, the model (gathered from ZeRO-3 shards), the KV-cache
    record of the source checkpoint copied beside it, a model card (README.md), the DeepSeek-V3 export when the recipe
    asks for one; then, unless keep_checkpoints, the checkpoint-N folders go once the saved model checks complete."""
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
    out = Path(args.output_dir)
    record = Path(source_dir, "kv_cache.json")  # written by the upcycling from the real source config
    kv = json.loads(record.read_text()) if record.is_file() else None
    if kv:
        from train_mla.kv_cache_size import format_kv_table

        shutil.copy(record, out / "kv_cache.json")
        log.info("KV cache per token:\n" + format_kv_table(kv))
    (out / "README.md").write_text(model_card(what, str(source_dir), out, kv, result.metrics))
    log.info(f"Saved the {what} to {args.output_dir}: {json.dumps(result.metrics)}")
    if args.export_deepseek_dir:
        from train_mla.export_deepseek import export_checkpoint
        from train_mla.model_loading import full_weights_here

        with full_weights_here(args):  # reload the gathered 16-bit model, whole, on this process
            export_checkpoint(args.output_dir, args.export_deepseek_dir)
        log.info(f"Exported a DeepSeek-V3 checkpoint to {args.export_deepseek_dir}")
    problem = finished_run_problem(out)
    ckpts = sorted(out.glob("checkpoint-*"))
    if ckpts and not getattr(args, "keep_checkpoints", True) and problem is None:
        size = sum(f.stat().st_size for c in ckpts for f in c.rglob("*") if f.is_file())
        for c in ckpts:
            shutil.rmtree(c)
        log.info(f"Removed {len(ckpts)} resumable checkpoint(s) ({size / 1e9:.2f} GB of optimizer states) now that the "
                 f"final model is saved (keep_checkpoints: true keeps them)")
    elif problem:
        log.warning(f"The final model in {out} is incomplete ({problem}): its checkpoints are kept")


def model_card(what: str, source: str, out: Path, kv: dict | None, metrics: dict) -> str:
    """README.md of a trained model: what it is, where it came from, its KV cache and how to load and score it."""
    lines = [f"# {out.name}: {what}", "",
             f"Trained with train_mla (X-EcoMLA upcycling of grouped-query attention into multi-head latent "
             f"attention) from `{source}`.", ""]
    if kv:
        lines += [f"KV cache: {kv['mla_bytes_per_token']:,} bytes per token against {kv['source_bytes_per_token']:,} "
                  f"for the GQA source ({100 * kv['kv_ratio']:.1f} %), {kv['layers']} layers, 2 bytes per value; "
                  f"originally upcycled from `{kv.get('source', '?')}`.", ""]
    lines += ["Training metrics: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in metrics.items()), "",
              "Load with `import train_mla` then `transformers.AutoModelForCausalLM.from_pretrained(path)`; score with "
              "`bash eval.sh path`; chat with `python -m train_mla.chat path`.", ""]
    return "\n".join(lines)
