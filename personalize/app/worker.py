"""The app's training process: one DreamBooth run (`dreambooth.train_subject`, the CLI's code) in
a child process of its own, so a run's memory is freed when it ends and Cancel is a signal.

    python -m personalize.app.worker CONFIG.json

CONFIG.json is a `TrainConfig` as JSON. Events go to stdout as JSON lines (everything else the
libraries print is sent to stderr): {"event": "start"}, {"event": "step", "step", "total"},
{"event": "log", "text"}, then one of {"event": "done", "run_dir"}, {"event": "cancelled",
"step"} or {"event": "error", "message"} (the CLI's one line). SIGTERM or SIGINT asks for a
clean stop: during training, the step ends, its checkpoint is written and the run stays
resumable (a second signal changes nothing; SIGKILL is the hard stop); before training starts
(loading, class images), the process stops at once.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from ..cli import quiet_libraries, user_facing
from ..config import TrainConfig
from ..environment import check as check_environment

EXIT_CANCELLED = 130  # as the CLI after Ctrl-C


class _Events:
    def __init__(self, fd: int):
        self.out = os.fdopen(fd, "w", buffering=1)

    def __call__(self, event: str, **fields) -> None:
        self.out.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")
        self.out.flush()


def main(argv: list[str]) -> int:
    # stdout is the event channel; anything the libraries print (rich bars, warnings) goes to stderr
    emit = _Events(os.dup(1))
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    state = {"training": False, "stop": False, "step": 0}

    def on_signal(signum, frame):
        if state["training"]:
            # the progress hook stops the run after this step; a second signal (Ctrl-C reaches the
            # whole process group, then the app's shutdown asks again) must not cut that step short
            state["stop"] = True
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    emit("start", pid=os.getpid())
    try:
        check_environment()
        quiet_libraries()
        from ..dreambooth import train_subject
        from ..fit import Hook, StopRun

        with open(argv[0]) as f:
            cfg = TrainConfig(**json.load(f)["config"])

        def on_step(step: int, models: dict) -> None:
            state["training"], state["step"] = True, step
            emit("step", step=step, total=cfg.steps)
            if state["stop"]:
                raise StopRun(f"cancelled at step {step}")

        run_dir = train_subject(cfg, log=lambda text: emit("log", text=str(text)), progress=False,
                                hooks=(Hook("app-progress", 1, on_step),))
    except KeyboardInterrupt:
        emit("cancelled", step=state["step"])
        return EXIT_CANCELLED
    except Exception as e:  # noqa: BLE001 - a user's error is one line, a bug keeps its traceback
        if type(e).__name__ == "StopRun":
            emit("cancelled", step=state["step"])
            return EXIT_CANCELLED
        line = user_facing(e)
        if line is None:
            import traceback

            traceback.print_exc()
            line = f"{type(e).__name__}: {e} (a bug; the traceback is in the job's log)"
        emit("error", message=line)
        return 2
    emit("done", run_dir=str(run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
