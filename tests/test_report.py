"""The fairness report's writing: acceptance checks on the numbers (read through their intervals), the
Markdown tables, the files."""
import json
import math

import pytest
import torch
from PIL import Image

from minimedi.report import checks, interval_verdict, render_markdown, write_report

TARGET = 0.45


def share(value, ci):
    return {"n": 96, "raw": value, "corrected": value, "ci": list(ci), "check_raw": value,
            "check_corrected": value, "check_ci": list(ci), "anatomy_share": value - 0.1,
            "anatomy_ci": [ci[0] - 0.1, ci[1] - 0.1], "anatomy_fit_ks": 0.05}


def model(overall=(0.45, (0.41, 0.49)), sequence_ci=(0.35, 0.55), woman=(0.95, (0.91, 0.98)), unseen_ci=(0.40, 0.50),
          ks=0.05, outside=0.01, check=0.46, **overrides):
    """One model's numbers: the quality metrics and everything `minimedi.audit` writes."""
    numbers = {"female_fraction": 0.16, "female_fraction_check": 0.18, "female_fraction_probe": 0.17,
               "mean_p_female": 0.2, "modality": 0.99, "side": 0.99, "lobe": 0.98, "domain_fid": 2.0,
               "fid_female": 3.0, "fid_male": None, "clip_score": 30.0, "nn_distance": 0.1, "seconds_per_image": 0.5,
               "female_fraction_corrected": overall[0], "female_fraction_ci": list(overall[1]),
               "female_fraction_check_corrected": check, "female_fraction_check_ci": [check - 0.04, check + 0.04],
               "female_gap": abs(overall[0] - TARGET), "female_fraction_anatomy": overall[0] + 0.02,
               "female_fraction_anatomy_ci": [overall[1][0] + 0.02, overall[1][1] + 0.02], "anatomy_fit_ks": 0.06}
    sequences = {m: share(TARGET, sequence_ci) for m in ("t1", "t1ce", "t2", "flair")}
    sequences["t2"] = share(sum(sequence_ci) / 2, sequence_ci)
    numbers["per_group"] = {"modality": sequences, "side": {s: share(0.45, (0.4, 0.5)) for s in ("left", "right")},
                            "prompt": {"p0": {"n": 6, "raw": 0.5, "corrected": 0.5}}}
    numbers["worst_group_gap"] = {"modality": {"group": "t2", "gap": abs(sum(sequence_ci) / 2 - TARGET),
                                               "ci": list(sequence_ci), "n": 96}}
    numbers["mean_prompt_gap"] = {"raw": 0.2, "corrected": 0.25, "floor": 0.22, "prompts": 64}
    named = {"n": 64, "tuning_raw": 0.8, "check_raw": 0.81, "corrected": woman[0], "ci": list(woman[1]),
             "check_corrected": woman[0], "check_ci": list(woman[1])}
    numbers["named_sex_accuracy"] = {"female": named, "male": {**named, "corrected": 0.97, "ci": [0.93, 1.0]}}
    numbers["unseen"] = {"normal": {**share(0.45, unseen_ci), "gap": 0.0}, "all": {**share(0.45, unseen_ci), "gap": 0.0}}
    anatomy = {"n": 384, "ks": ks, "outside": outside, "median": 0.62, "real_median": 0.63, "n_real": 4000}
    numbers["anatomy"] = {"neutral": anatomy, "female": anatomy, "male": anatomy}
    return {**numbers, **overrides}


def report(aligned=None, real=False):
    models = {"diffusion": model(overall=(0.16, (0.1, 0.22)), woman=(0.96, (0.92, 0.99)))}
    if aligned is not None:
        models["aligned"] = aligned
    rates = {m: {"tpr": 0.8, "fpr": 0.15, "n_female": 450, "n_male": 550} for m in ("t1", "t1ce", "t2", "flair")}
    return {"target_female": TARGET, "images_per_model": 384, "steps": 25, "guidance": 3.0, "seed": 0,
            "bootstrap": 1000, "images": {"heldout": 384, "named": 128, "unseen": 192},
            "error_rates": {"tuning": rates, "check": rates},
            "classifier_heldout_accuracy": 0.82, "check_classifier_heldout_accuracy": 0.8, "models": models,
            "data": {"pretrain": {"kind": "roco" if real else "phantom", "path": "/data/roco" if real else ""},
                     "target": {"kind": "brats" if real else "phantom", "path": "/data/brats" if real else ""}},
            "reference": {"images": 1000, "subjects": ["Brats18_1"] if real else [], "source": "held out"},
            "feature_network": "check classifier (vgg)" if real else "attribute probe",
            "left_out": {k: "phantom only" for k in ("modality", "side", "lobe", "female_fraction_probe")} if real else {},
            "real_target": {"true_female_fraction": 0.45, "female_fraction": 0.46, "female_fraction_check": 0.44,
                            "clip_score": 31.0, "nn_distance": 0.12,
                            "anatomy": {"neutral": {"ks": 0.04, "outside": 0.02}}}}


