"""The command-line chain on the official dataset layouts (issue 13), at tiny sizes, as a user with the
paper's data runs it:

    python train.py --data roco:PATH                                             clip.pt, diffusion.pt
    python train.py --task classifier --target brats:PATH --labels CSV           classifier.pt
    python align.py --no-report                                                  aligned.pt
    python sample.py --prompt "..."                                              samples/sample.png
    python -m minimedi.evaluate                                                  report.json, report.md

on trees (`tests/trees.py`) that hold what a real download holds: JPEGs, captions over CLIP's 77 tokens, a
corrupt image and a malformed caption line (ROCO); int16 volumes of 0.94 x 0.94 x 5 mm voxels, a subject
missing from the labels and a bad labels row (BraTS). Every step must finish without a traceback, say
what it kept and skipped, and every artifact must name the data it learned from.

The scripts run in this process (`run_main(script.main, argv)`: a `UserError` becomes exit code 2, as on
the command line), which saves an interpreter start and the imports per step.
"""
import contextlib
import io
import json
import os
from types import SimpleNamespace

import pytest

import align
import sample
import train
from minimedi import evaluate, tasks
from minimedi.checkpoint import load_checkpoint
from minimedi.data.reference import classifier_reference
from minimedi.errors import run_main
from tests.helpers import TINY, copy_run
from tests.trees import brats_tree, roco_tree, rocov2_tree

PROMPT = "Axial FLAIR MRI of the brain showing a large glioma in the left frontal lobe."


def run_script(main, argv):
    """(stdout, stderr) of one script run as the command line runs it; fails the test on a non-zero exit."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_main(main, [str(a) for a in argv])
        except SystemExit as stop:
            pytest.fail(f"{main.__module__} {' '.join(map(str, argv))} exited {stop.code}: {err.getvalue()[-2000:]}")
    assert "Traceback" not in err.getvalue()
    return out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The trees, and one run folder taken through the chain up to sample.py, with what each step printed."""
    root = tmp_path_factory.mktemp("real_data")
    roco = roco_tree(root / "roco", n=40, size=32, splits=("train",))["train"]
    brats = brats_tree(root / "brats", n=8)
    run = root / "run"
    steps = {
        "pretrain": (train.main, [*TINY, "--data", f"roco:{root / 'roco'}", "--clip-steps", 2, "--steps", 2]),
        "classifier": (train.main, [*TINY, "--task", "classifier", "--target", f"brats:{root / 'brats'}",
                                    "--labels", brats["labels"], "--cls-steps", 4]),
        "align": (align.main, [*TINY, "--align-steps", 1, "--no-report"]),
        "sample": (sample.main, [*TINY, "--prompt", PROMPT, "--n", 1]),
    }
    printed = {name: run_script(main, [*argv, "--run", run]) for name, (main, argv) in steps.items()}
    return SimpleNamespace(root=root, roco=roco, brats=brats, run=run, printed=printed)


def artifact(chain, name):
    return load_checkpoint(chain.run / name)


def test_pretraining_on_roco_names_its_data_and_counts_long_captions(chain):
    out, err = chain.printed["pretrain"]
    kept, long = len(chain.roco["kept"]), chain.roco["long"]
    assert f"ROCO train: kept {kept} images, skipped 2: 1 malformed caption line" in out
    assert "DataWarning" not in err                                     # said in one line, not as a warning
    assert out.count(f"{long} of {kept} captions are longer than 77 CLIP tokens: truncated") == 2  # clip, diffusion
    clip, diffusion = artifact(chain, "clip.pt"), artifact(chain, "diffusion.pt")
    for ckpt in (clip, diffusion):
        data = ckpt["data"]
        assert (data["kind"], data["path"], data["split"]) == ("roco", str(chain.root / "roco"), "train")
        assert (data["kept"], data["skipped_by_reason"]) == (kept, {"malformed caption line": 1, "corrupt image": 1})
        assert data["captions_truncated"] == long
        assert ckpt["config"]["data"]["pretrain"] == f"roco:{chain.root / 'roco'}"
    assert clip["clip_eval"]["retrieval_pairs"] == kept // 10 and "i2t_recall@1" in clip["clip_eval"]
    assert not any(k.startswith("zero_shot") for k in clip["clip_eval"])  # ROCO has no phantom attributes
    log = [json.loads(line) for line in open(chain.run / "log.jsonl")]
    assert {r["task"] for r in log if r.get("captions_truncated") == long} == {"clip", "diffusion"}


def test_the_brats_classifier_names_its_data_and_holds_out_whole_subjects(chain):
    out, _ = chain.printed["classifier"]
    labelled = chain.brats["labelled"]
    assert f"slices from {len(labelled)} subjects, skipped 2" in out and "held-out subjects" in out
    ckpt = artifact(chain, "classifier.pt")
    data = ckpt["data"]
    assert (data["kind"], data["path"], data["labels"]) == ("brats", str(chain.root / "brats"),
                                                            str(chain.brats["labels"]))
    assert data["skipped_by_reason"] == {"subject not in labels": 1, "label row without subject or sex": 1}
    assert (data["subjects"], data["modality"], data["pixel_mm"]) == (len(labelled), "all", 240 / 16)
    assert ckpt["target_shares"][1] == pytest.approx(data["female_share"])
    held = ckpt["split"]["heldout_groups"]
    assert set(held) < set(labelled)
    assert {chain.brats["subjects"][s]["sex"] for s in held} == {"female", "male"}  # each sex held out
    assert ckpt["metrics"]["n_heldout_groups"] == len(held)
    real = classifier_reference(ckpt)  # what the cap and the report measure against
    assert set(real.groups) == set(held) and len(real.groups) > len(held)  # every slice of those subjects


