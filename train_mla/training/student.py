"""Where the stage-1 student comes from: the upcycled folder (made once, reused when its record matches), an MLA
checkpoint, or a checkpoint brought from another machine; and the checks that refuse a mismatched one early."""

import logging
from pathlib import Path

from train_mla.conversion.upcycled_folder import check_upcycled
from train_mla.training.recipe import RecipeError

logger = logging.getLogger("train_mla")


def check_same_vocabulary(student_tok, teacher_tok, student_name, teacher_name):
    s, t = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s != t:
        diff = sorted(set(s.items()) ^ set(t.items()))[:5]
        raise RecipeError(
            f"student {student_name!r} ({len(s)} tokens) and teacher {teacher_name!r} ({len(t)} tokens) "
            f"do not share a vocabulary (first differences: {diff}); distillation needs the same one."
        )


SHAPE_KEYS = (
    "kv_lora_rank",
    "q_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "use_lora_layer_norm",
    "mla_layers",
)


def check_checkpoint_shapes(checkpoint: Path, wanted, mla_args) -> None:
    """A checkpoint made by another recipe (other ranks or widths) is refused before any data or model loads. Per-layer
    ranks chosen from the weights (energy ratios, allocation) are known only after upcycling: checked by loading."""
    import json

    if mla_args.q_energy_ratio or mla_args.kv_energy_ratio or mla_args.allocate_kv_rank:
        return
    config = checkpoint / "config.json"
    if not config.is_file():
        return
    saved = json.loads(config.read_text())
    diff = [k for k in SHAPE_KEYS if k in saved and saved[k] != getattr(wanted, k)]
    if diff:
        shown = "; ".join(f"{k}: {saved[k]!r} there, {getattr(wanted, k)!r} in the recipe" for k in diff)
        raise RecipeError(
            f"{checkpoint} was trained with other MLA shapes ({shown}): choose another output_dir, or "
            "resume it with the recipe it was made with"
        )


def checkpoint_weights_problem(checkpoint: Path) -> str | None:
    """The first weight whose shape differs from what the checkpoint's own config.json builds (None: all agree).
    Read from the safetensors headers and a model built on the meta device: no weights are loaded."""
    import torch
    from safetensors import safe_open

    from train_mla.model.configuration_llama_mla import LlamaMLAConfig
    from train_mla.model.modeling_llama_mla import LlamaMLAForCausalLM

    weights = sorted(checkpoint.glob("*.safetensors"))
    if not (checkpoint / "config.json").is_file() or not weights:
        return None
    shapes = {}  # name -> (shape, file), from the headers only
    for w in weights:
        with safe_open(w, framework="pt") as f:
            shapes.update({k: (f.get_slice(k).get_shape(), w.name) for k in f.keys()})
    try:
        config = LlamaMLAConfig.from_pretrained(checkpoint)
    except (ValueError, OSError) as e:
        return f"config.json: {e}"
    if config.model_type != LlamaMLAConfig.model_type:
        return None
    with torch.device("meta"):
        model = LlamaMLAForCausalLM(config)
    for name, tensor in model.state_dict().items():
        if name in shapes and list(shapes[name][0]) != list(tensor.shape):
            return f"{name} is {shapes[name][0]} in {shapes[name][1]}, {list(tensor.shape)} by the config"
    return None


def build_student(model_args, mla_args, args, tokenizer, checkpoint=None, record=None):
    """MLA student: continued from an MLA checkpoint, or upcycled once (main process) into output_dir/upcycled. A run
    resumed from a checkpoint brought from another machine (no upcycled/ beside it) is built from the checkpoint."""
    import os
    import shutil

    import torch

    from train_mla.conversion.gqa_to_mla import upcycle
    from train_mla.conversion.upcycled_folder import save_mla_checkpoint, upcycle_record
    from train_mla.model.loading import full_weights_here, is_mla_checkpoint, load_causal_lm
    from train_mla.model.modeling_llama_mla import LlamaMLAForCausalLM

    source = model_args.model_name_or_path
    upcycled = Path(args.output_dir) / "upcycled"
    if checkpoint is not None and not is_mla_checkpoint(source) and not upcycled.exists():
        logger.info(
            f"No upcycled model in {args.output_dir}: the student is built from {checkpoint}, whose weights the "
            "resumed run trains on"
        )
        path = checkpoint
    elif is_mla_checkpoint(source):
        logger.info(f"Continuing from the MLA checkpoint {source}")
        path = source
    else:
        path = Path(args.output_dir) / "upcycled"
        record = record or upcycle_record(model_args, mla_args)  # hashes the source's weights: once per run
        with args.main_process_first(desc="upcycle"):
            if args.overwrite_output_dir and path.exists() and args.process_index == 0:
                shutil.rmtree(path)
            if not check_upcycled(path, record):
                with full_weights_here(args):
                    llama = load_causal_lm(source, "float32", model_args.attn_implementation, model_args.model_revision)
                    mla = upcycle(llama, mla_args, log=logger.info, tokenizer=tokenizer)  # float32
                    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # written whole, then renamed into place
                    save_mla_checkpoint(mla, tokenizer, tmp, llama.config, extra=record)
                    tmp.replace(path)
                    del llama, mla
            else:
                logger.info(f"Reusing the upcycled model in {path} (made from the same source and settings)")
        path = str(path)
    # trained weights are float32 master copies; bf16 is for compute (autocast) and for the frozen teacher
    model = LlamaMLAForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=model_args.attn_implementation
    )
    return model, path