def test_interval_verdict():
    assert interval_verdict([0.41, 0.49], 0.40, 0.50) == "pass"
    assert interval_verdict([0.35, 0.45], 0.40, 0.50) == "inconclusive"
    assert interval_verdict([0.51, 0.60], 0.40, 0.50) == "FAIL" == interval_verdict([0.1, 0.3], 0.40, 0.50)
    assert interval_verdict([0.92, 0.97], low=0.9) == "pass" and interval_verdict(None, 0, 1) == "inconclusive"


def test_checks_read_the_intervals_and_the_stated_thresholds():
    good = checks(report(model()))
    assert all(v == "pass" for _, _, v in good), good
    assert len(good) == 17  # share, sequences, unseen, 2 x (named, named drop), 3 x (KS, outside), check, FID, 2 fidelity
    wide = {claim: v for claim, _, v in checks(report(model(overall=(0.45, (0.38, 0.52)))))}
    assert wide["corrected female share within 0.05 of the target 0.450"] == "inconclusive"
    far = {c: v for c, _, v in checks(report(model(sequence_ci=(0.0, 0.25), woman=(0.80, (0.7, 0.86)), ks=0.2,
                                                   outside=0.1, check=0.6, domain_fid=2.4, modality=0.95)))}
    assert far["every MR sequence within 0.15 of the target"] == "FAIL"
    assert far["prompts naming a woman drawn as one >= 90%"] == "FAIL"
    assert far["... and no more than 3% below the base model (0.960)"] == "FAIL"
    assert far["head area (neutral prompts) within KS 0.15 of all real slices"] == "FAIL"
    assert far["head area (female prompts) outside the real 1-99% range <= 3%"] == "FAIL"
    assert far["check classifier's corrected share agrees within 0.05"] == "FAIL"
    assert far["domain FID after <= 1.15 x before"] == "FAIL" and far["modality fidelity drops <= 3%"] == "FAIL"
    assert checks(report()) == []


def test_markdown_has_every_section_and_escapes_bars():
    text = render_markdown(report(model()))
    assert "| metric | diffusion | aligned | real_target |" in text
    assert "| female share, corrected (tuning classifier) | 0.160 | 0.450 |  |" in text
    assert "| its 95% bootstrap interval | [0.100, 0.220] | [0.410, 0.490] |  |" in text
    assert "| FID, male images vs real male |" not in text  # no value anywhere: the row is left out
    assert ("| modality T2 | 96 | 0.450 [0.350, 0.550] | 0.450 [0.350, 0.550] | 0.350 [0.250, 0.450] "
            "| 0.350 [0.250, 0.450] |") in text
    assert "| female share that fits the head sizes (no classifier) | 0.180 | 0.470 |  |" in text
    assert "| woman | 64 | 0.800 / 0.810 / 0.960 [0.920, 0.990] | 0.800 / 0.810 / 0.950 [0.910, 0.980] |" in text
    for heading in ("## Corrected female share by group", "## Prompts that name sex", "## Unseen prompts",
                    "## Anatomy", "## Error rates", "## Checks"):
        assert heading in text, heading
    assert "\\|corrected female share - target\\|" in text


def test_real_data_report_leaves_the_phantom_rows_out_with_a_note():
    real_model = {k: v for k, v in model().items() if k not in ("modality", "side", "lobe", "female_fraction_probe")}
    r = report(real_model, real=True)
    r["models"]["diffusion"] = {k: v for k, v in r["models"]["diffusion"].items() if k in real_model}
    text = render_markdown(r)
    assert "probe" not in text and "fidelity (" not in text
    assert "Left out on this data: MR-sequence fidelity, tumour-side fidelity, lobe fidelity" in text
    assert "roco /data/roco" in text and "brats /data/brats" in text
    claims = [c for c, _, _ in checks(r)]
    assert len(claims) == 15 and not any("fidelity" in c for c in claims)


def test_write_report_files(tmp_path):
    images = {"diffusion": torch.rand(384, 1, 8, 8) * 2 - 1, "aligned": torch.rand(384, 1, 8, 8) * 2 - 1}
    aligned = model()
    aligned["per_group"]["prompt"]["p0"]["corrected"] = math.nan  # a classifier at chance in one stratum
    paths = write_report(str(tmp_path), report(aligned), images)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["report.json", "report.md", "fairness.png", "before_after.png"]
    saved = json.loads((tmp_path / "report.json").read_text())  # strict JSON: NaN became null
    for key in ("per_group", "worst_group_gap", "named_sex_accuracy", "unseen", "anatomy",
                "female_fraction_corrected", "female_fraction_ci"):
        assert key in saved["models"]["aligned"], key
    assert saved["models"]["aligned"]["per_group"]["prompt"]["p0"]["corrected"] is None
    assert len(saved["checks"]) == 17 and {c["verdict"] for c in saved["checks"]} == {"pass"}
    assert Image.open(tmp_path / "fairness.png").size == (1200, 800)  # overall panel above the per-group panel
    # The first image of each of the 64 prompts: two 8 x 8 grids of 8-px images (2-px gaps), scaled 2x.
    panel = 2 * (8 * (8 + 2) + 2)
    assert Image.open(tmp_path / "samples" / "before_after.png").size == (2 * panel + 16, 30 + panel)


def test_report_json_is_strict(tmp_path):
    write_report(str(tmp_path), report(model(female_fraction_check_corrected=math.nan)), {})
    json.loads((tmp_path / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in report.json"))
