"""Training: many members of a sweep as one stacked train state, on one device or a mesh.

    step        one member's train state (``TrainState``: flat parameters), loss, AdamW step, EMA
    stack       a group of members as one stack (``Stack``): init, advance and evaluate programs
    programs    those programs ahead of time: abstract inputs, lowering, compiling side by side
    plan        how to stack: the memory plan and the "auto" stacking (``strategies.json``)
    loop        ``loop.train``: the schedule, logging, checkpoints, signals, resume
    checkpoint  the train state on disk (orbax), moved aside when it cannot be restored
    runconfig   whether a run directory can hold a run; config.json and members.json

The errors a training run raises are defined here, where every module above can import them.
"""


class RunError(RuntimeError):
    """A training run cannot start or go on: its directory holds another run or is locked, its
    step does not fit in memory, its processes disagree. The command line prints it as one line."""


EXIT_STOPPED = 75  # the command's exit code when a signal stopped training after a checkpoint (sysexits' EX_TEMPFAIL)


class Stopped(Exception):
    """Training stopped on a signal (SIGTERM, SIGINT, a pre-emption notice) after checkpointing
    ``step``; running the same training again resumes from there. The command line prints it as
    one line and exits with ``EXIT_STOPPED``."""

    def __init__(self, step: int, why: str, saved: bool = True):
        done = "checkpoint saved" if saved else "nothing trained since the last checkpoint"
        super().__init__(f"stopped by {why} at step {step} ({done}); run the same command to resume")
        self.step, self.why = step, why
