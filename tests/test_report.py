"""The fairness report's writing: acceptance checks on the numbers, the Markdown table, the files."""
import json

import pytest
import torch
from PIL import Image

from minimedi.report import checks, render_markdown, write_report


def model(**overrides):
    numbers = {"female_fraction": 0.16, "female_gap": 0.29, "female_fraction_check": 0.18,
               "female_fraction_probe": 0.17, "mean_p_female": 0.2, "modality": 0.99, "side": 0.99, "lobe": 0.98,
               "domain_fid": 2.0, "fid_female": 3.0, "fid_male": None, "clip_score": 30.0, "nn_distance": 0.1,
               "seconds_per_image": 0.5}
    return {**numbers, **overrides}


def report(aligned=None):
    models = {"diffusion": model()}
    if aligned is not None:
        models["aligned"] = aligned
    return {"target_female": 0.45, "images_per_model": 128, "steps": 50, "guidance": 3.0, "seed": 0,
            "classifier_heldout_accuracy": 0.82, "check_classifier_heldout_accuracy": 0.8, "models": models,
            "real_target": {"true_female_fraction": 0.45, "female_fraction": 0.46, "female_fraction_check": 0.44,
                            "clip_score": 31.0, "nn_distance": 0.12}}


def test_checks_pass_and_fail_on_the_stated_thresholds():
    good = model(female_fraction=0.43, female_gap=0.02, female_fraction_check=0.47, domain_fid=2.2,
                 modality=0.97, side=0.99)
    assert [ok for _, _, ok in checks(report(good))] == [True] * 5
    bad = model(female_fraction=0.43, female_gap=0.02, female_fraction_check=0.30, domain_fid=2.4,
                modality=0.95, side=0.99)
    assert [ok for _, _, ok in checks(report(bad))] == [True, False, False, False, True]
    assert checks(report()) == []


def test_markdown_has_a_column_per_model_and_escapes_bars():
    text = render_markdown(report(model(female_gap=0.01)))
    assert "| metric | diffusion | aligned | real_target |" in text
    assert "| female fraction (tuning classifier) | 0.160 | 0.160 | 0.460 |" in text
    assert "| FID, male images vs real male |" not in text  # no value anywhere: the row is left out
    assert "\\|female fraction - target\\| <= 0.05 after alignment | 0.010 | pass |" in text


def test_write_report_files(tmp_path):
    images = {"diffusion": torch.rand(128, 1, 8, 8) * 2 - 1, "aligned": torch.rand(128, 1, 8, 8) * 2 - 1}
    paths = write_report(str(tmp_path), report(model()), images)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["report.json", "report.md", "fairness.png", "before_after.png"]
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["models"]["aligned"]["female_fraction"] == pytest.approx(0.16) and len(saved["checks"]) == 5
    assert Image.open(tmp_path / "fairness.png").size == (640, 400)
    # The first image of each of the 64 prompts: two 8 x 8 grids of 8-px images (2-px gaps), scaled 2x.
    panel = 2 * (8 * (8 + 2) + 2)
    assert Image.open(tmp_path / "samples" / "before_after.png").size == (2 * panel + 16, 30 + panel)
