"""The upcycled folder: an MLA checkpoint saved with its KV-cache table and the record of what made it (source,
revision, a fingerprint of the source weights, every MLA argument). Stage 1 reuses an `output_dir/upcycled` only when
its record equals the run's own."""

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

from train_mla.model.kv_cache_size import kv_cache_table
from train_mla.training.recipe import RecipeError

logger = logging.getLogger("train_mla")


def save_mla_checkpoint(model, tokenizer, output_dir: str | Path, source_config=None, extra: dict | None = None):
    """safetensors weights, config (with auto_map and per-layer ranks), tokenizer and chat template, KV table."""

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if source_config is not None:
        table = kv_cache_table(source_config, model.config)
        (out / "kv_cache.json").write_text(json.dumps({**table, **(extra or {})}, indent=2) + "\n")
    return out


def upcycle_record(model_args, mla_args) -> dict:
    """What made an upcycled model: the source (id, revision, fingerprint of its files) and every MLA/init argument.
    Written into kv_cache.json; stage 1 reuses an `output_dir/upcycled` whose record equals its own."""

    from train_mla.model.loading import source_fingerprint

    return json.loads(
        json.dumps(
            {
                "source": model_args.model_name_or_path,
                "revision": model_args.model_revision,
                "source_fingerprint": source_fingerprint(model_args.model_name_or_path),
                "mla_arguments": asdict(mla_args),
            }
        )
    )


def check_upcycled(path: Path, record: dict) -> bool:
    """True when `path` holds a complete upcycled model made from exactly `record`; False when there is none (a
    half-written one is removed); an error naming the keys that differ when it was made from something else."""

    from train_mla.training.run_folder import saved_model_problem

    if not path.exists():
        return False
    problem = saved_model_problem(path)
    if problem is None and not (path / "kv_cache.json").is_file():
        problem = "kv_cache.json is missing"
    if problem:
        logger.warning(f"Removing the incomplete upcycled model in {path} ({problem}); upcycling again")
        shutil.rmtree(path)
        return False
    saved = json.loads((path / "kv_cache.json").read_text())
    dtype = json.loads((path / "config.json").read_text()).get("dtype")
    if dtype not in (None, "float32"):
        raise RecipeError(
            f"{path} holds {dtype} weights; stage 1 starts from the float32 upcycled model (fp32 master "
            f"weights): remove it, or make it with `python -m train_mla.upcycle RECIPE --torch_dtype "
            f"float32 --output {path}`"
        )
    diff = [k for k in record if k != "mla_arguments" and saved.get(k) != record[k]]
    diff += [
        f"mla_arguments.{k}" for k, v in record["mla_arguments"].items() if saved.get("mla_arguments", {}).get(k) != v
    ]
    if diff:
        shown = "; ".join(f"{k}: {_get(saved, k)!r} there, {_get(record, k)!r} now" for k in diff[:6])
        raise RecipeError(
            f"{path} was upcycled with other settings ({shown}). Choose another output_dir, or set "
            "overwrite_output_dir: true to start afresh."
        )
    return True


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d
