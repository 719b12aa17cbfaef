"""Stage 1: upcycle a Llama-family student to MLA and distil it end to end from a frozen teacher.

    ACCELERATE_LOG_LEVEL=info accelerate launch --config_file deepspeed_zero3.yaml \
        train_mla/train_distill.py llama3.2_1B/mla_kv_rank_64_8bt.yaml [--key value ...]

Output directory: `upcycled/` (the MLA model right after SVD init), `checkpoint-N/` (resumable), and at the
end a ready-to-load 16-bit model (safetensors, config with per-layer ranks, tokenizer, chat template,
kv_cache.json). A run whose output directory holds checkpoints resumes from the last one.
"""

import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a file (accelerate launch train_mla/train_distill.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from train_mla.arguments import DataArguments, DistillConfig, MLAArguments, ModelArguments
from train_mla.checkpoint_transfer import CONTINUATION
from train_mla.recipe import RecipeError, finish_run, start_run

logger = logging.getLogger("train_mla")


def check_same_vocabulary(student_tok, teacher_tok, student_name, teacher_name):
    s, t = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s != t:
        diff = sorted(set(s.items()) ^ set(t.items()))[:5]
        raise RecipeError(f"student {student_name!r} ({len(s)} tokens) and teacher {teacher_name!r} ({len(t)} tokens) "
                          f"do not share a vocabulary (first differences: {diff}); distillation needs the same one.")


def check_upcycled(path: Path, record: dict) -> bool:
    """True when `path` holds a complete upcycled model made from exactly `record`; False when there is none (a
    half-written one is removed); an error naming the keys that differ when it was made from something else."""
    import json
    import shutil

    from train_mla.recipe import saved_model_problem

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
        raise RecipeError(f"{path} holds {dtype} weights; stage 1 starts from the float32 upcycled model (fp32 master "
                          f"weights): remove it, or make it with `python -m train_mla.upcycle RECIPE --torch_dtype "
                          f"float32 --output {path}`")
    diff = [k for k in record if k != "mla_arguments" and saved.get(k) != record[k]]
    diff += [f"mla_arguments.{k}" for k, v in record["mla_arguments"].items() if saved.get("mla_arguments", {}).get(k) != v]
    if diff:
        shown = "; ".join(f"{k}: {_get(saved, k)!r} there, {_get(record, k)!r} now" for k in diff[:6])
        raise RecipeError(f"{path} was upcycled with other settings ({shown}). Choose another output_dir, or set "
                          "overwrite_output_dir: true to start afresh.")
    return True


SHAPE_KEYS = ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
              "use_lora_layer_norm", "mla_layers")


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
        raise RecipeError(f"{checkpoint} was trained with other MLA shapes ({shown}): choose another output_dir, or "
                          "resume it with the recipe it was made with")


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def build_student(model_args, mla_args, args, tokenizer, checkpoint=None, record=None):
    """MLA student: continued from an MLA checkpoint, or upcycled once (main process) into output_dir/upcycled. A run
    resumed from a checkpoint brought from another machine (no upcycled/ beside it) is built from the checkpoint."""
    import os
    import shutil

    import torch

    from train_mla.model_loading import full_weights_here, is_mla_checkpoint, load_causal_lm
    from train_mla.modeling_llama_mla import LlamaMLAForCausalLM
    from train_mla.upcycle import save_mla_checkpoint, upcycle, upcycle_record

    source = model_args.model_name_or_path
    upcycled = Path(args.output_dir) / "upcycled"
    if checkpoint is not None and not is_mla_checkpoint(source) and not upcycled.exists():
        logger.info(f"No upcycled model in {args.output_dir}: the student is built from {checkpoint}, whose weights the "
                    "resumed run trains on")
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
    model = LlamaMLAForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                attn_implementation=model_args.attn_implementation)
    return model, path


