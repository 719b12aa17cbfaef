"""Stage 1: upcycle a Llama-family student to MLA and distil it end to end from a frozen teacher.

    ACCELERATE_LOG_LEVEL=info accelerate launch --config_file deepspeed_zero3.yaml \
        train_mla/train_distill.py llama3.2_1B/mla_kv_rank_64_8bt.yaml [--key value ...]

Output directory: `upcycled/` (the MLA model right after SVD init), `checkpoint-N/` (resumable), and at the
end a ready-to-load 16-bit model (safetensors, config with per-layer ranks, tokenizer, chat template,
kv_cache.json). A run whose output directory holds checkpoints resumes from the last one.
"""

import logging
import sys
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a file (accelerate launch train_mla/train_distill.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from train_mla.arguments import DataArguments, DistillConfig, MLAArguments, ModelArguments
from train_mla.recipe import RecipeError, finish_run, start_run

logger = logging.getLogger("train_mla")


def check_same_vocabulary(student_tok, teacher_tok, student_name, teacher_name):
    s, t = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s != t:
        diff = sorted(set(s.items()) ^ set(t.items()))[:5]
        raise RecipeError(f"student {student_name!r} ({len(s)} tokens) and teacher {teacher_name!r} ({len(t)} tokens) "
                          f"do not share a vocabulary (first differences: {diff}); distillation needs the same one.")


def build_student(model_args, mla_args, args, tokenizer):
    """MLA student: continued from an MLA checkpoint, or upcycled once (main process) into output_dir/upcycled."""
    from train_mla.model_loading import full_weights_here, is_mla_checkpoint, load_causal_lm
    from train_mla.modeling_llama_mla import LlamaMLAForCausalLM
    from train_mla.upcycle import save_mla_checkpoint, upcycle

    import torch

    source = model_args.model_name_or_path
    if is_mla_checkpoint(source):
        logger.info(f"Continuing from the MLA checkpoint {source}")
        path = source
    else:
        path = str(Path(args.output_dir) / "upcycled")
        with args.main_process_first(desc="upcycle"):
            if not (Path(path) / "config.json").exists():
                with full_weights_here(args):
                    llama = load_causal_lm(source, "float32", model_args.attn_implementation, model_args.model_revision)
                    mla = upcycle(llama, mla_args, log=logger.info, tokenizer=tokenizer)  # float32
                    save_mla_checkpoint(mla, tokenizer, path, llama.config,
                                        extra={"source": source, "mla_arguments": asdict(mla_args)})
                    del llama, mla
            else:
                logger.info(f"Reusing the upcycled model in {path}")
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
    from train_mla.model_loading import is_mla_checkpoint, load_causal_lm, load_tokenizer

    args.remove_unused_columns = False
    if args.compile_layers is None:
        args.compile_layers = args.device.type == "cuda"

    # -- cheap checks before anything heavy: tokenizers and the teacher's vocabulary
    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.model_revision, data_args.chat_template)
    teacher_name = args.teacher_model_name_or_path
    if teacher_name is None:
        if is_mla_checkpoint(model_args.model_name_or_path):
            raise SystemExit("error: teacher_model_name_or_path is required when continuing from an MLA checkpoint")
        teacher_name = model_args.model_name_or_path
    try:
        check_same_vocabulary(tokenizer, load_tokenizer(teacher_name), model_args.model_name_or_path, teacher_name)
    except RecipeError as e:
        raise SystemExit(f"error: {e}") from None

    with args.main_process_first(desc="tokenise"):
        data = prepare_lm_dataset(data_args, tokenizer, seed=args.seed, log=logger.info)
    if checkpoint:
        logger.info(f"Resuming from {checkpoint}")

    student, student_dir = build_student(model_args, mla_args, args, tokenizer)
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
    result = trainer.train(resume_from_checkpoint=checkpoint)
    finish_run(trainer, result, student_dir, "distilled MLA model")

if __name__ == "__main__":
    main()
