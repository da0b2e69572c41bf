"""The cascade end to end on a tiny run: `train.py --task sr` refuses what cannot work, sample.py runs the base
model then the SR stage (deterministic for a seed, at the final size, --stages base at the base size), and an
exported folder carries the SR stage with it (and, when align.py tuned the text encoder, the frozen one the
SR stage reads)."""
import dataclasses
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import sample
import train
from minimedi.checkpoint import load_checkpoint
from minimedi.clip import load_clip
from minimedi.errors import run_main
from minimedi.export import main as export_main
from minimedi.pipeline import SR_TEXT_ENCODER, Cascade, TextToImage, load_generator
from tests.helpers import TINY, copy_run

PROMPT = "Axial FLAIR MRI of the brain showing a large glioma in the left frontal lobe."


@pytest.fixture(scope="module")
def sr_run(tiny_base, tmp_path_factory):
    """The tiny base run plus a 4-step SR stage (16 -> 32 px)."""
    run = copy_run(tiny_base, tmp_path_factory.mktemp("sr_run") / "run", ("clip.pt", "diffusion.pt"))
    train.main(TINY + ["--run", str(run), "--task", "sr", "--sr-steps", "4"])
    return run


def _volume(argv, tmp_path, name):
    sample.main(argv + ["--prompt", PROMPT, "--n", "2", "--sample-steps", "2", "--sr-sample-steps", "2",
                        "--out", str(tmp_path / f"{name}.png"), "--nifti", str(tmp_path / f"{name}.nii.gz")])
    return nib.load(tmp_path / f"{name}.nii.gz").get_fdata()


def test_sr_records_its_architecture_base_and_text_encoder(sr_run):
    ckpt = load_checkpoint(sr_run / "sr.pt")
    assert ckpt["finished"] and ckpt["step"] == 4
    assert ckpt["architecture"]["sr"]["size"] == 32 and ckpt["architecture"]["data"]["image_size"] == 16
    assert ckpt["text"]["clip"] == "clip.pt" and ckpt["data"]["pairs"] == 64  # the base's --n-pretrain 64


@pytest.mark.parametrize("flags, message", [(["--sr-size", "40", "--sr-crop", "8"], "multiple of"),
                                            (["--sr-size", "16", "--sr-crop", "8"], "larger than it")])
def test_sr_size_that_does_not_enlarge_the_base_is_one_line_and_exit_2(tiny_base, tmp_path, capsys, flags, message):
    run = copy_run(tiny_base, tmp_path / "run", ("clip.pt", "diffusion.pt"))
    with pytest.raises(SystemExit) as stop:
        run_main(train.main, TINY + ["--run", str(run), "--task", "sr", *flags])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (run / "sr.pt").exists()


def test_cascade_is_deterministic_for_a_seed_and_at_the_final_size(sr_run, tmp_path):
    a = _volume(["--run", str(sr_run), "--seed", "1"], tmp_path, "a")
    b = _volume(["--run", str(sr_run), "--seed", "1"], tmp_path, "b")
    c = _volume(["--run", str(sr_run), "--seed", "2"], tmp_path, "c")
    assert a.shape == (32, 32, 2)
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_stages_base_samples_the_base_model_alone(sr_run, tmp_path):
    assert _volume(["--run", str(sr_run), "--stages", "base"], tmp_path, "base").shape == (16, 16, 2)


def test_the_cascades_first_stage_is_the_base_models_samples_for_the_seed(sr_run):
    cascade = load_generator("diffusion", str(sr_run), stages="all", sr={"steps": 2})
    base = load_generator("diffusion", str(sr_run))
    assert isinstance(cascade, Cascade) and isinstance(base, TextToImage)
    low, high = cascade([PROMPT] * 2, steps=2, seed=5, return_base=True)
    assert torch.equal(low, base([PROMPT] * 2, steps=2, seed=5))
    assert high.shape == (2, 1, 32, 32) and high.abs().max() <= 1


def test_an_exported_cascade_samples_anywhere_like_its_run(sr_run, tmp_path):
    run = copy_run(sr_run, tmp_path / "run")
    export_main(["--run", str(run), "--model", "diffusion", "--out", str(tmp_path / "model")])
    shutil.rmtree(run)
    shutil.move(tmp_path / "model", tmp_path / "far" / "away")
    config = json.loads((tmp_path / "far" / "away" / "config.json").read_text())
    assert config["sr"]["architecture"]["sr"]["size"] == 32
    exported = _volume(["--model", str(tmp_path / "far" / "away")], tmp_path, "exported")
    original = _volume(["--run", str(sr_run)], tmp_path, "original")
    assert exported.shape == (32, 32, 2) and np.array_equal(exported, original)


def test_the_aligned_cascade_is_the_aligned_base_then_the_same_sr_stage(sr_run, tmp_path):
    run = copy_run(sr_run, tmp_path / "run")
    aligned = load_checkpoint(run / "diffusion.pt")
    aligned["ema"] = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                      for k, v in aligned["ema"].items()}  # stands in for tuned weights
    torch.save(aligned, run / "aligned.pt")
    cascade = load_generator("aligned", str(run), stages="all", sr={"steps": 2})
    assert isinstance(cascade, Cascade) and cascade.image_size == 32
    assert torch.equal(cascade.sr_unet.init_conv.weight, load_checkpoint(run / "sr.pt")["ema"]["init_conv.weight"])
    base = load_generator("diffusion", str(run), stages="all", sr={"steps": 2})
    low_aligned, _ = cascade([PROMPT] * 2, steps=2, seed=0, return_base=True)
    low_base, _ = base([PROMPT] * 2, steps=2, seed=0, return_base=True)
    assert not torch.equal(low_aligned, low_base)


def test_an_aligned_text_encoder_reaches_the_base_stage_and_the_sr_stage_keeps_the_frozen_one(sr_run, tmp_path):
    run = copy_run(sr_run, tmp_path / "run")
    aligned, clip = load_checkpoint(run / "diffusion.pt"), load_clip(run / "clip.pt")
    tuned = {k: v + 0.05 * torch.randn_like(v) if k.startswith("transformer.") else v
             for k, v in clip.state_dict().items()}  # stands in for align.py --lora-targets text
    aligned["text_encoder"] = {"config": dataclasses.asdict(clip.config), "model": tuned}
    torch.save(aligned, run / "aligned.pt")
    cascade = load_generator("aligned", str(run), stages="all", sr={"steps": 2})
    states = {name: e.encode([PROMPT])[0] for name, e in (("base", cascade.encoder), ("sr", cascade.sr_encoder))}
    assert not torch.equal(states["base"], states["sr"])
    assert torch.equal(states["sr"], load_generator("diffusion", str(run)).encoder.encode([PROMPT])[0])
    export_main(["--run", str(run), "--model", "aligned", "--out", str(tmp_path / "model")])
    assert (tmp_path / "model" / SR_TEXT_ENCODER).exists()
    exported = load_generator(str(tmp_path / "model"), stages="all", sr={"steps": 2})
    assert torch.equal(exported([PROMPT], steps=2, seed=3), cascade([PROMPT], steps=2, seed=3))
