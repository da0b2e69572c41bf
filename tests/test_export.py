"""Portable models: a run folder moved elsewhere still samples, and an exported model folder samples from
anywhere, identically to the run it came from."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import sample
from minimedi.errors import UserError
from minimedi.export import main as export_main
from tests.helpers import copy_run

PROMPT = "Axial FLAIR MRI of the brain showing a large glioma in the left frontal lobe."


def _grid(argv, out):
    sample.main(argv + ["--prompt", PROMPT, "--n", "2", "--sample-steps", "2", "--seed", "3", "--out", str(out)])
    return np.asarray(Image.open(out))


def test_a_moved_run_folder_still_samples(tiny_base, tmp_path):
    before = _grid(["--run", str(tiny_base)], tmp_path / "before.png")
    moved = copy_run(tiny_base, tmp_path / "a" / "run")
    shutil.move(moved, tmp_path / "elsewhere")
    after = _grid(["--run", str(tmp_path / "elsewhere")], tmp_path / "after.png")
    assert np.array_equal(before, after)


def test_an_exported_model_samples_anywhere_like_its_run(tiny_base, tmp_path):
    run = copy_run(tiny_base, tmp_path / "run")
    export_main(["--run", str(run), "--model", "diffusion", "--out", str(tmp_path / "model")])
    assert sorted(os.listdir(tmp_path / "model")) == ["config.json", "model.safetensors", "text_encoder.safetensors"]
    shutil.rmtree(run)  # nothing of the run is needed any more
    shutil.move(tmp_path / "model", tmp_path / "far" / "away")
    exported = _grid(["--model", str(tmp_path / "far" / "away")], tmp_path / "exported.png")
    original = _grid(["--run", str(tiny_base)], tmp_path / "original.png")
    assert np.array_equal(exported, original)
    config = json.loads((tmp_path / "far" / "away" / "config.json").read_text())
    assert config["architecture"]["data"]["image_size"] == 16 and config["data"]["kind"] == "phantom"


def test_exporting_a_missing_model_names_the_command(tmp_path):
    with pytest.raises(UserError, match="python align.py"):
        export_main(["--run", str(tmp_path), "--model", "aligned", "--out", str(tmp_path / "m")])
    with pytest.raises(UserError, match="not diffusion, aligned or an exported model folder"):
        sample.main(["--model", str(tmp_path), "--prompt", PROMPT])
