"""Move a resumable checkpoint between machines in checksummed parts: training across allocations.

    python -m train_mla.checkpoint_transfer pack RUN/checkpoint-N PARTS_DIR [--weights_only] [--weights_dtype bfloat16]
        [--part_mib 16]
    python -m train_mla.checkpoint_transfer unpack PARTS_DIR RUN

A machine held for a limited time (a cluster job's time limit, a lent GPU) ends a stage-1 run with `stop_at_step: N`
(or SIGTERM): checkpoint-N holds everything to continue. `pack` writes it as a tar stream cut into parts of at most
`part_mib` MiB plus a manifest with the SHA-256 of every part and every file; `unpack` checks every part before it
writes anything, rebuilds RUN/checkpoint-N under a temporary name, checks every file and renames it into place. The
same training command with `output_dir: RUN` then resumes from it, on any machine.

`--weights_only` leaves the optimizer's moments behind (about two thirds of a checkpoint: Adam keeps two float32
numbers per weight) and keeps the weights, the learning-rate scheduler's position, the RNG states and the trainer
state: the run continues at the same step, learning rate and data position, with the optimizer's moments starting
afresh (the student's first continued step is exactly the one the long run would take, the later ones differ a
little; README: training across allocations). Under a warmup-stable-decay schedule this restart falls in the
constant-rate phase. `--weights_dtype bfloat16` halves the weights again (one rounding of the fp32 master weights).
A weights-only checkpoint resumes in a single process (`python train_mla/train_distill.py ...`).
"""

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin", "latest", "zero_to_fp32.py")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class _PartWriter(io.RawIOBase):
    """A write-only stream cut into files of at most `size` bytes: NAME.part000, NAME.part001, ..."""

    def __init__(self, folder: Path, name: str, size: int):
        self.folder, self.name, self.size = folder, name, size
        self.parts, self._f, self._h, self._n = [], None, None, 0

    def writable(self):
        return True

    def _close_part(self):
        if self._f is not None:
            self._f.close()
            self.parts.append({"file": Path(self._f.name).name, "bytes": self._n, "sha256": self._h.hexdigest()})
            self._f = None

    def write(self, b):
        b = memoryview(b)
        done = 0
        while done < len(b):
            if self._f is None or self._n == self.size:
                self._close_part()
                self._f = open(self.folder / f"{self.name}.part{len(self.parts):03d}", "wb")
                self._h, self._n = hashlib.sha256(), 0
            k = min(len(b) - done, self.size - self._n)
            chunk = b[done : done + k]
            self._f.write(chunk)
            self._h.update(chunk)
            self._n += k
            done += k
        return len(b)

    def close(self):
        self._close_part()
        super().close()


def _members(ckpt: Path, weights_only: bool) -> list[Path]:
    files = sorted(p for p in ckpt.rglob("*") if p.is_file())
    if weights_only:
        files = [
            p
            for p in files
            if p.relative_to(ckpt).parts[0] not in OPTIMIZER_FILES
            and not p.relative_to(ckpt).parts[0].startswith("global_step")
        ]
    return files


def _bf16_weights(path: Path) -> bytes:
    import torch
    from safetensors.torch import load_file, save

    tensors = load_file(path)
    return save(
        {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}, metadata={"format": "pt"}
    )


