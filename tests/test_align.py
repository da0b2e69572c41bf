"""align.py end to end on the tiny preset: prerequisites trained on demand, LoRA-only changes, exact resume."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import align
import sample
import train
from minimedi.checkpoint import load_checkpoint
from minimedi.lora import UNET_TARGETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny run with clip.pt, diffusion.pt and classifier.pt."""
    run = tmp_path_factory.mktemp("base")
    args = TINY + ["--n-pretrain", "64", "--clip-steps", "2", "--steps", "2", "--run", str(run)]
    train.main(args)
    train.main(args + ["--task", "classifier"])
    return run


def _copy(base_run, run):
    shutil.copytree(base_run, run)
    return run


def test_align_trains_missing_prerequisites(tmp_path, capsys):
    align.main(TINY + ["--run", str(tmp_path), "--align-steps", "1"])
    out = capsys.readouterr().out
    assert "training the diffusion model first" in out and "training the subgroup classifier first" in out
    assert (tmp_path / "aligned.pt").exists()


def test_only_adapted_layers_change_and_sampling_works(base_run, tmp_path):
    run = _copy(base_run, tmp_path / "run")
    align.main(TINY + ["--run", str(run), "--align-lr", "1e-2", "--report"])
    before, after = load_checkpoint(run / "diffusion.pt")["ema"], load_checkpoint(run / "aligned.pt")["ema"]
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "tuning changed nothing"
    for key in changed:  # only the weights of LoRA-wrapped linears (merged back) may move
        module, _, param = key.rpartition(".")
        assert param == "weight" and module.rsplit(".", 1)[-1] in UNET_TARGETS, key
    records = [json.loads(line) for line in open(run / "log.jsonl")]
    steps = [r for r in records if r.get("task") == "align"]
    assert len(steps) == 4 and {"align_loss", "clip_loss", "running_class_fractions"} <= steps[-1].keys()
    assert set(steps[-1]["class_fractions"]) == {"male", "female"}
    report = json.loads((run / "report.json").read_text())
    assert list(report["models"]) == ["diffusion", "aligned"] and report["checks"]
    assert {c["verdict"] for c in report["checks"]} <= {"pass", "FAIL", "inconclusive"}
    assert (run / "samples" / "before_after.png").exists() and "## Checks" in (run / "report.md").read_text()
    out = tmp_path / "aligned.png"
    sample.main(["--run", str(run), "--model", "aligned", "--prompt", "Axial T2-weighted MRI of the brain.",
                 "--n", "2", "--sample-steps", "2", "--out", str(out)])
    assert out.exists()


def test_sex_by_age_group_aligns_with_the_joint_assignment(base_run, tmp_path, capsys):
    run = _copy(base_run, tmp_path / "run")
    train.main(TINY + ["--run", str(run), "--task", "classifier", "--subgroup", "sex_age"])
    align.main(TINY + ["--run", str(run), "--align-steps", "2", "--report"])
    assert "skipped" in capsys.readouterr().out and not (run / "report.json").exists()
    last = [json.loads(line) for line in open(run / "log.jsonl")][-1]
    assert len(last["class_fractions"]) == 4 and sum(last["class_fractions"].values()) == pytest.approx(1.0)
    assert load_checkpoint(run / "aligned.pt")["classes"][3] == "female age>=50"


def test_resume_continues_exactly(base_run, tmp_path):
    straight, resumed = _copy(base_run, tmp_path / "straight"), _copy(base_run, tmp_path / "resumed")
    align.main(TINY + ["--run", str(straight), "--align-steps", "4"])
    align.main(TINY + ["--run", str(resumed), "--align-steps", "2"])
    align.main(TINY + ["--run", str(resumed), "--align-steps", "4", "--resume"])
    a, b = load_checkpoint(straight / "aligned.pt"), load_checkpoint(resumed / "aligned.pt")
    assert a["step"] == b["step"] == 4
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k


@pytest.mark.parametrize("argv, message", [
    (["--target-female", "1.5"], "must be <= 1"),
    (["--align-loss", "l2"], "invalid choice"),
    (["--lambda-clip"], "expected one argument"),
])
def test_bad_input_is_one_line_and_exit_2(base_run, argv, message):
    r = subprocess.run([sys.executable, "align.py", *TINY, "--run", str(base_run), *argv], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len([line for line in r.stderr.splitlines() if "%|" not in line]) == 1, r.stderr
