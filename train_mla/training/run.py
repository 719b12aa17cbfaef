"""The start and end every training script shares: parse the recipe, take the output folder, decide where to resume,
fit the recipe to the machine; then train, save the model with its KV-cache record and model card, and tidy up."""

import sys
from pathlib import Path
from typing import NoReturn

from train_mla.training.hardware import check_teacher_fp8, fit_attention_to_machine, fit_loss_to_machine
from train_mla.training.model_card import model_card
from train_mla.training.recipe import RecipeError, parse_recipe
from train_mla.training.run_folder import OutputLock, finished_run_problem, resume_point


def start_run(types_, argv, description: str):
    """Shared start of the training scripts: parse the recipe (gloo on CPU when distributed), decide where to
    resume, set up logging and the seed. Returns (*dataclasses, checkpoint to resume from or None)."""
    import logging
    import os

    import torch

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    distributed = world > 1 or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    gpu = torch.cuda.is_available()
    defaults = {"ddp_backend": "gloo"} if distributed and not gpu else {}  # no NCCL on CPU
    if not gpu and not distributed:
        defaults["use_cpu"] = True  # recipes are written for GPUs: on a machine without one, run on the CPU
    try:
        parsed = parse_recipe(types_, argv, defaults=defaults, description=description)
    except RecipeError as e:
        hint = ""
        if world > 1 and not gpu:
            hint = (
                f" ({world} processes were launched on a machine without a GPU: add --bf16 false for CPU processes, "
                f"or run one process, python train_mla/{Path(sys.argv[0]).name} RECIPE, which trains on the CPU)"
            )
        fail_start(f"{e}{hint}")
    if rank == 0:  # one lock per run, held by its main process; its errors are that process's alone
        try:
            OutputLock(parsed[-1].output_dir).acquire()
        except RecipeError as e:
            raise SystemExit(f"error: {e}") from None
    try:
        checkpoint = resume_point(parsed[-1])
    except RecipeError as e:
        fail_start(e)
    import transformers
    from transformers import set_seed

    args = parsed[-1]
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO,
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    logging.getLogger("train_mla").setLevel(args.get_process_log_level())
    transformers.utils.logging.set_verbosity(args.get_process_log_level())
    set_seed(args.seed)
    if "use_cpu" in defaults and args.use_cpu:
        logging.getLogger("train_mla").info(
            f"No GPU found: training on the CPU (use_cpu: true), {'bf16 autocast' if args.bf16 else 'float32'} compute"
        )
    zero_stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")  # set by accelerate launch with a DeepSpeed config
    on_gpu = gpu and not args.use_cpu
    compile_layers = getattr(args, "compile_layers", False)  # stage 1's key (null = on when training on a GPU)
    compiled = on_gpu and (compile_layers is None or bool(compile_layers))
    for note in filter(
        None,
        (fit_attention_to_machine(p, on_gpu, int(zero_stage) if zero_stage else None, compiled) for p in parsed[:-1]),
    ):
        logging.getLogger("train_mla").info(note)
    if note := fit_loss_to_machine(args, gpu and not args.use_cpu, int(zero_stage) if zero_stage else None):
        logging.getLogger("train_mla").info(note)
    check_teacher_fp8(args, gpu and not args.use_cpu, int(zero_stage) if zero_stage else None)
    return (*parsed, checkpoint)


