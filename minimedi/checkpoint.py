"""Checkpoints: one file per model, written atomically, loaded safely, resumable exactly.

A checkpoint is a dict saved with `torch.save`: what the artifact is (`"model"` weights, `"config"` of the
run, `"architecture"` to rebuild it, `"data"` it learned from, ...) and, for resuming, its training `"state"`,
`"rng"` and `"step"` of `"total"` (`minimedi.training.TrainLoop` writes them). `"format"` is this layout's
version: a file from an older minimedi is refused with one line rather than half-understood.

It is written to a temporary file in the same directory, flushed to disk, and renamed over the old one:
`os.replace` is atomic on POSIX, so a crash mid-save leaves the previous checkpoint intact and never a
torn file. Loading uses `torch.load(weights_only=True)`, which refuses pickled code, so only tensors,
numbers, strings and containers may go in (configs go in as plain dicts).
"""
import os
import random

import numpy as np
import torch

from minimedi.atomic import atomic_path
from minimedi.errors import UserError

FORMAT = 2


def save_checkpoint(path, payload):
    """Write `payload` to `path` atomically: temp file, fsync, rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save({**payload, "format": FORMAT}, f)
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by `save_checkpoint`; any problem is one clear `UserError`."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read checkpoint {path} (truncated, corrupt or not a minimedi checkpoint): "
                        f"{reason[:200]}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path} is not a minimedi checkpoint (no 'model' entry)")
    if ckpt.get("format") != FORMAT:
        raise UserError(f"{path} was written by another version of minimedi (format {ckpt.get('format')}, this one "
                        f"reads {FORMAT}): make it again with this version")
    return ckpt


def rng_state():
    """Every random generator a training step touches, as tensors and plain values."""
    np_state = np.random.get_state()
    _, py_state, py_gauss = random.getstate()
    state = {
        "python": [list(py_state), py_gauss],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what `rng_state` captured."""
    py_state, py_gauss = state["python"]
    random.setstate((3, tuple(py_state), py_gauss))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
