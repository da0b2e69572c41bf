"""Test-wide settings and the tiny run folder many tests start from.

Triton kernels are tested on CPU tensors through Triton's interpreter, which must be switched on
before `triton` is first imported; on a machine with a GPU the real kernels run instead.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402

from tests.helpers import TINY  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny run folder with clip.pt, diffusion.pt and classifier.pt, made once per test session.
    Tests copy it (`tests.helpers.copy_run`) rather than write into it."""
    import train
    run = tmp_path_factory.mktemp("tiny_base")
    args = TINY + ["--n-pretrain", "64", "--clip-steps", "2", "--steps", "2", "--run", str(run)]
    train.main(args)
    train.main(args + ["--task", "classifier"])
    return run