def fail_start(message) -> NoReturn:
    """An error that every process finds before any heavy work (a bad recipe, a model that cannot be found): one line,
    `error: ...`, said once by the main process, whose exit fails the launch."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        leave_with_the_main_process(world, int(os.environ.get("RANK", "0")))
    raise SystemExit(f"error: {message}")


def leave_with_the_main_process(world: int, rank: int, timeout: float = 20.0) -> None:
    """An error that every process of a launch finds: the main process says it once and fails the launch. On one
    machine the others leave first, with exit 0, once the main process has found the same error (a marker file), and
    the main process exits after them: the launcher then lists one failure instead of a traceback summary per process,
    and kills none still on its way to the check. Returns on the main process; the others exit here (2 when the main
    process did not find the error, or the launch spans machines)."""
    import os
    import shutil
    import tempfile
    import time

    same_machine = int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world
    meet = Path(tempfile.gettempdir(), f"train_mla-failed-start-{os.environ.get('MASTER_PORT', '')}-{os.getppid()}")
    deadline = time.monotonic() + timeout
    if rank != 0:
        while same_machine and not (meet / "main").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not (same_machine and (meet / "main").exists()):
            raise SystemExit(2)
        (meet / str(rank)).touch()
        raise SystemExit(0)
    if not same_machine:
        return
    meet.mkdir(exist_ok=True)
    (meet / "main").touch()
    while len(list(meet.iterdir())) < world and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # the others exit right after their file: let the launcher see them go first
    shutil.rmtree(meet, ignore_errors=True)  # a process later than the deadline may still add its file


def finish_run(trainer, result, source_dir: str | Path, what: str) -> None:
    """Shared end of the training scripts: metrics and state, the model (gathered from ZeRO-3 shards), the KV-cache
    record of the source checkpoint copied beside it, a model card (README.md), the DeepSeek-V3 export when the recipe
    asks for one; then, unless keep_checkpoints, the checkpoint-N folders go once the saved model checks complete."""
    import json
    import logging
    import shutil

    log = logging.getLogger("train_mla")
    args = trainer.args
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    trainer.save_model(args.output_dir)
    if not trainer.is_world_process_zero():
        return
    out = Path(args.output_dir)
    record = Path(source_dir, "kv_cache.json")  # written by the upcycling from the real source config
    kv = json.loads(record.read_text()) if record.is_file() else None
    if kv:
        from train_mla.model.kv_cache_size import format_kv_table

        shutil.copy(record, out / "kv_cache.json")
        log.info("KV cache per token:\n" + format_kv_table(kv))
    (out / "README.md").write_text(model_card(what, str(source_dir), out, kv, result.metrics))
    log.info(f"Saved the {what} to {args.output_dir}: {json.dumps(result.metrics)}")
    if args.export_deepseek_dir:
        from train_mla.conversion.deepseek_export import export_checkpoint
        from train_mla.model.loading import full_weights_here

        with full_weights_here(args):  # reload the gathered 16-bit model, whole, on this process
            export_checkpoint(args.output_dir, args.export_deepseek_dir)
        log.info(f"Exported a DeepSeek-V3 checkpoint to {args.export_deepseek_dir}")
    problem = finished_run_problem(out)
    ckpts = sorted(out.glob("checkpoint-*"))
    if ckpts and not getattr(args, "keep_checkpoints", True) and problem is None:
        size = sum(f.stat().st_size for c in ckpts for f in c.rglob("*") if f.is_file())
        for c in ckpts:
            shutil.rmtree(c)
        log.info(
            f"Removed {len(ckpts)} resumable checkpoint(s) ({size / 1e9:.2f} GB of optimizer states) now that the "
            f"final model is saved (keep_checkpoints: true keeps them)"
        )
    elif problem:
        log.warning(f"The final model in {out} is incomplete ({problem}): its checkpoints are kept")


def kv_record_in_checkpoints(source_dir):
    """A callback that copies the run's KV-cache record (source_dir/kv_cache.json) into every checkpoint-N it saves:
    a run continued from a checkpoint on another machine, with no upcycled/ beside it, then still ends with it."""
    import shutil

    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    record = Path(source_dir, "kv_cache.json")

    class KvRecordInCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            ckpt = Path(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if state.is_world_process_zero and record.is_file() and ckpt.is_dir():
                shutil.copy(record, ckpt / "kv_cache.json")

    return KvRecordInCheckpoints()


def train_and_finish(trainer, checkpoint, label: str, source_dir, what: str, stop_at_step: int | None = None) -> None:
    """The training scripts' last step: a progress line per logging step on the console, SIGTERM / Ctrl-C (or
    stop_at_step) saving a checkpoint of the step in progress and exiting, then `finish_run`."""
    from train_mla.training.progress import ProgressLine
    from train_mla.training.stop_signal import StopOnSignal

    trainer.add_callback(ProgressLine(label))
    trainer.add_callback(kv_record_in_checkpoints(source_dir))
    stop = StopOnSignal(stop_at_step=stop_at_step)
    trainer.add_callback(stop)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    stop.exit_if_stopped(trainer)
    finish_run(trainer, result, source_dir, what)
    # Every rank waits for rank 0's model card and export, then the process group is torn down before the interpreter
    # exits: a rank leaving with the group alive can abort in the backend's destructor after its work is done.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
