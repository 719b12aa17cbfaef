"""The run folder: what a training run may write into, whether what it finds there is complete, where it resumes, and
the lock that keeps one run per folder.

Completeness is decided by content: a checkpoint counts once trainer_state.json (written last) is valid and every weight
file is whole; a final model once every file a later step reads is there. A damaged newer checkpoint is skipped with a
line that names the file and the reason.
"""

from pathlib import Path

from train_mla.training.recipe import RecipeError

CONTINUATION = "continuation.json"  # marks a weights-only checkpoint (python -m train_mla.checkpoint_transfer)


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
    return (
        None if 8 + n + end == size else f"{path.name} holds {size} bytes, its header needs {8 + n + end} (cut short)"
    )


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
    tokenizer, then the model card (README.md) last: a final model counts once every file a later step reads is
    there."""
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
    found = sorted(
        (int(p.name.split("-")[1]), p)
        for p in out.glob("checkpoint-*")
        if p.is_dir() and p.name.split("-")[1].isdigit()
    )
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
        raise RecipeError(
            f"output_dir {str(out)!r} holds a finished model; choose another output_dir "
            "or set overwrite_output_dir: true"
        )
    if final != "absent":
        if last is None:
            raise RecipeError(
                f"output_dir {str(out)!r} holds a half-written final model ({final}) and no complete "
                "checkpoint: choose another output_dir or set overwrite_output_dir: true"
            )
        log(f"The final model in {out} is incomplete ({final}): resuming from {last}, which saves it again")
    if last is not None:
        return last
    unknown = sorted(
        p.name
        for p in out.iterdir()
        if p.name not in KNOWN_RUN_ENTRIES and not p.name.startswith(("checkpoint-", "upcycled.tmp-"))
    )
    if unknown:
        raise RecipeError(
            f"output_dir {str(out)!r} is not empty ({', '.join(unknown[:5])}); choose another "
            "output_dir or set overwrite_output_dir: true"
        )
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
                        f"Taking over the lock {self.path}: it is empty or unreadable (left by a killed run)"
                    )
                    self.path.unlink(missing_ok=True)
                    continue
                if owner.get("host") == me["host"] and not process_alive(owner.get("pid")):
                    logging.getLogger("train_mla").warning(
                        f"Taking over the stale lock {self.path} of process {owner.get('pid')} (no longer running)"
                    )
                    self.path.unlink(missing_ok=True)
                    continue
                raise RecipeError(
                    f"output_dir {str(self.path.parent)!r} is in use by process {owner.get('pid')} on "
                    f"{owner.get('host')} (lock file {self.path}); wait for it, or remove the lock if "
                    "that run is gone"
                ) from None
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