def check_before_loading(model_args, mla_args, data_args, args, checkpoint):
    """Everything stage 1 can check before it tokenises or loads a model: the tokenizers and the teacher's vocabulary,
    a weights-only checkpoint under DeepSpeed, the export folder, the MLA shapes against the source's config (read
    alone) and a checkpoint's, a leftover upcycled model, the calibration text. Returns (tokenizer, teacher name, the
    upcycled-model record or None); raises RecipeError or ModelNotFoundError naming what is wrong."""
    import os

    from train_mla.conversion.gqa_to_mla import build_config
    from train_mla.conversion.upcycled_folder import upcycle_record
    from train_mla.model.loading import is_mla_checkpoint, load_config, load_tokenizer
    from train_mla.training.run_folder import CONTINUATION

    record = None  # what made the upcycled model (its source's content hash), computed once
    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.model_revision, data_args.chat_template)
    teacher_name = args.teacher_model_name_or_path
    continuing = is_mla_checkpoint(model_args.model_name_or_path)
    if teacher_name is None:
        if continuing:
            raise RecipeError("teacher_model_name_or_path is required when continuing from an MLA checkpoint")
        teacher_name = model_args.model_name_or_path
    check_same_vocabulary(tokenizer, load_tokenizer(teacher_name), model_args.model_name_or_path, teacher_name)
    if (
        checkpoint
        and Path(checkpoint, CONTINUATION).is_file()
        and (args.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true")
    ):
        raise RecipeError(
            f"{checkpoint} is a weights-only checkpoint (no optimizer state); DeepSpeed resumes only "
            "from its own whole checkpoints: continue in a single process, `python "
            "train_mla/train_distill.py RECIPE --output_dir ...`"
        )
    export = Path(args.export_deepseek_dir) if args.export_deepseek_dir else None
    if export is not None and export.exists() and (not export.is_dir() or any(export.iterdir())):
        raise RecipeError(
            f"export_deepseek_dir {str(export)!r} exists and is not empty: the export at the end "
            "would be refused; choose another folder"
        )
    if not continuing:
        try:
            wanted = build_config(load_config(model_args.model_name_or_path, model_args.model_revision), mla_args)
        except ValueError as e:
            raise RecipeError(f"the MLA settings do not fit {model_args.model_name_or_path}: {e}") from None
        if checkpoint:
            check_checkpoint_shapes(Path(checkpoint), wanted, mla_args)
            if problem := checkpoint_weights_problem(Path(checkpoint)):
                raise RecipeError(
                    f"{checkpoint}: its weights do not match its own config.json ({problem}); the checkpoint was "
                    "edited or put together from two runs: resume from another checkpoint, or remove this one"
                )
        if args.export_deepseek_dir and not mla_args.use_lora_layer_norm:
            raise RecipeError(
                "export_deepseek_dir needs use_lora_layer_norm: true (DeepSeek-V3 always normalises "
                "the latents); set it, or drop export_deepseek_dir"
            )
        reusable = False
        if not args.overwrite_output_dir and args.process_index == 0:
            record = upcycle_record(model_args, mla_args)
            reusable = check_upcycled(Path(args.output_dir) / "upcycled", record)
        if (
            args.process_index == 0
            and not reusable
            and checkpoint is None
            and (problem := mla_args.calibration_problem())
        ):
            raise RecipeError(problem)
    return tokenizer, teacher_name, record
