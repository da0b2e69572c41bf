"""Real images re-rendered by the base model: seeded, partial chains keep more of the image the later they
start, and `--cls-rerendered` trains the classifier on them and says so in its checkpoint."""
import os

import pytest
import torch

import train
from minimedi.checkpoint import load_checkpoint
from minimedi.classifier import classifier_step
from minimedi.data.phantom import PhantomCorpus
from minimedi.errors import run_main
from minimedi.pipeline import load_generator
from minimedi.rerender import rerender
from tests.helpers import TINY, copy_run


def real_slices(n=8):
    corpus = PhantomCorpus(n, 16, 0.5, seed=3, kind="target")
    return corpus.images().float(), [corpus.caption(i) for i in range(n)]


def test_rerendering_is_seeded_and_keeps_more_of_the_image_the_later_it_starts(tiny_base):
    generator = load_generator("diffusion", tiny_base, "cpu", truncate=True)
    images, captions = real_slices()
    assert torch.equal(rerender(generator, images, captions, start=1.0), images)  # no step left: the image itself
    early, late = (rerender(generator, images, captions, start=s, seed=0) for s in (0.2, 0.8))
    assert torch.equal(early, rerender(generator, images, captions, start=0.2, seed=0))
    assert not torch.equal(early, rerender(generator, images, captions, start=0.2, seed=1))
    distance = [float((x - images).pow(2).mean().sqrt()) for x in (early, late)]
    assert distance[1] < 0.5 * distance[0], distance
    assert early.shape == images.shape and early.abs().max() <= 1


class Recorder(torch.nn.Module):
    """A classifier stand-in that keeps the batch it was shown."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x):
        self.seen = x
        return self.w.expand(len(x), 2)


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_a_share_of_each_batch_comes_from_the_rerendered_images(share):
    real, rerendered = torch.full((64, 1, 8, 8), -1.0), torch.full((64, 1, 8, 8), 1.0)
    model = Recorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    classifier_step(model, opt, schedule, real, torch.zeros(64, dtype=torch.long), torch.arange(64), 512,
                    torch.Generator().manual_seed(0), "cpu", rerendered=rerendered, share=share)
    from_rerendered = (model.seen[:, 0, 3:5, 3:5].mean((1, 2)) > 0).float().mean()  # the centre: no shift reaches it
    assert abs(float(from_rerendered) - share) < 0.07


def test_classifier_task_trains_on_rerendered_images_and_records_it(tiny_base, tmp_path):
    run = copy_run(tiny_base, tmp_path / "run", only=["clip.pt", "diffusion.pt"])
    train.main(TINY + ["--run", str(run), "--task", "classifier", "--cls-rerendered", "0.5"])
    ckpt = load_checkpoint(run / "classifier.pt")
    assert ckpt["rerendered_by"] == {"model": "diffusion.pt", "start": 0.4, "share": 0.5}
    assert ckpt["config"]["classifier"]["rerendered"] == 0.5 and 0 <= ckpt["metrics"]["accuracy"] <= 1


def test_the_classifier_task_makes_the_base_model_first_only_when_it_rerenders(tmp_path, capsys):
    quick = TINY + ["--task", "classifier", "--n-pretrain", "64", "--clip-steps", "2", "--steps", "2"]
    train.main(quick + ["--run", str(tmp_path / "plain"), "--cls-rerendered", "0"])
    assert sorted(os.listdir(tmp_path / "plain")) == ["classifier.pt", "log.jsonl"]
    train.main(quick + ["--run", str(tmp_path / "rerendered")])
    assert "diffusion.pt not found: making it first" in capsys.readouterr().out
    assert {"clip.pt", "diffusion.pt", "classifier.pt"} <= set(os.listdir(tmp_path / "rerendered"))


def test_a_base_model_of_another_size_is_one_line(tiny_base, tmp_path, capsys):
    run = copy_run(tiny_base, tmp_path / "run", only=["clip.pt", "diffusion.pt"])
    with pytest.raises(SystemExit) as stop:
        run_main(train.main, TINY + ["--run", str(run), "--task", "classifier", "--image-size", "8"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--image-size 16" in err and len(err.strip().splitlines()) == 1
    assert not (run / "classifier.pt").exists()