def test_align_and_sample_use_the_real_data_models(chain):
    out, _ = chain.printed["align"]
    classifier, aligned = artifact(chain, "classifier.pt"), artifact(chain, "aligned.pt")
    female = classifier["target_shares"][1]
    assert f"female {female:.3f}" in out and "not found" not in out       # nothing made on the side
    assert aligned["target_shares"] == classifier["target_shares"] and aligned["finished"]
    assert aligned["data"] == artifact(chain, "diffusion.pt")["data"]     # the ROCO it learned to draw from
    out, _ = chain.printed["sample"]
    assert f"wrote {chain.run / 'samples' / 'sample.png'}" in out and (chain.run / "samples" / "sample.png").is_file()


def test_align_refuses_to_make_a_phantom_classifier_for_a_roco_run(chain, tmp_path, capsys):
    run = copy_run(chain.run, tmp_path / "run", ("clip.pt", "diffusion.pt"))
    with pytest.raises(SystemExit) as stop:
        run_main(align.main, [*TINY, "--run", str(run), "--no-report"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"learned from --data roco:{chain.root / 'roco'}" in err
    assert f"python train.py --task classifier --target brats:PATH --labels CSV --run {run}" in err
    assert sorted(os.listdir(run)) == ["clip.pt", "diffusion.pt"]


def test_real_clip_weights_cut_long_roco_captions_instead_of_stopping(chain, tmp_path):
    """--clip: the frozen encoder truncates captions over 77 tokens, counts them and trains on."""
    weights = chain.run / "clip.pt"  # a CLIP checkpoint from outside the run, as OpenAI's would be
    out, _ = run_script(train.main, [*TINY, "--data", f"roco:{chain.root / 'roco'}", "--clip", weights,
                                     "--steps", 1, "--run", tmp_path])
    kept, long = len(chain.roco["kept"]), chain.roco["long"]
    assert f"{long} of {kept} captions are longer than 77 CLIP tokens" in out
    ckpt = load_checkpoint(tmp_path / "diffusion.pt")
    assert ckpt["text"]["clip"] == str(weights) and ckpt["data"]["captions_truncated"] == long
    assert not (tmp_path / "clip.pt").exists()


def test_pretraining_on_rocov2(tmp_path):
    expected = rocov2_tree(tmp_path / "rocov2", n=12, size=32, splits=("train",))["train"]
    out, _ = run_script(train.main, [*TINY, "--task", "clip", "--data", f"rocov2:{tmp_path / 'rocov2'}",
                                     "--clip-steps", 1, "--run", tmp_path / "run"])
    kept = len(expected["kept"])
    assert f"ROCOv2 train: kept {kept} images, skipped 2: 1 malformed CSV row" in out
    data = load_checkpoint(tmp_path / "run" / "clip.pt")["data"]
    assert (data["kind"], data["kept"], data["captions_truncated"]) == ("rocov2", kept, expected["long"])


def test_a_corpus_too_small_to_hold_out_trains_and_says_so(tmp_path):
    rocov2_tree(tmp_path / "rocov2", n=6, size=32, splits=("train",))
    out, _ = run_script(train.main, [*TINY, "--task", "clip", "--data", f"rocov2:{tmp_path / 'rocov2'}",
                                     "--clip-steps", 1, "--run", tmp_path / "run"])
    assert "CLIP evaluation skipped: 5 pairs are too few" in out
    assert load_checkpoint(tmp_path / "run" / "clip.pt")["clip_eval"] == {}


# ---- what waits for the real-data report (issue 11) and the record of a target-only run --------------------

def test_the_report_on_real_data_measures_against_held_out_real_subjects(chain, tmp_path):
    run = copy_run(chain.run, tmp_path / "run")
    run_script(evaluate.main, [*TINY, "--run", run, "--cls-steps", 2, "--eval-steps", 1])
    report = json.loads((run / "report.json").read_text())
    held = load_checkpoint(run / "classifier.pt")["split"]["heldout_groups"]
    assert report["data"]["pretrain"]["kind"] == "roco" and report["data"]["target"]["kind"] == "brats"
    assert sorted(report["reference"]["subjects"]) == sorted(held)          # never a training subject
    assert "probe" not in report["feature_network"]                          # a network trained on BraTS
    assert not (run / "probe.pt").exists()                                   # nothing trained on the phantom
    check = load_checkpoint(run / "sex_check.pt")
    assert check["data"]["kind"] == "brats" and check["split"]["heldout_groups"] == held
    for model in report["models"].values():
        assert {"female_fraction", "female_fraction_check", "domain_fid", "fid_female", "fid_male",
                "clip_score"} <= set(model)
        assert not {"modality", "side", "lobe", "female_fraction_probe"} & set(model)  # phantom-only rows
    assert {"modality", "side", "lobe"} <= set(report["left_out"])           # ... left out with a note
    assert "probe" not in (run / "report.md").read_text()


def test_a_brats_only_run_never_gets_phantom_pretraining(chain, tmp_path, capsys, monkeypatch):
    run = copy_run(chain.run, tmp_path / "run", ("classifier.pt",))

    def forbidden(cfg, name, d):
        raise AssertionError(f"made {name} from --data {cfg.data.pretrain} for a run that learned from BraTS")

    monkeypatch.setattr(tasks, "build", forbidden)
    with pytest.raises(SystemExit) as stop:
        run_main(align.main, [*TINY, "--run", str(run), "--no-report"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--data roco:PATH" in err and f"--run {run}" in err
