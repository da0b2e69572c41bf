"""The Imagen UNet: shapes, zero-init, caption dropout and masking, gradients, memory format, kernel use."""
import pytest
import torch

from minimedi import kernels
from minimedi.config import make_config
from minimedi.errors import UserError
from minimedi.unet import UNet, ResBlock, SelfAttention, CrossAttention, token_mask

TEXT_DIM, POOLED_DIM = 24, 20


def tiny_unet(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = make_config("tiny", unet=overrides).unet
    return UNet(cfg, TEXT_DIM, POOLED_DIM, image_channels=1, image_size=16)


def perturb_zero_init(unet, seed=1):
    """Give every all-zero tensor random values, so no branch of the network is silent."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return unet


def inputs(batch=2, size=16, seed=0, lengths=(5, 9)):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, 77, dtype=torch.long)
    for i in range(batch):
        n = lengths[i % len(lengths)]
        tokens[i, 0], tokens[i, 1:n - 1], tokens[i, n - 1] = 49406, 400 + i, 49407
    return {
        "x": torch.randn(batch, 1, size, size, generator=g),
        "log_snr": torch.randn(batch, generator=g) * 5,
        "text_tokens": torch.randn(batch, 77, TEXT_DIM, generator=g),
        "text_mask": token_mask(tokens),
        "text_pooled": torch.randn(batch, POOLED_DIM, generator=g),
    }


def test_token_mask_covers_up_to_end_token():
    tokens = torch.tensor([[49406, 320, 49407, 0, 0], [49406, 49407, 0, 0, 0]])
    assert token_mask(tokens).tolist() == [[True, True, True, False, False], [True, True, False, False, False]]


def test_shapes_and_zero_output_at_init():
    unet = tiny_unet().eval()
    out = unet(**inputs(batch=3))
    assert out.shape == (3, 1, 16, 16)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output conv


def test_default_config_forward_at_32():
    torch.manual_seed(0)
    unet = perturb_zero_init(UNet(make_config("default").unet, TEXT_DIM, POOLED_DIM, 1, 32)).eval()
    with torch.no_grad():
        out = unet(**inputs(batch=2, size=32))
    assert out.shape == (2, 1, 32, 32) and torch.isfinite(out).all() and out.abs().sum() > 0


def test_dropped_caption_ignores_text_and_kept_caption_uses_it():
    unet = perturb_zero_init(tiny_unet()).eval()
    a, b = inputs(seed=0), inputs(seed=1, lengths=(7, 3))
    b["x"], b["log_snr"] = a["x"], a["log_snr"]
    drop = torch.ones(2, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(unet(**a, drop_text=drop), unet(**b, drop_text=drop), rtol=0, atol=1e-6)
        kept_a, kept_b = unet(**a), unet(**b)
        only_pooled = unet(**{**a, "text_pooled": b["text_pooled"]})
        only_tokens = unet(**{**a, "text_tokens": b["text_tokens"]})
    assert (kept_a - kept_b).abs().max() > 1e-3
    assert (kept_a - only_pooled).abs().max() > 1e-3 and (kept_a - only_tokens).abs().max() > 1e-3


def test_training_mode_drops_captions_at_cond_drop_rate():
    unet = perturb_zero_init(tiny_unet(cond_drop=1.0))
    x = inputs()
    with torch.no_grad():
        dropped = unet.train()(**x)
        torch.testing.assert_close(dropped, unet.eval()(**x, drop_text=torch.ones(2, dtype=torch.bool)))
        assert (unet.eval()(**x) - dropped).abs().max() > 1e-3  # eval never drops on its own


def test_key_mask_hides_padding():
    unet = perturb_zero_init(tiny_unet()).eval()
    x = inputs()
    changed = x["text_tokens"].clone()
    changed[~x["text_mask"]] = 100 * torch.randn(int((~x["text_mask"]).sum()), TEXT_DIM)
    with torch.no_grad():
        torch.testing.assert_close(unet(**x), unet(**{**x, "text_tokens": changed}), rtol=0, atol=1e-6)


def test_gradients_reach_every_parameter():
    unet = perturb_zero_init(tiny_unet())
    out = unet(**inputs(), drop_text=torch.tensor([False, True]))  # one captioned, one null sample
    out.square().mean().backward()
    silent = [name for name, p in unet.named_parameters() if p.grad is None or not p.grad.any()]
    assert not silent


def test_zero_init_still_trains_the_output_layer():
    unet = tiny_unet()
    unet(**inputs()).sub(1).square().mean().backward()
    assert unet.out_conv.weight.grad.abs().sum() > 0


def test_channels_last_matches_contiguous():
    unet = perturb_zero_init(tiny_unet()).eval()
    x = inputs()
    with torch.no_grad():
        expected = unet(**x)
        unet = unet.to(memory_format=torch.channels_last)
        got = unet(**{**x, "x": x["x"].to(memory_format=torch.channels_last)})
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fused_kernels_are_called(monkeypatch):
    unet = tiny_unet().eval()
    calls = {"attention": 0, "group_norm_silu": 0, "masked": 0}
    attention, group_norm_silu = kernels.attention, kernels.group_norm_silu

    def counting_attention(q, k, v, key_mask=None, causal=False):
        calls["attention"] += 1
        calls["masked"] += key_mask is not None
        return attention(q, k, v, key_mask, causal)

    def counting_group_norm_silu(*args, **kwargs):
        calls["group_norm_silu"] += 1
        return group_norm_silu(*args, **kwargs)

    monkeypatch.setattr(kernels, "attention", counting_attention)
    monkeypatch.setattr(kernels, "group_norm_silu", counting_group_norm_silu)
    with torch.no_grad():
        unet(**inputs())
    count = lambda kind: sum(isinstance(m, kind) for m in unet.modules())  # noqa: E731
    assert count(SelfAttention) == count(CrossAttention) > 0
    assert calls["attention"] == count(SelfAttention) + count(CrossAttention)
    assert calls["masked"] == count(CrossAttention)
    assert calls["group_norm_silu"] == 2 * count(ResBlock) + 1


@pytest.mark.parametrize("overrides", [{"head_dim": 12}, {"groups": 5}, {"dim_mults": (1, 2, 2, 2, 2, 2)}])
def test_bad_shapes_are_user_errors(overrides):
    with pytest.raises(UserError):
        tiny_unet(**overrides)


def test_activations_are_channels_last_and_output_is_contiguous():
    unet = perturb_zero_init(tiny_unet()).eval()
    seen = []
    unet.down[0][0].res.conv1.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        out = unet(**inputs())
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    assert out.is_contiguous()


def test_default_state_dict_layout_is_stable():
    """Trained checkpoints load only while every key and shape stays as it is: pin a few and the totals."""
    torch.manual_seed(0)
    sd = UNet(make_config("default").unet, 128, 128, 1, 32).state_dict()
    assert len(sd) == 156
    assert sum(t.numel() for t in sd.values()) == 2_279_809
    assert sd["down.2.0.self_attn.qkv.weight"].shape == (384, 128)
    assert sd["down.2.0.cross_attn.kv.weight"].shape == (256, 128)
    assert sd["up.0.0.res.conv1.weight"].shape == (128, 256, 3, 3)
    assert sd["mid.0.res.film.weight"].shape == (256, 128)
    assert sd["upsample.0.conv.weight"].shape == (64, 128, 3, 3)