def main(argv=None):
    model_args, mla_args, data_args, args, checkpoint = start_run(
        (ModelArguments, MLAArguments, DataArguments, DistillConfig), argv,
        "Stage 1: MLA upcycling + end-to-end KL distillation.")

    import train_mla  # noqa: F401  (Auto registration)
    from train_mla.data import PackedCollator, prepare_lm_dataset
    from train_mla.distill_trainer import DistillTrainer
    from train_mla.model_loading import ModelNotFoundError, is_mla_checkpoint, load_causal_lm, load_config, load_tokenizer
    from train_mla.upcycle import build_config, upcycle_record

    args.remove_unused_columns = False
    if args.compile_layers is None:
        args.compile_layers = args.device.type == "cuda"

    # -- cheap checks before anything heavy: tokenizers, the teacher's vocabulary, the MLA shapes against the source's
    #    config (read alone), a leftover upcycled model
    record = None  # what made the upcycled model (its source's content hash), computed once
    try:
        tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.model_revision, data_args.chat_template)
        teacher_name = args.teacher_model_name_or_path
        continuing = is_mla_checkpoint(model_args.model_name_or_path)
        if teacher_name is None:
            if continuing:
                raise RecipeError("teacher_model_name_or_path is required when continuing from an MLA checkpoint")
            teacher_name = model_args.model_name_or_path
        check_same_vocabulary(tokenizer, load_tokenizer(teacher_name), model_args.model_name_or_path, teacher_name)
        if checkpoint and Path(checkpoint, CONTINUATION).is_file() and (
                args.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"):
            raise RecipeError(f"{checkpoint} is a weights-only checkpoint (no optimizer state); DeepSpeed resumes only "
                              "from its own whole checkpoints: continue in a single process, `python "
                              "train_mla/train_distill.py RECIPE --output_dir ...`")
        export = Path(args.export_deepseek_dir) if args.export_deepseek_dir else None
        if export is not None and export.exists() and (not export.is_dir() or any(export.iterdir())):
            raise RecipeError(f"export_deepseek_dir {str(export)!r} exists and is not empty: the export at the end "
                              "would be refused; choose another folder")
        if not continuing:
            try:
                wanted = build_config(load_config(model_args.model_name_or_path, model_args.model_revision), mla_args)
            except ValueError as e:
                raise RecipeError(f"the MLA settings do not fit {model_args.model_name_or_path}: {e}") from None
            if checkpoint:
                check_checkpoint_shapes(Path(checkpoint), wanted, mla_args)
            if args.export_deepseek_dir and not mla_args.use_lora_layer_norm:
                raise RecipeError("export_deepseek_dir needs use_lora_layer_norm: true (DeepSeek-V3 always normalises "
                                  "the latents); set it, or drop export_deepseek_dir")
            reusable = False
            if not args.overwrite_output_dir and args.process_index == 0:
                record = upcycle_record(model_args, mla_args)
                reusable = check_upcycled(Path(args.output_dir) / "upcycled", record)
            if args.process_index == 0 and not reusable and checkpoint is None and (
                    problem := mla_args.calibration_problem()):
                raise RecipeError(problem)
    except (RecipeError, ModelNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None

    with args.main_process_first(desc="tokenise"):
        try:
            data = prepare_lm_dataset(data_args, tokenizer, seed=args.seed, log=logger.info)
        except (ValueError, FileNotFoundError, ModelNotFoundError) as e:
            raise SystemExit(f"error: {e}") from None
    if checkpoint:
        logger.info(f"Resuming from {checkpoint}")

    student, student_dir = build_student(model_args, mla_args, args, tokenizer, checkpoint, record)
    if args.freeze_non_mla:
        for name, p in student.named_parameters():
            p.requires_grad_(".self_attn." in name and int(name.split(".")[2]) in student.config.mla_layer_ids)
    teacher = load_causal_lm(teacher_name, model_args.torch_dtype, model_args.attn_implementation,
                             model_args.model_revision)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise SystemExit(f"error: teacher vocab_size {teacher.config.vocab_size} != student {student.config.vocab_size}")

    trainer = DistillTrainer(
        model=student, teacher=teacher, args=args, train_dataset=data["train"],
        eval_dataset=data["test"] if "test" in data and (args.eval_strategy != "no" or args.eval_on_start) else None,
        data_collator=PackedCollator(tokenizer.pad_token_id, with_attention_mask=not data_args.packing,
                                     pad_to=data_args.max_seq_length if args.compile_layers else None),
        processing_class=tokenizer,
    )
    from train_mla.progress import ProgressLine

    from train_mla.stop_signal import StopOnSignal

    trainer.add_callback(ProgressLine("stage 1"))
    stop = StopOnSignal(stop_at_step=args.stop_at_step)  # SIGTERM / Ctrl-C / stop_at_step: save a checkpoint, exit
    trainer.add_callback(stop)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    stop.exit_if_stopped(trainer)
    finish_run(trainer, result, student_dir, "distilled MLA model")

if __name__ == "__main__":
    main()
