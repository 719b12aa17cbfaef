"""Stage 2: DPO of the distilled MLA model with trl's DPOTrainer; the reference model is the stage-1 checkpoint.

    ACCELERATE_LOG_LEVEL=info accelerate launch --config_file deepspeed_zero3.yaml \
        train_mla/train_dpo.py llama3.2_1B/dpo.yaml [--key value ...]

Preference rows: `prompt`/`chosen`/`rejected` (strings or chat messages), or `chosen`/`rejected` holding whole
dialogues with a shared prefix (the prompt is then extracted, e.g. HH-RLHF). The output is a loadable MLA model.
"""

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file (accelerate launch train_mla/train_dpo.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trl import DPOConfig

from train_mla.arguments import ModelArguments
from train_mla.recipe import finish_run, start_run

logger = logging.getLogger("train_mla")


@dataclass
class PreferenceDataArguments:
    """Preference data: a mixture of hub datasets and local files with chosen/rejected pairs."""

    dataset_mixer: dict = field(metadata={"help": "{source: fraction}: hub ids or local .json/.jsonl(.gz)/.parquet files."})
    dataset_splits: list[str] = field(default_factory=lambda: ["train_prefs", "test_prefs"], metadata={
        "help": "Splits to read; names containing 'train' train, 'test' evaluate."})
    test_split_size: float = field(default=0.0, metadata={"help": "Hold out this share when there is no test split."})
    chat_template: str | None = field(default=None, metadata={"help": "Replace the checkpoint's chat template."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training pairs."})

    def __post_init__(self):
        for name, frac in (self.dataset_mixer or {}).items():
            if not isinstance(frac, (int, float)) or isinstance(frac, bool) or not 0 < frac <= 1:
                raise ValueError(f"dataset_mixer[{name!r}]={frac!r}: fractions must be numbers in (0, 1]")
        if not self.dataset_mixer:
            raise ValueError("dataset_mixer is empty: give at least one {source: fraction}")


@dataclass
class DPOArguments(DPOConfig):
    """trl's DPOConfig (beta, max_length, truncation_mode, loss_type, ...) plus the output-directory policy."""

    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start afresh in a non-empty output_dir (otherwise an existing run is resumed, a finished one refused)."})
    export_deepseek_dir: str | None = field(default=None, metadata={
        "help": "After training, also write a stock DeepSeek-V3 checkpoint here (python -m train_mla.export_deepseek)."})
    keep_checkpoints: bool = field(default=False, metadata={
        "help": "Keep the resumable checkpoint-N folders (optimizer states) once the final model is saved; false "
                "removes them after the saved model checks complete."})


def main(argv=None):
    model_args, data_args, args, checkpoint = start_run((ModelArguments, PreferenceDataArguments, DPOArguments), argv,
                                                        "Stage 2: DPO of an MLA model.")
    from trl import DPOTrainer

    import train_mla  # noqa: F401  (Auto registration)
    from train_mla.data import mix_datasets
    from train_mla.model_loading import ModelNotFoundError, load_causal_lm, load_tokenizer, resolve


    try:
        tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.model_revision, data_args.chat_template)
    except ModelNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    with args.main_process_first(desc="load preference data"):
        try:
            data = mix_datasets(data_args.dataset_mixer, data_args.dataset_splits, data_args.test_split_size, args.seed,
                                columns=("prompt", "chosen", "rejected"))
        except (ValueError, FileNotFoundError, ModelNotFoundError) as e:
            raise SystemExit(f"error: {e}") from None
    train = data["train"]
    if data_args.max_train_samples is not None:
        train = train.select(range(min(len(train), data_args.max_train_samples)))

    def load(dtype):
        return load_causal_lm(model_args.model_name_or_path, dtype, model_args.attn_implementation,
                              model_args.model_revision)

    # the policy keeps float32 master weights (bf16 only as autocast compute): a bf16 weight cannot take a DPO-sized
    # step (lr 5e-7 moves nothing); the reference is a frozen copy of the stage-1 checkpoint in torch_dtype
    policy, reference = load("float32"), load(model_args.torch_dtype)
    if checkpoint:
        logger.info(f"Resuming from {checkpoint}")
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=train,
                         eval_dataset=data["test"] if "test" in data and (args.eval_strategy != "no" or args.eval_on_start) else None,
                         processing_class=tokenizer)
    from train_mla.progress import ProgressLine

    from train_mla.stop_signal import StopOnSignal

    trainer.add_callback(ProgressLine("DPO"))
    stop = StopOnSignal()  # SIGTERM / Ctrl-C: save a checkpoint, exit; a re-run resumes
    trainer.add_callback(stop)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    stop.exit_if_stopped(trainer)
    finish_run(trainer, result, resolve(model_args.model_name_or_path)[0], "DPO model")

if __name__ == "__main__":
    main()
