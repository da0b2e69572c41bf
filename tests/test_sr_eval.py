"""python -m minimedi.sr_eval on a tiny run: the report's files and numbers, and its pieces."""
import json
import math
import shutil

import pytest
import torch

import train
from minimedi import sr_eval
from minimedi.errors import UserError
from minimedi.flags import parse_config
from tests.helpers import TINY, copy_run


@pytest.fixture(scope="module")
def evaluated(tiny_base, tmp_path_factory):
    run = copy_run(tiny_base, tmp_path_factory.mktemp("sr_eval") / "run", ("clip.pt", "diffusion.pt", "classifier.pt"))
    train.main(TINY + ["--run", str(run), "--task", "sr", "--sr-steps", "4"])
    sr_eval.main(TINY + ["--run", str(run)])
    return run


def test_the_report_files_and_their_numbers(evaluated):
    report = json.loads((evaluated / "sr_report.json").read_text())
    assert (evaluated / "sr_report.md").read_text().startswith("# Super-resolution stage: 16 px -> 32 px")
    assert (evaluated / "sr_samples.png").exists() and (evaluated / "sex32.pt").exists()
    assert report["n"] == 8 and set(report["pairs"]) == {"sr", "bicubic", "real", "female_share"}
    pairs, cascade = report["pairs"], report["diffusion"]
    for q in (pairs["sr"], pairs["bicubic"], pairs["real"], cascade["sr"], cascade["bicubic"]):
        assert math.isfinite(q["fid"]) and q["consistency"]["mean"] >= 0
    # bicubic and two renders of a slice differ by their MR noise only; the SR stage keeps the base image, so
    # even after 4 training steps its outputs box-filter back to their inputs closer than that
    assert report["pairs"]["sr"]["consistency"]["mean"] < report["pairs"]["real"]["consistency"]["mean"] < 0.1
    control = report["pairs"]["female_share"]
    assert control["low"]["n"] == control["real"]["n"] == control["sr"]["n"] == 8
    assert 0 <= control["test_real"]["p_value"] <= 1 and 0 <= control["test_sr"]["p_value"] <= 1
    assert 0 <= control["paired_sr"]["p_value"] <= 1
    share = report["diffusion"]["female_share"]
    assert share["base"]["n"] == share["cascade"]["n"] == 8 and 0 <= share["test"]["p_value"] <= 1
    paired = share["paired"]
    assert paired["female_to_male"] + paired["male_to_female"] <= 8 and 0 <= paired["p_value"] <= 1
    # the SR stage keeps the base image (the default), so it cannot move the head by more than a pixel's rim
    area = report["diffusion"]["head_area"]
    assert 0 <= area["base"] <= 1 and abs(area["change"]) < 0.05 and area["sex_gap"] > 0
    assert "aligned" not in report  # the run has no aligned.pt


def test_a_cached_base_reader_is_loaded_without_decoding_the_target_corpus(evaluated, tmp_path, monkeypatch):
    """A run whose classifier.pt reads another subgroup falls back to <run>/sex16.pt: cached, it costs no
    decoding of the target corpus."""
    cfg = parse_config(TINY + ["--run", str(tmp_path)], sr_eval.SECTIONS)
    other = torch.load(evaluated / "classifier.pt", weights_only=True)
    torch.save({**other, "classes": ["young", "old"]}, tmp_path / "classifier.pt")
    shutil.copy(evaluated / "sex32.pt", tmp_path / "sex16.pt")  # the reader pools globally: any size loads

    def must_not_decode(*args):
        raise AssertionError("the target corpus was decoded although sex16.pt is cached with these settings")

    monkeypatch.setattr(sr_eval, "target_at", must_not_decode)
    _, metrics = sr_eval.base_sex_classifier(str(tmp_path), cfg.data, 16, cfg.sr_eval, cfg.run.seed, "cpu")
    assert metrics == torch.load(tmp_path / "sex16.pt", weights_only=True)["metrics"]


def test_without_sr_pt_it_names_the_command(tiny_base, tmp_path):
    with pytest.raises(UserError, match="python train.py --task sr"):
        sr_eval.main(TINY + ["--run", str(copy_run(tiny_base, tmp_path / "run", ("diffusion.pt",)))])


def test_female_share_and_the_two_proportion_test():
    a = sr_eval.female_share(torch.tensor([0.9, 0.8, 0.1, 0.2]))
    assert (a["female"], a["share"], a["se"]) == (2, 0.5, 0.25)
    same = sr_eval.two_proportion_test(a, a)
    far = sr_eval.two_proportion_test(sr_eval.female_share(torch.full((100,), 0.9)),
                                      sr_eval.female_share(torch.cat([torch.full((50,), 0.9), torch.zeros(50)])))
    assert same == {"z": 0.0, "p_value": 1.0} and far["z"] > 5 and far["p_value"] < 1e-6


def test_mcnemar_counts_the_changed_readings_and_gives_the_exact_binomial_p_value():
    before = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.1, 0.8, 0.2])
    after = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9, 0.8, 0.2])
    # 7 female -> male, 1 male -> female: p = 2 * P(Bin(8, 1/2) <= 1) = 2 * 9 / 256
    assert sr_eval.mcnemar_test(before, after) == {"female_to_male": 7, "male_to_female": 1, "p_value": 18 / 256}
    assert sr_eval.mcnemar_test(before, before)["p_value"] == 1.0
    flipped = sr_eval.mcnemar_test(before, 1 - before)  # every reading changes: 8 one way, 2 the other
    assert (flipped["female_to_male"], flipped["male_to_female"]) == (8, 2)
    assert flipped["p_value"] == 2 * (1 + 10 + 45) / 1024


def test_consistency_is_zero_for_an_image_whose_box_filter_is_the_input():
    low = torch.rand(3, 1, 4, 4)
    assert sr_eval.consistency(low.repeat_interleave(2, -1).repeat_interleave(2, -2), low)["mean"] < 1e-6
    assert sr_eval.consistency(torch.zeros(3, 1, 8, 8), low)["mean"] > 0.1
