"""Stage 2: DPO of the distilled MLA model with trl's DPOTrainer; the reference model is the stage-1 checkpoint.

    ACCELERATE_LOG_LEVEL=info accelerate launch --config_file deepspeed_zero3.yaml \
        train_mla/train_dpo.py llama3.2_1B/dpo.yaml [--key value ...]

Preference rows: `prompt`/`chosen`/`rejected` (strings or chat messages), or `chosen`/`rejected` holding whole
dialogues with a shared prefix (the prompt is then extracted, e.g. HH-RLHF). The output is a loadable MLA model.
"""

import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (accelerate launch train_mla/train_dpo.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_mla.training.arguments import DPO_RECIPE
from train_mla.training.run import fail_start, start_run, train_and_finish

logger = logging.getLogger("train_mla")


def main(argv=None):
    # 1. the recipe, the output folder (locked), where to resume
    model_args, data_args, args, checkpoint = start_run(DPO_RECIPE, argv, "Stage 2: DPO of an MLA model.")
    from trl import DPOTrainer

    import train_mla  # noqa: F401  (registers the MLA model with transformers' Auto classes)
    from train_mla.model.loading import ModelNotFoundError, load_causal_lm, load_tokenizer, resolve
    from train_mla.training.data import mix_datasets

    # 2. the tokenizer and the preference pairs
    try:
        tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.model_revision, data_args.chat_template)
    except ModelNotFoundError as e:
        fail_start(e)
    with args.main_process_first(desc="load preference data"):
        try:
            data = mix_datasets(
                data_args.dataset_mixer,
                data_args.dataset_splits,
                data_args.test_split_size,
                args.seed,
                columns=("prompt", "chosen", "rejected"),
            )
        except (ValueError, FileNotFoundError, ModelNotFoundError) as e:
            raise SystemExit(f"error: {e}") from None
    train = data["train"]
    if data_args.max_train_samples is not None:
        train = train.select(range(min(len(train), data_args.max_train_samples)))

    # 3. the policy and the frozen reference, both from the stage-1 checkpoint
    def load(dtype):
        return load_causal_lm(
            model_args.model_name_or_path, dtype, model_args.attn_implementation, model_args.model_revision
        )

    # the policy keeps float32 master weights (bf16 only as autocast compute): a bf16 weight cannot take a DPO-sized
    # step (lr 5e-7 moves nothing); the reference is a frozen copy of the stage-1 checkpoint in torch_dtype
    policy, reference = load("float32"), load(model_args.torch_dtype)
    if checkpoint:
        logger.info(f"Resuming from {checkpoint}")
    # 4. DPO, then save the final model with its KV-cache record and model card
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=train,
        eval_dataset=data["test"] if "test" in data and (args.eval_strategy != "no" or args.eval_on_start) else None,
        processing_class=tokenizer,
    )
    train_and_finish(trainer, checkpoint, "DPO", resolve(model_args.model_name_or_path)[0], "DPO model")


if __name__ == "__main__":
    main()