def pack(
    ckpt: Path,
    parts_dir: Path,
    weights_only: bool = False,
    weights_dtype: str = "float32",
    part_mib: int = 16,
    log=print,
) -> dict:
    """Write `ckpt` into `parts_dir` as NAME.partNNN files and NAME.manifest.json; returns the manifest."""
    from train_mla.training.run_folder import CONTINUATION, checkpoint_problem

    if not ckpt.is_dir():
        raise SystemExit(f"error: {ckpt} is not a directory")
    problem = checkpoint_problem(ckpt)
    if problem:
        raise SystemExit(f"error: {ckpt} is not a complete checkpoint: {problem}")
    if weights_only and not list(ckpt.glob("*.safetensors")):
        raise SystemExit(
            f"error: {ckpt} has no .safetensors weights beside its optimizer state (a ZeRO-3 checkpoint "
            "without gathered weights): pack it whole"
        )
    if weights_dtype not in ("float32", "bfloat16"):
        raise SystemExit(f"error: --weights_dtype {weights_dtype}: float32 or bfloat16")
    if weights_dtype == "bfloat16" and not weights_only:
        raise SystemExit(
            "error: --weights_dtype bfloat16 goes with --weights_only (a whole checkpoint resumes exactly)"
        )
    name = ckpt.name
    parts_dir.mkdir(parents=True, exist_ok=True)
    if any(parts_dir.glob(f"{name}.*")):
        raise SystemExit(f"error: {parts_dir} already holds parts of {name}; choose an empty folder")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    files = {}
    writer = _PartWriter(parts_dir, name, part_mib << 20)
    with tarfile.open(fileobj=writer, mode="w|") as tar:

        def add(rel: str, data: bytes):
            info = tarfile.TarInfo(f"{name}/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            files[rel] = hashlib.sha256(data).hexdigest()

        for path in _members(ckpt, weights_only):
            rel = str(path.relative_to(ckpt))
            if weights_dtype == "bfloat16" and path.suffix == ".safetensors":
                add(rel, _bf16_weights(path))
                continue
            tar.add(path, f"{name}/{rel}", recursive=False)
            files[rel] = _sha256(path)
        if weights_only:
            add(
                CONTINUATION,
                json.dumps(
                    {
                        "optimizer_state": False,
                        "weights_dtype": weights_dtype,
                        "global_step": state.get("global_step"),
                        "packed_from": str(ckpt),
                    },
                    indent=1,
                ).encode(),
            )
    writer.close()
    manifest = {
        "checkpoint": name,
        "global_step": state.get("global_step"),
        "weights_only": weights_only,
        "weights_dtype": weights_dtype,
        "parts": writer.parts,
        "files": files,
    }
    (parts_dir / f"{name}.manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p["bytes"] for p in writer.parts)
    log(
        f"[transfer] packed {ckpt} (step {manifest['global_step']}{', weights only' if weights_only else ''}) into "
        f"{len(writer.parts)} part(s) of at most {part_mib} MiB, {total / 2**20:.1f} MiB in all, in {parts_dir}; "
        f"move {name}.manifest.json and every {name}.part* file, then `python -m train_mla.checkpoint_transfer "
        f"unpack FOLDER RUN_DIR`"
    )
    return manifest


class _PartReader(io.RawIOBase):
    def __init__(self, paths):
        self.paths, self._f = list(paths), None

    def readable(self):
        return True

    def readinto(self, b):
        while True:
            if self._f is None:
                if not self.paths:
                    return 0
                self._f = open(self.paths.pop(0), "rb")
            n = self._f.readinto(b)
            if n:
                return n
            self._f.close()
            self._f = None


def unpack(parts_dir: Path, run_dir: Path, log=print) -> Path:
    """Check every part, rebuild RUN/checkpoint-N, check every file; returns the checkpoint's path."""
    manifests = sorted(parts_dir.glob("*.manifest.json"))
    if len(manifests) != 1:
        raise SystemExit(f"error: {parts_dir} holds {len(manifests)} *.manifest.json files; expected exactly one")
    try:
        m = json.loads(manifests[0].read_text())
        name, parts, files = m["checkpoint"], m["parts"], m["files"]
    except (ValueError, KeyError, TypeError):
        raise SystemExit(f"error: {manifests[0]} is not a manifest written by `checkpoint_transfer pack`") from None
    for p in parts:  # every part present, whole and unchanged before anything is written
        path = parts_dir / p["file"]
        if not path.is_file():
            raise SystemExit(
                f"error: part {path} is missing (the manifest lists {len(parts)} parts); nothing was written"
            )
        if path.stat().st_size != p["bytes"] or _sha256(path) != p["sha256"]:
            raise SystemExit(
                f"error: part {path} is damaged (size or SHA-256 differs from {manifests[0].name}); "
                "copy it again; nothing was written"
            )
    target = run_dir / name
    if target.exists():
        raise SystemExit(f"error: {target} exists; nothing was written")
    if (run_dir / "config.json").is_file():
        raise SystemExit(f"error: {run_dir} holds a finished model; unpack into the folder of an unfinished run")
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f"{name}.tmp-{os.getpid()}"
    try:
        with tarfile.open(fileobj=_PartReader(parts_dir / p["file"] for p in parts), mode="r|") as tar:
            tar.extractall(tmp, filter="data")
        got = {str(p.relative_to(tmp / name)): _sha256(p) for p in (tmp / name).rglob("*") if p.is_file()}
        if got != files:
            bad = sorted(set(got.items()) ^ set(files.items()))[:3]
            raise SystemExit(f"error: the unpacked files differ from the manifest ({bad}); nothing was kept")
        (tmp / name).replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(
        f"[transfer] unpacked {target} (step {m.get('global_step')}, {len(files)} files checked"
        f"{', weights only: the optimizer moments start afresh' if m.get('weights_only') else ''}); run the same "
        f"training command with output_dir {run_dir} to continue"
    )
    return target


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m train_mla.checkpoint_transfer",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack", help="a checkpoint-N folder -> checksummed parts and a manifest")
    a.add_argument("checkpoint", type=Path)
    a.add_argument("parts_dir", type=Path)
    a.add_argument("--weights_only", action="store_true", help="leave the optimizer state behind")
    a.add_argument("--weights_dtype", default="float32", help="float32 (default) or bfloat16 (with --weights_only)")
    a.add_argument("--part_mib", type=int, default=16, help="largest part, MiB (default 16)")
    b = sub.add_parser("unpack", help="parts and manifest -> RUN_DIR/checkpoint-N")
    b.add_argument("parts_dir", type=Path)
    b.add_argument("run_dir", type=Path)
    args = p.parse_args(argv)
    if args.command == "pack":
        if args.part_mib < 1:
            raise SystemExit("error: --part_mib must be >= 1")
        pack(args.checkpoint, args.parts_dir, args.weights_only, args.weights_dtype, args.part_mib)
    else:
        unpack(args.parts_dir, args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
