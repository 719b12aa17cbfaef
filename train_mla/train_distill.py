"""Stage 1: upcycle a Llama-family student to MLA and distil it end to end from a frozen teacher.

    ACCELERATE_LOG_LEVEL=info accelerate launch --config_file deepspeed_zero3.yaml \
        train_mla/train_distill.py llama3.2_1B/mla_kv_rank_64_8bt.yaml [--key value ...]

Output directory: `upcycled/` (the MLA model right after SVD init), `checkpoint-N/` (resumable), and at the
end a ready-to-load 16-bit model (safetensors, config with per-layer ranks, tokenizer, chat template,
kv_cache.json). A run whose output directory holds checkpoints resumes from the last one.
"""

import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (accelerate launch train_mla/train_distill.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from train_mla.training.arguments import DISTILL_RECIPE
from train_mla.training.recipe import RecipeError
from train_mla.training.run import fail_start, start_run, train_and_finish

logger = logging.getLogger("train_mla")


def main(argv=None):
    # 1. the recipe, the output folder (locked), where to resume
    model_args, mla_args, data_args, args, checkpoint = start_run(
        DISTILL_RECIPE, argv, "Stage 1: MLA upcycling + end-to-end KL distillation."
    )
    args.remove_unused_columns = False
    if args.compile_layers is None:
        args.compile_layers = args.device.type == "cuda"
    import train_mla  # noqa: F401  (registers the MLA model with transformers' Auto classes)
    from train_mla.model.loading import ModelNotFoundError, load_causal_lm
    from train_mla.training.data import PackedCollator, prepare_lm_dataset
    from train_mla.training.distill_trainer import DistillTrainer
    from train_mla.training.student import build_student, check_before_loading

    # 2. cheap checks before anything heavy (tokenizers, shapes, a leftover upcycled model, calibration text)
    try:
        tokenizer, teacher_name, record = check_before_loading(model_args, mla_args, data_args, args, checkpoint)
    except (RecipeError, ModelNotFoundError) as e:
        fail_start(e)

    # 3. the data: tokenised and packed once (main process first), cached
    with args.main_process_first(desc="tokenise"):
        try:
            data = prepare_lm_dataset(data_args, tokenizer, seed=args.seed, log=logger.info)
        except (ValueError, FileNotFoundError, ModelNotFoundError) as e:
            raise SystemExit(f"error: {e}") from None

    # 4. the student (upcycled once, or from a checkpoint) and the frozen teacher
    if checkpoint:
        logger.info(f"Resuming from {checkpoint}")
    student, student_dir = build_student(model_args, mla_args, args, tokenizer, checkpoint, record)
    if args.freeze_non_mla:
        for name, p in student.named_parameters():
            p.requires_grad_(".self_attn." in name and int(name.split(".")[2]) in student.config.mla_layer_ids)
    teacher = load_causal_lm(
        teacher_name, model_args.torch_dtype, model_args.attn_implementation, model_args.model_revision
    )
    if teacher.config.vocab_size != student.config.vocab_size:
        raise SystemExit(
            f"error: teacher vocab_size {teacher.config.vocab_size} != student {student.config.vocab_size}"
        )

    # 5. distil, then save the final model with its KV-cache record and model card
    trainer = DistillTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["test"] if "test" in data and (args.eval_strategy != "no" or args.eval_on_start) else None,
        data_collator=PackedCollator(
            tokenizer.pad_token_id,
            with_attention_mask=not data_args.packing,
            pad_to=data_args.max_seq_length if args.compile_layers else None,
        ),
        processing_class=tokenizer,
    )
    train_and_finish(trainer, checkpoint, "stage 1", student_dir, "distilled MLA model", stop_at_step=args.stop_at_step)


if __name__ == "__main__":
    main()
