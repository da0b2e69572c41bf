"""train.py end to end on the tiny preset: the CLIP task, prerequisites made on demand, DDP == one process."""
import json
import os
import subprocess
import sys

import pytest
import torch

import align
import train
from minimedi.checkpoint import load_checkpoint
from minimedi.clip import load_clip
from tests.helpers import TINY, assert_same_tensors, copy_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_clip_task_records_its_architecture_and_metrics(tiny_base):
    ckpt = load_checkpoint(tiny_base / "clip.pt")
    assert {"zero_shot_modality", "zero_shot_side", "i2t_recall@1", "t2i_recall@10"} <= set(ckpt["clip_eval"])
    assert ckpt["architecture"]["clip"]["width"] == 64 and ckpt["clip_config"]["text_heads"] == 1
    assert ckpt["data"]["kind"] == "phantom" and ckpt["data"]["captions_truncated"] == 0 and ckpt["finished"]
    records = [json.loads(line) for line in open(tiny_base / "log.jsonl")]
    assert any("loss" in r for r in records) and any("zero_shot_modality" in r for r in records)


def test_a_clip_narrower_than_one_head_loads(tmp_path):
    """--clip-width 32 with 64-wide heads: one head of 32; the loader rebuilds it from the recorded config."""
    train.main(TINY + ["--task", "clip", "--run", str(tmp_path), "--n-pretrain", "64", "--clip-steps", "1",
                       "--clip-width", "32", "--clip-vision-width", "48"])
    clip = load_clip(tmp_path / "clip.pt")
    assert (clip.config.text_width, clip.config.text_heads, clip.config.vision_heads) == (32, 1, 1)
    assert torch.equal(clip.state_dict()["ln_final.weight"],
                       load_checkpoint(tmp_path / "clip.pt")["model"]["ln_final.weight"])


def test_diffusion_makes_clip_first_when_missing(tmp_path, capsys):
    train.main(TINY + ["--run", str(tmp_path), "--n-pretrain", "64", "--clip-steps", "2", "--steps", "2"])
    assert "clip.pt not found: making it first" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "diffusion.pt")
    assert ckpt["step"] == 2 and ckpt["text"]["clip"] == "clip.pt" and os.path.exists(tmp_path / "clip.pt")


def test_sample_grids_do_not_change_what_the_diffusion_model_learns(tiny_base, tmp_path):
    """A grid drawn every 2 steps leaves the weights bitwise those of a run that draws none: the grid is
    drawn from the EMA on its own noise, and nothing it makes may stand in for the training images
    (a grid once rebound the loop's `images`, and the UNet trained on its own 16 samples from then on)."""
    runs = {}
    for every in (0, 2):
        run = copy_run(tiny_base, tmp_path / f"every{every}", ("clip.pt",))
        train.main(TINY + ["--run", str(run), "--n-pretrain", "64", "--steps", "6", "--sample-every", str(every)])
        runs[every] = load_checkpoint(run / "diffusion.pt")
    assert sorted(os.listdir(tmp_path / "every2" / "samples")) == [f"step00000{k}.png" for k in (2, 4, 6)]
    assert_same_tensors(runs[0]["model"], runs[2]["model"], "model")
    assert_same_tensors(runs[0]["ema"], runs[2]["ema"], "ema")


def test_prerequisites_are_made_with_the_runs_recorded_config(tiny_base, tmp_path, capsys):
    """align.py has no data or model flags: a missing classifier is made for the images the recorded
    diffusion model draws (8 px here, not the preset's 16)."""
    run = copy_run(tiny_base, tmp_path / "run", ("clip.pt",))
    train.main(TINY + ["--run", str(run), "--image-size", "8", "--n-pretrain", "64", "--steps", "2"])
    align.main(TINY + ["--run", str(run), "--align-steps", "1", "--no-report"])
    assert "classifier.pt not found: making it first" in capsys.readouterr().out
    assert load_checkpoint(run / "classifier.pt")["config"]["data"]["image_size"] == 8


def test_a_real_data_run_never_gets_phantom_prerequisites(tiny_base, tmp_path, capsys):
    run = copy_run(tiny_base, tmp_path / "run", ("clip.pt", "diffusion.pt"))
    ckpt = load_checkpoint(run / "diffusion.pt")
    ckpt["config"]["data"]["pretrain"] = "roco:/data/roco"  # as if it had learned from ROCO
    torch.save(ckpt, run / "diffusion.pt")
    with pytest.raises(SystemExit) as stop:
        from minimedi.errors import run_main
        run_main(align.main, TINY + ["--run", str(run)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "python train.py --task classifier --target brats:PATH --labels CSV" in err


@pytest.mark.slow
def test_torchrun_from_an_empty_folder_matches_one_process(tmp_path):
    """2 CPU processes (gloo) from an empty run folder: both ranks make clip.pt together (CLIP features
    gathered across ranks), wait for it, then train the diffusion model; both equal one process's."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    args = TINY + ["--n-pretrain", "64", "--clip-steps", "3", "--clip-batch", "16", "--steps", "3",
                   "--batch-size", "8", "--ckpt-every", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "train.py", *args, "--run", str(single)], cwd=ROOT, check=True, env=env,
                   capture_output=True, timeout=600)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "train.py", *args, "--run-dir", str(ddp)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for artifact in ("clip.pt", "diffusion.pt"):
        a, b = load_checkpoint(single / artifact), load_checkpoint(ddp / artifact)
        for name, tensor in a["model"].items():
            torch.testing.assert_close(b["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=f"{artifact} {name}")


def test_align_under_torchrun_refuses_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "align.py", *TINY, "--run-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and "align.py tunes in one process" in r.stderr
    assert not os.listdir(tmp_path)
