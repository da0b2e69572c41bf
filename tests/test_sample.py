"""sample.py on a tiny trained run: PNG grid, NIfTI stack, same seed -> same images, bad input -> exit 2."""
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import sample
from minimedi import diffusion
from minimedi.pipeline import load_generator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "Axial FLAIR MRI of the brain showing a large glioma in the left frontal lobe."


@pytest.fixture(scope="module")
def run(tiny_base):
    return tiny_base


def _sample(run, out, *extra):
    sample.main(["--run", str(run), "--prompt", PROMPT, "--n", "3", "--sample-steps", "3", "--out", str(out),
                 *extra])
    return np.asarray(Image.open(out))


def test_grid_png_and_same_seed_same_images(run, tmp_path):
    a = _sample(run, tmp_path / "a.png", "--seed", "1")
    b = _sample(run, tmp_path / "b.png", "--seed", "1")
    c = _sample(run, tmp_path / "c.png", "--seed", "2")
    assert a.ndim == 2 and a.shape[1] > a.shape[0]  # one row of three grayscale images
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m"])
def test_every_sampler_and_several_prompts(run, tmp_path, sampler):
    out = tmp_path / "grid.png"
    sample.main(["--run", str(run), "--prompt", PROMPT, "--prompt", "Axial T1-weighted MRI of the brain.",
                 "--n", "2", "--sample-steps", "2", "--sampler", sampler, "--out", str(out)])
    grid = np.asarray(Image.open(out))
    assert grid.shape[0] > grid.shape[1] / 2  # two rows


def test_nifti_stack(run, tmp_path):
    _sample(run, tmp_path / "a.png", "--nifti", str(tmp_path / "a.nii.gz"))
    volume = nib.load(tmp_path / "a.nii.gz")
    assert volume.shape == (16, 16, 3) and nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    assert np.isfinite(volume.get_fdata()).all()


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "   "], "empty --prompt"),
    ([], "at least one --prompt"),
    (["--prompt", "glioma " * 80], "too long"),
    (["--prompt", "x", "--model", "aligned"], "python align.py"),
    (["--prompt", "x", "--guidance"], "expected one argument"),
    (["--prompt", "x", "--sampler", "euler"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(run, argv, message):
    r = subprocess.run([sys.executable, "sample.py", "--run", str(run), *argv], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


def test_missing_model_names_the_command(tmp_path):
    r = subprocess.run([sys.executable, "sample.py", "--run", str(tmp_path), "--prompt", "x"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "python train.py" in r.stderr


def test_truncate_allows_long_prompts(run, tmp_path):
    sample.main(["--run", str(run), "--prompt", "glioma " * 80, "--truncate", "--n", "1", "--sample-steps", "1",
                 "--out", str(tmp_path / "long.png")])
    assert os.path.exists(tmp_path / "long.png")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m"])
def test_the_sampler_asked_for_is_the_one_that_runs(run, tmp_path, sampler):
    """The NIfTI (float32) of `--sampler S` equals S run directly on the same UNet, prompt and noise."""
    sample.main(["--run", str(run), "--prompt", PROMPT, "--n", "2", "--sample-steps", "3", "--sampler", sampler,
                 "--seed", "5", "--out", str(tmp_path / "g.png"), "--nifti", str(tmp_path / "g.nii")])
    volume = np.asarray(nib.load(tmp_path / "g.nii").dataobj)  # [W, H, N], rows flipped (see save_nifti)
    got = torch.from_numpy(np.ascontiguousarray(volume[:, ::-1, :].transpose(2, 1, 0)))[:, None]
    generator = load_generator("diffusion", str(run))
    states, mask, pooled = generator.encoder.encode([PROMPT, PROMPT])
    denoise = diffusion.make_denoiser(generator.unet, states, mask, pooled, 3.0, "v", 0.95)
    g = torch.Generator().manual_seed(5)
    x = torch.randn((2, 1, 16, 16), generator=g)
    log_snrs = diffusion.sampling_log_snrs(3)
    direct = {"ddpm": lambda: diffusion.sample_ddpm(denoise, x, log_snrs, g),
              "ddim": lambda: diffusion.sample_ddim(denoise, x, log_snrs),
              "dpmpp2m": lambda: diffusion.sample_dpmpp_2m(denoise, x, log_snrs)}
    with torch.inference_mode():
        expected = direct[sampler]()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
