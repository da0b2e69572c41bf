"""Evaluation pieces: the attribute probe on real phantom slices, the report CLI."""
import json

import pytest

import train
from minimedi.data.captions import LOBES
from minimedi.data.phantom import PhantomCorpus
from minimedi.errors import run_main
from minimedi.evaluate import main
from minimedi.probe import PROBE_HEADS, probe_predictions, probe_targets, readback, train_probe


def test_readback_counts_matches_and_female_share():
    prompted = [{"modality": "t1", "side": "left", "lobe": "frontal"}] * 4
    predictions = {"modality": ["t1", "t1", "t2", "t1"], "side": ["left"] * 4, "lobe": ["frontal", *["none"] * 3],
                   "sex": ["female", "male", "male", "male"]}
    assert readback(predictions, prompted) == {"modality": 0.75, "side": 1.0, "lobe": 0.25, "female_fraction": 0.25}


def test_probe_targets_cover_every_head():
    corpus = PhantomCorpus(20, 16, 0.5, seed=0)
    targets = probe_targets([corpus.attributes(i) for i in range(20)])
    assert set(targets) == set(PROBE_HEADS)
    assert all(int(t.max()) < len(PROBE_HEADS[h]) for h, t in targets.items())
    assert set(PROBE_HEADS["lobe"][1:]) == set(LOBES)


@pytest.mark.slow
def test_probe_reads_attributes_of_real_slices():
    """Trained on one phantom corpus, it reads modality and side off another (held-out seed)."""
    probe = train_probe(32, steps=150, n=3000, seed=11)
    corpus = PhantomCorpus(400, 32, 0.5, seed=12, kind="target")
    attributes = [corpus.attributes(i) for i in range(len(corpus))]
    scores = readback(probe_predictions(probe, corpus.images()), attributes)
    assert scores["modality"] >= 0.9 and scores["side"] >= 0.9, scores


def test_report_cli_on_a_tiny_run(tmp_path):
    run = ["--preset", "tiny", "--run", str(tmp_path)]
    train.main(run + ["--n-pretrain", "64", "--clip-steps", "2", "--steps", "2"])
    train.main(run + ["--task", "classifier"])
    main(run)
    report = json.loads((tmp_path / "report.json").read_text())
    base = report["models"]["diffusion"]
    assert report["images_per_model"] == 64 and list(report["models"]) == ["diffusion"]
    for key in ("female_fraction", "female_fraction_check", "female_fraction_probe", "modality", "side", "lobe"):
        assert 0 <= base[key] <= 1, key
    assert base["domain_fid"] > 0 and base["nn_distance"] > 0 and 0 <= base["clip_score"] <= 100
    assert report["checks"] == []  # nothing to check without an aligned model
    assert report["images"] == {"heldout": 64, "named": 64, "unseen": 96}  # tiny: 1 image per prompt
    for key in ("per_group", "worst_group_gap", "named_sex_accuracy", "unseen", "anatomy",
                "female_fraction_corrected", "female_fraction_ci", "mean_prompt_gap"):
        assert key in base, key
    assert set(base["per_group"]) == {"modality", "side", "lobe", "size", "prompt"} and len(base["per_group"]["prompt"]) == 64
    assert [base["per_group"]["modality"][m]["n"] for m in ("t1", "t1ce", "t2", "flair")] == [16] * 4
    assert set(base["named_sex_accuracy"]) == {"female", "male"} and set(base["unseen"]) == {"normal", "age", "template", "all"}
    assert {name: a["n"] for name, a in base["anatomy"].items()} == {"neutral": 64, "female": 32, "male": 32}
    assert all(0 <= a["ks"] <= 1 and 0 <= a["outside"] <= 1 for a in base["anatomy"].values())
    rates = report["error_rates"]["tuning"]
    assert list(rates) == ["t1", "t1ce", "t2", "flair"] and sum(r["n_female"] + r["n_male"] for r in rates.values()) == 4000
    for name in ("probe.pt", "sex_check.pt", "report.md", "fairness.png"):
        assert (tmp_path / name).exists(), name
    assert "| domain FID vs real target (feature network) |" in (tmp_path / "report.md").read_text()
    assert report["feature_network"].startswith("attribute probe") and report["left_out"] == {}
    assert report["data"]["target"]["kind"] == "phantom" and report["reference"]["images"] == 4000


def test_report_without_a_classifier_says_how_to_make_one(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_main(main, ["--preset", "tiny", "--run", str(tmp_path)])
    assert stop.value.code == 2 and "python train.py --task classifier" in capsys.readouterr().err
