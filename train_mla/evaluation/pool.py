"""A pool of lm-eval jobs: each checkpoint is scored by `python -m train_mla.evaluate` in its own process, at most
`jobs` at once (one per GPU when several are visible), each with its log; while a job is awaited, a line every
`progress_s` seconds says how far lm-eval has got. `eval.sh` and the default run (`train_mla/default_run.py`) both
score through it.

    python -m train_mla.evaluation.pool CKPT [CKPT ...] [--output DIR] -- [evaluate.py options]

(`eval.sh` is the command users type; it checks the checkpoints first and calls this.)
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_PROGRESS = re.compile(r"[A-Za-z ]*requests: *\d+%")


@dataclass
class Job:
    name: str
    process: subprocess.Popen
    log: Path
    started: float = field(default_factory=time.time)


class EvalPool:
    """Start `python -m train_mla.evaluate CKPT ARGS --output DIR` jobs, at most `jobs` at once; `gpus` > 1 gives each
    job its own GPU (CUDA_VISIBLE_DEVICES), in turn."""

    def __init__(self, jobs: int = 1, gpus: int = 0, progress_s: float = 60, say=print):
        self.jobs, self.gpus, self.progress_s, self.say = max(1, jobs), gpus, progress_s, say
        self.running: list[Job] = []
        self.done: list[Job] = []
        self.failed: list[str] = []
        self.started = 0

    def submit(self, name: str, checkpoint: str, args: list[str], output: Path | None = None) -> Job:
        """Score `checkpoint` (evaluate.py's options in `args`); its log is OUTPUT/eval.log, or a temporary file."""
        while len(self.running) >= self.jobs:
            self.finish_oldest()
        env = dict(os.environ)
        if self.gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(self.started % self.gpus)
        if output is not None:
            output.mkdir(parents=True, exist_ok=True)
            log = output / "eval.log"
            args = [*args, "--output", str(output)]
        else:
            log = Path(tempfile.mkstemp(prefix="eval_", suffix=".log")[1])
        cmd = [sys.executable, "-m", "train_mla.evaluate", checkpoint, *args]
        with open(log, "w") as f:
            process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        self.started += 1
        job = Job(name, process, log)
        self.running.append(job)
        return job

    def is_running(self, name: str) -> bool:
        return any(j.name == name for j in self.running)

    def finish_oldest(self) -> Job:
        """Wait for the oldest job, with a progress line every progress_s seconds; a failure is remembered."""
        job = self.running.pop(0)
        last = time.time()
        while job.process.poll() is None:
            time.sleep(1)
            if time.time() - last >= self.progress_s:
                last = time.time()
                self.say(f"eval {job.name}: {self.progress(job.log)} ({time.time() - job.started:.0f} s)")
        if job.process.returncode != 0:
            self.failed.append(job.name)
            tail = job.log.read_text(errors="replace").splitlines()[-5:] if job.log.is_file() else []
            self.say(f"eval {job.name} FAILED (log: {job.log}):\n" + "\n".join(tail))
        self.done.append(job)
        return job

    def wait_all(self) -> list[Job]:
        """Wait for every job; returns all finished jobs, oldest first."""
        while self.running:
            self.finish_oldest()
        return self.done

    @staticmethod
    def progress(log: Path) -> str:
        """lm-eval's last 'Running ... requests: NN%' from its log, or what the job is doing before that."""
        try:
            with open(log, "rb") as f:
                f.seek(max(0, log.stat().st_size - 4000))
                tail = f.read().decode(errors="replace").replace("\r", "\n")
        except OSError:
            return "starting"
        found = _PROGRESS.findall(tail)
        return found[-1].strip() if found else "loading the model and tasks"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--output", default=None, help="results folder (one checkpoint only)")
    p.add_argument("--gpus", type=int, default=0, help="visible GPUs: one job per GPU when > 1")
    a, rest = p.parse_args(argv[:cut]), argv[cut + 1 :]
    pool = EvalPool(jobs=max(1, a.gpus), gpus=a.gpus, progress_s=float(os.environ.get("EVAL_PROGRESS_S", 60)))
    for c in a.checkpoints:
        job = pool.submit(c, c, rest, Path(a.output) if a.output else None)
        pool.say(f"[eval.sh] {c} (log: {job.log})")
    for job in pool.wait_all():
        text = job.log.read_text(errors="replace") if job.log.is_file() else ""
        if job.name not in pool.failed and "\n**" in text:
            print(text[text.index("\n**") + 1 :].rstrip()[:4000], flush=True)
    sys.exit(1 if pool.failed else 0)


if __name__ == "__main__":
    main()
