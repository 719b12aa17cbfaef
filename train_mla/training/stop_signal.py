"""A clean stop on SIGTERM or SIGINT (a scheduler's time limit, a preemption, `kill`, Ctrl-C), for both training
scripts: the step in progress finishes, a checkpoint of it is saved (an evaluation due at that step is skipped; one
already running finishes first), and the script exits with 128 + the signal's number (143 for SIGTERM, 130 for SIGINT)
without writing a final model. Running the same command again resumes from that checkpoint, so nothing trained is
lost.

A planned stop works the same way: `StopOnSignal(stop_at_step=N)` saves checkpoint-N and stops there (the recipe key
`stop_at_step`, one allocation of a run longer than a machine is held); the script then exits 0.

Further signals while stopping are reported and otherwise ignored: a launcher that forwards the signal (torchrun's
agent does) must not cut the checkpoint short; SIGKILL still stops at once. Under several processes the ranks agree
at every step end (one all-reduce of a flag), so that all of them save the same step.
"""

import logging
import signal

import torch
from transformers import TrainerCallback

logger = logging.getLogger("train_mla")


class StopOnSignal(TrainerCallback):
    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), stop_at_step: int | None = None):
        self.received: signal.Signals | None = None  # the first signal that arrived
        self.stopped_at: int | None = None  # the step whose checkpoint was saved on the way out
        self.stop_at_step = stop_at_step
        for s in signals:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signal.Signals(signum)
            logger.warning(
                f"{name} received: finishing this step, saving a checkpoint, then stopping "
                "(run the same command again to resume)"
            )
        else:
            logger.warning(f"{name} received again: already stopping after the checkpoint (SIGKILL stops at once)")

    def _anyone_received(self, args) -> bool:
        flag = self.received is not None
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):  # one process: no collective, no host sync per step
            t = torch.tensor([float(flag)], device=args.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def on_step_end(self, args, state, control, **kwargs):
        planned = self.stop_at_step is not None and state.global_step >= self.stop_at_step
        if self.stopped_at is None and (planned or self._anyone_received(args)):
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
            if not planned:  # a signal leaves little time (a grace period): the checkpoint, not an evaluation
                control.should_evaluate = False

    def exit_code(self) -> int | None:
        """128 + signal number once training was stopped by a signal (the caller exits with it), else None."""
        if self.received is None:
            return None
        return 128 + int(self.received)

    def exit_if_stopped(self, trainer) -> None:
        """After trainer.train(): exit (with exit_code()) when a signal cut the run short; a run that reached its last
        step anyway goes on to save its final model."""
        state = trainer.state
        if self.stopped_at is None or state.global_step >= state.max_steps:
            return
        if self.received is None:  # the planned end of this allocation
            logger.info(
                f"Stopped at step {state.global_step}/{state.max_steps} as asked (stop_at_step): "
                f"checkpoint-{state.global_step} is in {trainer.args.output_dir}; the same command without "
                "stop_at_step (or with a later one) continues from it"
            )
            raise SystemExit(0)
        logger.warning(
            f"Stopped by {self.received.name} at step {state.global_step}/{state.max_steps}: "
            f"checkpoint-{state.global_step} is in {trainer.args.output_dir}; run the same command again "
            "to resume from it"
        )
        raise SystemExit(self.exit_code())
