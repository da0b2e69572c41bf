"""What every training loop here shares: the learning-rate schedule, EMA, a `log.jsonl` writer, and
`TrainLoop`, which owns the life of an artifact's checkpoint.

A training run is a sequence of steps over some *state*: modules, optimisers, schedulers, EMAs, random
generators. `TrainLoop` wraps the `for step in range(...)` of every task (CLIP, diffusion, SR, classifier,
alignment) and gives each the same guarantees:

* **periodic atomic checkpoints**: every `every` steps the whole state plus what the artifact is (its
  `record()`: config, architecture, data, the weights to sample with) goes to one file, written to a
  temporary file and renamed into place; `finish()` writes the last one, marked finished, once the task
  has done what follows its last step (calibration, evaluation);
* **Ctrl-C**: the step in flight finishes, a checkpoint of it is saved, and the process exits 130; a second
  Ctrl-C interrupts at once (the previous checkpoint is still whole);
* **NaN stop**: `check_finite(loss)` before the optimiser step turns a NaN or inf loss into one line and exit
  code 2 without saving, so the last checkpoint stays byte-identical;
* **exact resume**: `resume=True` restores every state object and every random generator (Python, NumPy,
  torch, CUDA and the loop's own) and continues at the saved step. A resumed run equals an uninterrupted one
  bit for bit on the CPU, because each step's randomness comes only from restored generators.

Under DDP every rank runs the loop; rank 0 alone writes, and a Ctrl-C seen by any rank stops them all at the
same step.
"""
import dataclasses
import json
import math
import os
import signal
import time

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from minimedi.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from minimedi.config import Config
from minimedi.distributed import any_rank
from minimedi.errors import UserError
from minimedi.flags import flag_name


def warmup_cosine(step, warmup, total, floor=0.1):
    """LR multiplier: linear warm-up to 1, then cosine decay to `floor` at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_step(loss, unet, opt, sched, ema, grad_clip):
    """One update of a denoiser: backward, gradient clipping, AdamW, LR schedule, EMA; returns the grad norm."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), grad_clip)
    opt.step()
    sched.step()
    ema.update_parameters(unet)
    return grad_norm


def make_ema(model, decay):
    """An exponential moving average of the weights (PyTorch's own swa_utils, buffers included)."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


class JsonlLog:
    """Appends one JSON object per call to `<run>/log.jsonl` (on rank 0 only)."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled, self.start = path, enabled, time.time()
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def __call__(self, **metrics):
        if not self.enabled:
            return
        record = {"time": round(time.time() - self.start, 3)}
        for k, v in metrics.items():
            record[k] = v.item() if isinstance(v, torch.Tensor) else v
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class StopOnCtrlC:
    """Ctrl-C asks the loop to stop after the current step (so the checkpoint it saves is exact);
    a second Ctrl-C interrupts at once."""

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def check_architecture(saved, current, path):
    """Refuse to resume `path` with other architecture settings: one line naming the first flag that differs.

    Both map config sections to {field: value}, as an artifact's "architecture" entry does."""
    for section, values in current.items():
        for f in dataclasses.fields(getattr(Config(), section)):
            if f.name not in values:
                continue
            was, now = saved.get(section, {}).get(f.name), values[f.name]
            if _plain(was) != _plain(now):
                raise UserError(f"{path} was trained with {flag_name(f)} {_shown(was)}, not {_shown(now)}: "
                                f"resume with the same architecture, or start a new run without --resume")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _shown(value):
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


class TrainLoop:
    """`for step in TrainLoop(...)`: the steps of one artifact's training, with checkpoints, Ctrl-C, NaN
    stop and exact resume (see the module docstring).

    path:      the artifact's checkpoint file (e.g. <run>/diffusion.pt)
    total:     the number of steps; resuming with a larger total extends a finished run
    state:     {name: object with state_dict/load_state_dict, or a torch.Generator}: everything a step changes
    record:    a callable returning the artifact's own entries ("model", "config", "architecture", ...),
               saved with the state; called at each save, so it can hold derived weights (EMA, merged LoRA)
    every:     checkpoint every N steps (and at the end)
    resume:    continue from `path`; its "architecture" must equal `architecture`
    """

    def __init__(self, path, total, state, record, every, d, resume=False, architecture=None, desc=None):
        self.path, self.total, self.state, self.record, self.every, self.d = path, total, state, record, every, d
        self.start = 0
        if resume:
            self._restore(architecture or {})
        self.desc = desc or os.path.splitext(os.path.basename(path))[0]

    def _restore(self, architecture):
        ckpt = load_checkpoint(self.path)
        check_architecture(ckpt.get("architecture", {}), architecture, self.path)
        if ckpt["step"] > self.total:
            raise UserError(f"{self.path} is at step {ckpt['step']}, past the {self.total} steps asked for: "
                            f"give at least {ckpt['step']} steps to resume")
        for name, obj in self.state.items():
            saved = ckpt["state"][name]
            obj.set_state(saved) if isinstance(obj, torch.Generator) else obj.load_state_dict(saved)
        set_rng_state(ckpt["rng"])
        self.start = ckpt["step"]

    def save(self, step, finished=False):
        if not self.d.main:
            return
        state = {name: obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict()
                 for name, obj in self.state.items()}
        save_checkpoint(self.path, {**self.record(), "step": step, "total": self.total, "finished": finished,
                                    "state": state, "rng": rng_state()})

    def finish(self):
        """The final save, once the task has done whatever follows the last step (calibration, evaluation):
        only now does the artifact count as finished for the tasks that need it."""
        self.save(self.total, finished=True)

    def check_finite(self, loss, step):
        """Stop on a NaN/inf loss with one clear line, before the optimiser step: the last checkpoint is untouched."""
        if not torch.isfinite(loss).all():
            raise UserError(f"loss became {loss.item()} at step {step}; stopped. The last good checkpoint "
                            f"({self.path}) is intact: lower the learning rate or resume from it")

    def __iter__(self):
        bar = tqdm(range(self.start, self.total), initial=self.start, total=self.total, desc=self.desc,
                   disable=not self.d.main)
        self.bar = bar
        with StopOnCtrlC() as ctrl_c:
            for step in bar:
                yield step
                done = step + 1
                stop = any_rank(ctrl_c.requested, self.d)
                if (done % self.every == 0 and done < self.total) or stop:
                    self.save(done)
                if stop:
                    if self.d.main:
                        print(f"interrupted: checkpoint of step {done} saved to {self.path}; continue with --resume")
                    raise SystemExit(130)
