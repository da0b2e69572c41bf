"""align.py end to end on the tiny preset: prerequisites made on demand, LoRA-only changes, the joint OT."""
import json
import os
import subprocess
import sys

import pytest
import torch

import align
import sample
import train
from minimedi.checkpoint import load_checkpoint
from minimedi.classifier import class_shares, subgroup_labels
from minimedi.config import make_config
from minimedi.data import target_corpus
from minimedi.clip import load_clip
from minimedi.lora import TEXT_TARGETS, UNET_TARGETS
from minimedi.pipeline import load_generator
from tests.helpers import TINY, copy_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_align_makes_missing_prerequisites(tmp_path, capsys):
    align.main(TINY + ["--run", str(tmp_path), "--align-steps", "1"])
    out = capsys.readouterr().out
    for name in ("clip.pt", "diffusion.pt", "classifier.pt"):
        assert f"{name} not found: making it first" in out, name
    assert (tmp_path / "aligned.pt").exists() and load_checkpoint(tmp_path / "aligned.pt")["finished"]


def test_only_adapted_layers_change_and_sampling_works(tiny_base, tmp_path):
    run = copy_run(tiny_base, tmp_path / "run")
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
    assert {"female_fraction_anatomy", "female_fraction_anatomy_ci", "anatomy_fit_ks"} <= report["models"]["aligned"].keys()
    assert "female_fraction_anatomy" in report["real_target"]
    assert (run / "samples" / "before_after.png").exists() and "## Checks" in (run / "report.md").read_text()
    out = tmp_path / "aligned.png"
    sample.main(["--run", str(run), "--model", "aligned", "--prompt", "Axial T2-weighted MRI of the brain.",
                 "--n", "2", "--sample-steps", "2", "--out", str(out)])
    assert out.exists()


def test_sex_by_age_group_aligns_to_the_target_corpus_joint_shares(tiny_base, tmp_path, capsys):
    run = copy_run(tiny_base, tmp_path / "run")
    train.main(TINY + ["--run", str(run), "--task", "classifier", "--subgroup", "sex_age"])
    align.main(TINY + ["--run", str(run), "--align-steps", "2", "--report"])
    assert "skipped" in capsys.readouterr().out and not (run / "report.json").exists()
    corpus = target_corpus(make_config("tiny").data)
    truth = class_shares(subgroup_labels([corpus.attributes(i) for i in range(len(corpus))], "sex_age"), 4)
    aligned = load_checkpoint(run / "aligned.pt")
    assert aligned["classes"][3] == "female age>=50"
    assert aligned["target_shares"] == pytest.approx(truth.tolist())
    batch = make_config("tiny").align.batch
    last = [json.loads(line) for line in open(run / "log.jsonl")][-1]
    assert len(last["class_fractions"]) == 4
    assert all(abs(f * batch - round(f * batch)) < 1e-6 for f in last["class_fractions"].values())  # counts / batch


def test_lora_targets_choose_the_layers_that_move(tiny_base, tmp_path):
    run = copy_run(tiny_base, tmp_path / "run")
    align.main(TINY + ["--run", str(run), "--align-lr", "1e-2", "--align-steps", "2", "--lora-targets", "kv,film",
                       "--no-report"])
    before, after = load_checkpoint(run / "diffusion.pt")["ema"], load_checkpoint(run / "aligned.pt")["ema"]
    moved = {k.rpartition(".")[0].rsplit(".", 1)[-1] for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"kv", "film"}


def test_lambda_null_weighs_the_null_caption_drift_into_the_loss(tiny_base, tmp_path):
    """The same tuning with and without --lambda-null: the drift is measured (and logged) only when it weighs,
    and weighing it changes what the tuning makes (`differentiable_sampler.null_drift` is tested there)."""
    def tune(lambda_null):
        run = copy_run(tiny_base, tmp_path / f"null{lambda_null}")
        align.main(TINY + ["--run", str(run), "--align-lr", "3e-2", "--align-steps", "2", "--lambda-null",
                           str(lambda_null), "--no-report"])
        drifts = [r["null_drift"] for r in map(json.loads, open(run / "log.jsonl")) if r.get("task") == "align"]
        return load_checkpoint(run / "aligned.pt")["ema"], drifts

    (free, free_drifts), (held, held_drifts) = tune(0), tune(1e6)
    assert free_drifts == [0, 0] and all(d > 0 for d in held_drifts[1:])  # the adapters start at the frozen model
    assert any(not torch.equal(free[k], held[k]) for k in free)


def test_text_targets_tune_a_copy_of_the_text_encoder_that_sampling_reads(tiny_base, tmp_path):
    run = copy_run(tiny_base, tmp_path / "run")
    align.main(TINY + ["--run", str(run), "--align-lr", "1e-2", "--align-steps", "2", "--lora-targets", "text",
                       "--no-report"])
    base, aligned = load_checkpoint(run / "diffusion.pt"), load_checkpoint(run / "aligned.pt")
    assert all(torch.equal(base["ema"][k], v) for k, v in aligned["ema"].items())  # the UNet is untouched
    frozen, tuned = load_clip(run / "clip.pt").state_dict(), aligned["text_encoder"]["model"]
    moved = {k for k in frozen if not torch.equal(frozen[k], tuned[k])}
    assert moved and all(k.startswith("transformer.") and k.rpartition(".")[0].rsplit(".", 1)[-1] in TEXT_TARGETS
                         and k.endswith(".weight") for k in moved), moved
    prompt = ["Axial T2 MRI of the brain showing a small glioma in the left frontal lobe."]
    generators = {m: load_generator(m, str(run)) for m in ("diffusion", "aligned")}
    states = {m: g.encoder.encode(prompt)[0] for m, g in generators.items()}
    assert not torch.equal(states["diffusion"], states["aligned"])  # aligned.pt's captions go through its own CLIP
    assert not torch.equal(generators["diffusion"](prompt, steps=3, seed=1), generators["aligned"](prompt, steps=3,
                                                                                                  seed=1))


@pytest.mark.parametrize("argv, message", [
    (["--target-female", "1.5"], "must be <= 1"),
    (["--align-loss", "l2"], "invalid choice"),
    (["--lambda-clip"], "expected one argument"),
    (["--lora-targets", "q,foo"], "foo is not one of"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, argv, message):
    r = subprocess.run([sys.executable, "align.py", *TINY, "--run", str(tmp_path), *argv], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len([line for line in r.stderr.splitlines() if "%|" not in line]) == 1, r.stderr
