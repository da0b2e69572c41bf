"""Every training task survives Ctrl-C and resumes exactly (`minimedi.training.TrainLoop`).

For each task: one uninterrupted run of N steps, in this process; one run of the same command in a child
process that gets a real SIGINT once its first periodic checkpoint exists; then `--resume` to N steps. The
weights, EMA, optimiser and generator states must be bit-identical to the uninterrupted run's.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import align
import train
from minimedi import diffusion, tasks
from minimedi.checkpoint import load_checkpoint
from minimedi.errors import UserError
from tests.helpers import TINY, assert_same_tensors, copy_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# script, its flags for N steps, the artifact, the prerequisites to copy from the tiny base run, and N: enough
# steps that the interrupt lands before the end (a step of each takes from 0.05 to 1 s here)
TASKS = {
    "clip": (train, lambda n: ["--task", "clip", "--n-pretrain", "64", "--clip-steps", str(n)], "clip.pt", (), 12),
    "diffusion": (train, lambda n: ["--n-pretrain", "64", "--steps", str(n)], "diffusion.pt", ("clip.pt",), 30),
    "sr": (train, lambda n: ["--task", "sr", "--sr-steps", str(n)], "sr.pt", ("clip.pt", "diffusion.pt"), 30),
    "classifier": (train, lambda n: ["--task", "classifier", "--cls-steps", str(n)], "classifier.pt",
                   ("clip.pt", "diffusion.pt"), 30),
    "aligned": (align, lambda n: ["--align-steps", str(n), "--align-ckpt-every", "2", "--align-focus", "10",
                                  "--no-report"], "aligned.pt",
                ("clip.pt", "diffusion.pt", "classifier.pt"), 12),
}


def interrupt_after_first_checkpoint(script, args, path):
    """Run `script args` in a child process and send it SIGINT as soon as `path` holds a checkpoint."""
    proc = subprocess.Popen([sys.executable, f"{script.__name__}.py", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


@pytest.mark.parametrize("task", TASKS)
def test_ctrl_c_then_resume_equals_uninterrupted(task, tiny_base, tmp_path, monkeypatch):
    script, flags, artifact, needs, steps = TASKS[task]
    common = TINY + flags(steps) + ["--ckpt-every", "2"] * (script is train)
    straight = copy_run(tiny_base, tmp_path / "straight", needs)
    script.main(common + ["--run", str(straight)])

    resumed = copy_run(tiny_base, tmp_path / "resumed", needs)
    code, out, err = interrupt_after_first_checkpoint(script, common + ["--run", str(resumed)], resumed / artifact)
    assert code == 130, err[-2000:]
    stopped = load_checkpoint(resumed / artifact)
    assert 2 <= stopped["step"] < steps and not stopped["finished"], "the interrupt came too late to test resume"
    assert "continue with --resume" in out
    if task == "classifier":  # the interrupted run's re-rendered training images are taken back, not drawn again
        assert (resumed / "classifier.rerendered.pt").exists()
        monkeypatch.setattr(tasks.classifier, "rerender", lambda *args, **kwargs: pytest.fail("re-rendered again"))
    script.main(common + ["--run", str(resumed), "--resume"])
    assert not (resumed / "classifier.rerendered.pt").exists()

    a, b = load_checkpoint(straight / artifact), load_checkpoint(resumed / artifact)
    assert a["step"] == b["step"] == steps and b["finished"]
    for key in ("model", "ema", "state"):
        if key in a:
            assert_same_tensors(a[key], b[key], f"{task} {key}")


@pytest.mark.parametrize("task, poison", [
    ("diffusion", (diffusion, "training_losses", lambda out: {**out, "loss": out["loss"] * float("nan")})),
])
def test_nan_loss_stops_and_leaves_the_checkpoint_byte_identical(task, poison, tiny_base, tmp_path, monkeypatch):
    script, flags, artifact, needs, _ = TASKS[task]
    run = copy_run(tiny_base, tmp_path / "run", needs)
    script.main(TINY + flags(2) + ["--run", str(run)])
    before = (run / artifact).read_bytes()
    module, name, spoil = poison
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: spoil(real(*a, **k)))
    with pytest.raises(UserError, match="loss became nan at step 2"):
        script.main(TINY + flags(4) + ["--run", str(run), "--resume", "--ckpt-every", "1"])
    assert (run / artifact).read_bytes() == before


def test_resume_with_another_architecture_names_the_flag(tiny_base, tmp_path):
    run = copy_run(tiny_base, tmp_path / "run")
    with pytest.raises(UserError, match="--dim 16, not 8"):
        train.main(TINY + ["--run", str(run), "--steps", "4", "--dim", "8", "--groups", "4", "--resume"])


def test_resume_of_a_finished_run_extends_it(tiny_base, tmp_path):
    run = copy_run(tiny_base, tmp_path / "run", ("clip.pt",))
    args = TINY + ["--n-pretrain", "64", "--run", str(run)]
    train.main(args + ["--steps", "3"])
    short = load_checkpoint(run / "diffusion.pt")
    train.main(args + ["--steps", "5", "--resume"])
    longer = load_checkpoint(run / "diffusion.pt")
    assert (short["step"], short["finished"], longer["step"], longer["finished"]) == (3, True, 5, True)
    assert not torch.equal(short["model"]["init_conv.weight"], longer["model"]["init_conv.weight"])
    with pytest.raises(UserError, match="past the 4 steps"):
        train.main(args + ["--steps", "4", "--resume"])
