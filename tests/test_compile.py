"""`--compile`: the UNet under torch.compile (inductor; C++ codegen on the CPU) computes what the eager UNet does.

`UNet.compile()` compiles in place, so the state_dict keys, and with them the checkpoints, stay those of
the eager module. Compiling takes a minute or more on a 2-core CPU, so this is one test of the sampling
path (eval mode, inference_mode) on a tiny UNet; the whole network is one graph, without breaks.
"""
import shutil

import pytest
import torch

from tests.test_unet import inputs, perturb_zero_init, tiny_unet


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                    reason="torch.compile's CPU backend (inductor) generates C++ and needs a compiler")
def test_compiled_unet_matches_eager():
    unet = perturb_zero_init(tiny_unet()).eval()
    x = {**inputs(), "drop_text": torch.tensor([False, True])}
    keys = list(unet.state_dict())
    with torch.inference_mode():
        expected = unet(**x)
        unet.compile()
        got = unet(**x)
    assert list(unet.state_dict()) == keys
    assert not torch.equal(expected, torch.zeros_like(expected))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
