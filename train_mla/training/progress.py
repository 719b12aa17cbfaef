"""One progress line per logging step on the console, for both training scripts (the detail stays in the logs):

[train_mla] stage 1 | step 120/847 | loss 0.4123 | 101,234 tok/s | 2m31s elapsed | ETA 15m17s
"""

import time

from tqdm.auto import tqdm
from transformers import TrainerCallback


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ProgressLine(TrainerCallback):
    def __init__(self, stage: str):
        self.stage, self.t0 = stage, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0, self.step0 = time.time(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or self.t0 is None:
            return
        parts = [f"[train_mla] {self.stage}", f"step {state.global_step}/{state.max_steps}"]
        for key in ("loss", "kl", "eval_loss", "eval_ppl", "rewards/accuracies", "eval_rewards/accuracies"):
            if key in logs:
                parts.append(f"{key} {logs[key]:.4g}")
        if len(parts) == 2:  # the end-of-training summary: the Trainer prints it itself
            return
        if "tokens_per_second_per_device" in logs:
            parts.append(f"{logs['tokens_per_second_per_device']:,.0f} tok/s")
        elapsed, done = time.time() - self.t0, state.global_step - self.step0
        parts.append(f"{_duration(elapsed)} elapsed")
        if done > 0 and state.max_steps > state.global_step:
            parts.append(f"ETA {_duration(elapsed / done * (state.max_steps - state.global_step))}")
        tqdm.write(" | ".join(parts))  # on a line of its own, above the Trainer's progress bar
