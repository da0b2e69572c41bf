"""The cascade's super-resolution stage: resampling, paired data, the SR UNet, its loss, and sampling."""
import dataclasses
import functools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minimedi import kernels

from minimedi import diffusion as D
from minimedi.cascade import crop_at, draw_sr_batch, sr_condition, sr_training_losses, super_resolve
from minimedi.classifier import subgroup_labels, train_classifier
from minimedi.config import ClassifierConfig, make_config
from minimedi.data.images import DataWarning
from minimedi.data.pairs import load_sr_pairs
from minimedi.data.load import load_target_corpus
from minimedi.data.phantom import PhantomCorpus, target_corpus
from minimedi.data.roco import ROCO
from minimedi.errors import UserError
from minimedi.metrics import fid
from minimedi.resize import bicubic_baseline, downsample, downsampled_pairs, upsample
from minimedi.sr_eval import features_and_p_female
from minimedi.sr_unet import SRUNet, check_sr_config
from minimedi.unet import UNet, token_mask
from tests.test_brats import make_tree as make_brats_tree
from tests.test_roco import make_roco

TEXT_DIM, POOLED_DIM = 24, 20
LOW, HIGH = 16, 32  # the tiny preset: a 16 px base, a 32 px SR stage


def tiny_sr(seed=0, wake=True, **overrides):
    """The tiny preset's SR UNet; `wake` gives the zero-initialised layers values, so every path is live."""
    torch.manual_seed(seed)
    unet = SRUNet(dataclasses.replace(make_config("tiny").sr, **overrides), TEXT_DIM, POOLED_DIM)
    if wake:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in unet.parameters():
                if not p.any():
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return unet


def text(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, 12, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:5], tokens[:, 5] = 49406, 400, 49407
    return {"text_tokens": torch.randn(batch, 12, TEXT_DIM, generator=g), "text_mask": token_mask(tokens),
            "text_pooled": torch.randn(batch, POOLED_DIM, generator=g)}


def sr_inputs(batch=2, size=HIGH, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 1, size, size, generator=g), "log_snr": torch.randn(batch, generator=g) * 5,
            "low_res": torch.randn(batch, 1, size, size, generator=g), "aug_log_snr": torch.randn(batch, generator=g),
            **text(batch, seed)}


class Recorder(torch.nn.Module):
    """Wraps a UNet and keeps the keyword conditioning of every call."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, []

    def forward(self, *args, **kwargs):
        self.calls.append({k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v)})
        return self.unet(*args, **kwargs)


# ---- resampling ------------------------------------------------------------------------------------------

def test_downsample_is_the_block_mean():
    x = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    expected = x.numpy().reshape(2, 1, 3, 4, 3, 4).mean(axis=(3, 5))
    np.testing.assert_allclose(downsample(x, 3).numpy(), expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        downsample(x, 5)


def test_upsample_keeps_constants_and_the_baseline_is_in_range():
    flat = torch.full((1, 1, 8, 8), 0.3)
    torch.testing.assert_close(upsample(flat, 32), torch.full((1, 1, 32, 32), 0.3))
    edge = torch.where(torch.arange(8) < 4, -1.0, 1.0).expand(1, 1, 8, 8)
    assert upsample(edge, 32).abs().max() > 1  # cubic convolution overshoots at an edge ...
    assert bicubic_baseline(edge, 32).abs().max() <= 1  # ... which the baseline image clamps


def test_downsampled_pairs():
    high = torch.rand(3, 1, 32, 32).half()
    low, same = downsampled_pairs(high, 8)
    assert same is high and low.dtype == torch.float16 and low.shape == (3, 1, 8, 8)
    torch.testing.assert_close(low.float(), downsample(high.float(), 8), atol=1e-3, rtol=0)


# ---- paired phantom renders --------------------------------------------------------------------------------

def test_phantom_pairs_are_renders_of_the_same_slices_at_both_sizes():
    cfg = make_config("tiny").data
    low, high, captions = load_sr_pairs(cfg, 64, 12)
    corpus = PhantomCorpus(cfg.n_pretrain, cfg.image_size, cfg.pretrain_female, cfg.seed, "pretrain",
                           p_tumor=cfg.pretrain_tumor)
    assert low.shape == (12, 1, 16, 16) and high.shape == (12, 1, 64, 64)
    # The low half is exactly what the base model learns from; the high half a render at 64 px, not an upsampling.
    assert torch.equal(low, corpus.images(range(12)).half())
    assert torch.equal(high, PhantomCorpus(cfg.n_pretrain, 64, cfg.pretrain_female, cfg.seed, "pretrain",
                                           p_tumor=cfg.pretrain_tumor).images(range(12)).half())
    assert captions == [corpus.caption(i) for i in range(12)]
    # Same anatomy: the box-filtered render is close to the low one (both carry their own MR noise) ...
    def rms(a, b):
        return (a.float() - b.float()).square().mean().sqrt().item()

    consistent = rms(downsample(high.float(), 16), low)
    assert consistent < 0.09
    # ... and much closer than to another slice, or than bicubic is to the high-resolution render.
    assert consistent < 0.5 * rms(downsample(high.float(), 16), low.roll(1, 0))
    assert rms(bicubic_baseline(low.float(), 64), high) > 2 * consistent


def test_target_pairs_are_renders_of_the_target_corpus_at_both_sizes():
    cfg = make_config("tiny").data
    low, high, captions = load_sr_pairs(cfg, 64, 12, source="target")
    corpus = target_corpus(cfg)
    assert torch.equal(low, corpus.images(range(12)).half()) and high.shape == (12, 1, 64, 64)
    assert torch.equal(high, target_corpus(dataclasses.replace(cfg, image_size=64)).images(range(12)).half())
    assert captions == [corpus.caption(i) for i in range(12)]
    assert not torch.equal(low, load_sr_pairs(cfg, 64, 12)[0])  # not the pretraining slices


def test_brats_target_pairs_are_the_slices_at_the_final_size_and_their_box_filter(tmp_path):
    root, labels = make_brats_tree(tmp_path)
    cfg = dataclasses.replace(make_config("tiny").data, target=f"brats:{root}", labels=str(labels), image_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        low, high, captions = load_sr_pairs(cfg, 32, 5, source="target")
        corpus = load_target_corpus(dataclasses.replace(cfg, image_size=32))
    assert high.shape == (5, 1, 32, 32) and low.shape == (5, 1, 8, 8) and captions == corpus.captions[:5]
    assert torch.equal(high, corpus.images[:5].half())
    torch.testing.assert_close(low.float(), downsample(corpus.images[:5].float(), 8), atol=1e-3, rtol=0)


def test_real_pairs_are_the_real_images_and_their_box_filter(tmp_path):
    root, _ = make_roco(tmp_path)
    cfg = dataclasses.replace(make_config("tiny").data, pretrain=f"roco:{root}", image_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        low, high, captions = load_sr_pairs(cfg, 16, 3)
        dataset = ROCO(root, "train", 16)
    assert high.shape == (3, 1, 16, 16) and low.shape == (3, 1, 8, 8)
    assert torch.equal(high, torch.stack([dataset[i]["image"] for i in range(3)]).half())
    assert captions == [dataset[i]["caption"] for i in range(3)]
    torch.testing.assert_close(low.float(), downsample(high.float(), 8), atol=1e-3, rtol=0)
    with pytest.raises(UserError, match="--data"):
        load_sr_pairs(dataclasses.replace(cfg, pretrain="roco"), 16, 3)


# ---- the SR UNet -------------------------------------------------------------------------------------------

def test_shapes_at_crop_and_full_size_and_zero_output_at_init():
    unet = tiny_sr(wake=False).eval()
    with torch.no_grad():
        for size in (16, 32, 48):
            out = unet(**sr_inputs(size=size))
            assert out.shape == (2, 1, size, size) and torch.equal(out, torch.zeros_like(out))


def test_every_conditioning_input_changes_the_output():
    unet = tiny_sr().eval()
    a, b = sr_inputs(seed=0), sr_inputs(seed=1)
    with torch.no_grad():
        base = unet(**a)
        for key in ("low_res", "aug_log_snr", "text_pooled", "text_tokens", "log_snr"):
            assert (unet(**{**a, key: b[key]}) - base).abs().max() > 1e-3, key
        dropped = torch.ones(2, dtype=torch.bool)
        torch.testing.assert_close(unet(**a, drop_text=dropped),
                                   unet(**{**a, "text_pooled": b["text_pooled"], "text_tokens": b["text_tokens"]},
                                        drop_text=dropped), rtol=0, atol=1e-6)


def test_no_augmentation_embeds_as_the_smallest_level():
    unet = tiny_sr().eval()
    x = sr_inputs()
    with torch.no_grad():
        torch.testing.assert_close(unet(**{**x, "aug_log_snr": torch.full((2,), torch.inf)}),
                                   unet(**{**x, "aug_log_snr": torch.full((2,), D.LOG_SNR_MAX)}), rtol=0, atol=0)


def test_gradients_reach_every_parameter():
    unet = tiny_sr()
    out = unet(**sr_inputs(), drop_text=torch.tensor([False, True]))
    out.square().mean().backward()
    assert not [n for n, p in unet.named_parameters() if p.grad is None or not p.grad.any()]


def test_only_cross_attention_and_only_at_low_resolution():
    unet = tiny_sr(num_res_blocks=(1, 1), attn_resolutions=(8,))
    attending = {name.split(".cross_attn")[0] for name, _ in unet.named_parameters() if ".cross_attn." in name}
    assert not any(".self_attn." in name for name, _ in unet.named_parameters())
    assert attending == {"down.1.0", "mid.0", "up.0.0"}  # the 8 px level (of a 32 px output) and the middle


def test_convolutional_away_from_the_borders(monkeypatch):
    """With GroupNorm's statistics frozen (a per-channel affine) the network is a convolution: a crop's output
    is the crop of the full image's output wherever the crop's zero padding is out of reach (the tiny network
    sees 52 px around a pixel; crop corners on multiples of 2^levels keep the stride phase). Training on crops
    therefore teaches the full-image function, up to GroupNorm's field-of-view statistics."""
    def affine_film_silu(x, weight, bias, groups, scale=None, shift=None, eps=1e-5):
        h = x * weight[:, None, None] + bias[:, None, None]
        return F.silu(h if scale is None else h * (1 + scale[..., None, None]) + shift[..., None, None])

    monkeypatch.setattr(kernels, "group_norm_silu", affine_film_silu)
    monkeypatch.setattr(torch.nn.GroupNorm, "forward", lambda m, x: x * m.weight[:, None, None] + m.bias[:, None, None])
    unet = tiny_sr().eval()
    x = sr_inputs(batch=1, size=256)
    with torch.no_grad():
        full = unet(**x)
        crop = unet(**{**x, "x": x["x"][..., 64:192, 64:192], "low_res": x["low_res"][..., 64:192, 64:192]})
    torch.testing.assert_close(crop[..., 56:72, 56:72], full[..., 120:136, 120:136], rtol=1e-4, atol=1e-5)
    assert (crop[..., :8, :8] - full[..., 64:72, 64:72]).abs().max() > 1e-3  # the padding does reach the edge


@pytest.mark.parametrize("overrides, flag", [({"size": 40}, "--sr-size"), ({"size": 16}, "--sr-size"),
                                             ({"crop": 10}, "--sr-crop"), ({"crop": 64}, "--sr-crop"),
                                             ({"num_res_blocks": (1,)}, "--sr-res-blocks"),
                                             ({"attn_resolutions": (4,)}, "--sr-attn-resolutions"),
                                             ({"groups": 3}, "--sr-groups"), ({"head_dim": 12}, "--sr-head-dim")])
def test_sizes_that_do_not_divide_are_refused_in_one_line(overrides, flag):
    cfg = dataclasses.replace(make_config("tiny").sr, **overrides)
    with pytest.raises(UserError, match=flag) as e:
        check_sr_config(cfg, LOW)
    assert "\n" not in str(e.value)


def test_presets_are_valid():
    for preset in ("tiny", "default", "paper"):
        cfg = make_config(preset)
        check_sr_config(cfg.sr, cfg.data.image_size)
        assert cfg.sr.crop < cfg.sr.size and (preset == "tiny" or cfg.sr.size == 4 * cfg.data.image_size)


# ---- noise conditioning augmentation and the loss -----------------------------------------------------------

def test_zero_augmentation_conditions_on_exactly_the_upsampled_image():
    low, noise = torch.rand(3, 1, LOW, LOW) * 2 - 1, torch.randn(3, 1, LOW, LOW)
    condition, aug_log_snr = sr_condition(low, HIGH, 0.0, noise)
    assert torch.equal(condition, upsample(low, HIGH)) and torch.isinf(aug_log_snr).all()
    noisy, _ = sr_condition(low, HIGH, 0.3, noise)
    assert (noisy - condition).abs().max() > 0.1

    # ... and it is what the UNet sees, in training (whole images) and when sampling.
    unet = Recorder(tiny_sr())
    high = torch.rand(3, 1, HIGH, HIGH) * 2 - 1
    draws = draw_sr_batch(3, 1, LOW, HIGH, 0, 0.0, 0.0, torch.Generator().manual_seed(0))
    sr_training_losses(unet, high, low, **text(3), draws=draws)
    assert torch.equal(unet.calls[-1]["low_res"], upsample(low, HIGH))
    with torch.no_grad():
        super_resolve(unet, low, *text(3).values(), size=HIGH, aug_level=0.0, steps=2)
    assert torch.equal(unet.calls[-1]["low_res"], upsample(low, HIGH))


def test_training_crops_the_target_and_the_condition_alike():
    g = torch.Generator().manual_seed(0)
    draws = draw_sr_batch(4, 1, LOW, HIGH, 16, 0.5, 0.1, g)
    assert draws["noise"].shape == (4, 1, 16, 16) and draws["offsets"].min() >= 0 and draws["offsets"].max() <= 16
    assert 0 <= draws["aug_level"].min() and draws["aug_level"].max() <= 0.5
    high = torch.rand(4, 1, HIGH, HIGH)
    low = downsample(high, LOW)
    unet = Recorder(tiny_sr())
    out = sr_training_losses(unet, high, low, **text(4), draws=draws)
    assert out["loss"].shape == (4,)
    condition, _ = sr_condition(low, HIGH, draws["aug_level"], draws["aug_noise"])
    torch.testing.assert_close(unet.calls[0]["low_res"], crop_at(condition, draws["offsets"], 16))
    r, c = draws["offsets"][1].tolist()
    torch.testing.assert_close(crop_at(high, draws["offsets"], 16)[1], high[1, :, r:r + 16, c:c + 16])


@functools.lru_cache(maxsize=1)
def train_tiny_sr(steps=500, seed=0):
    """The tiny preset's SR stage trained on 256 phantom pairs (16 -> 32 px) with the library's loss, once
    per session (the slow tests share it)."""
    torch.manual_seed(seed)
    cfg = make_config("tiny")
    low, high, _ = load_sr_pairs(cfg.data, cfg.sr.size, 256)
    unet = SRUNet(cfg.sr, TEXT_DIM, POOLED_DIM)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.sr.lr)
    g = torch.Generator().manual_seed(seed)
    caption = text(cfg.sr.batch * 2)
    for _ in range(steps):
        ids = torch.randint(len(low), (2 * cfg.sr.batch,), generator=g)
        draws = draw_sr_batch(len(ids), 1, LOW, HIGH, cfg.sr.crop, cfg.sr.aug_max, cfg.sr.cond_drop, g)
        loss = sr_training_losses(unet, high[ids], low[ids], **caption, draws=draws,
                                  min_snr_gamma=cfg.sr.min_snr_gamma)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet.eval()


@pytest.mark.slow
def test_trained_sr_outputs_downsample_to_their_inputs():
    unet = train_tiny_sr()
    corpus = PhantomCorpus(16, LOW, 0.5, seed=99, kind="pretrain")  # held-out slices
    low = corpus.images()
    with torch.no_grad():
        out = super_resolve(unet, low, *text(16).values(), size=HIGH, aug_level=0.0, steps=8,
                            generator=torch.Generator().manual_seed(0), keep_low=False)
        untrained = super_resolve(tiny_sr(wake=False).eval(), low, *text(16).values(), size=HIGH, aug_level=0.0,
                                  steps=8, generator=torch.Generator().manual_seed(0), keep_low=False)

    def consistency(x):
        return (downsample(x, LOW) - low).square().mean().sqrt().item()

    # Left free to redraw the input (keep_low=False), an untrained network draws noise (its outputs are as far
    # from the inputs as random images are); the trained one keeps much of the low-resolution image.
    noise = torch.rand(16, 1, HIGH, HIGH, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert consistency(untrained) > 0.8 * consistency(noise)
    assert consistency(out) < 0.5 * consistency(noise)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp2m"])
def test_keeping_the_base_image_makes_every_output_box_filter_to_its_input(sampler):
    """Even a network that draws noise (untrained, awake) gives images whose box filter is the base image, at
    the noise augmentation level that tells it to ignore its input; free to redraw, the same network strays."""
    low = PhantomCorpus(4, LOW, 0.5, seed=3).images()
    unet = tiny_sr().eval()

    def run(keep_low):
        with torch.no_grad():
            return super_resolve(unet, low, *text(4).values(), size=HIGH, aug_level=0.5, steps=4, sampler=sampler,
                                 generator=torch.Generator().manual_seed(0), keep_low=keep_low)

    kept, free = run(True), run(False)
    assert kept.abs().max() <= 1
    assert (downsample(kept, LOW) - low).square().mean().sqrt() < 0.05
    assert (downsample(free, LOW) - low).square().mean().sqrt() > 0.2


@pytest.mark.slow
def test_trained_sr_beats_bicubic_on_fid_at_the_final_size():
    """FID against held-out real 32 px renders, in the features of a sex classifier trained on 32 px target
    renders (as `minimedi.sr_eval` measures it): the SR stage's outputs are closer to real high-resolution
    images than bicubic upsampling of the same inputs, and the real images closer still."""
    unet = train_tiny_sr()
    target = PhantomCorpus(400, HIGH, 0.5, seed=7, kind="target")
    labels = subgroup_labels([target.attributes(i) for i in range(400)], "sex")
    classifier, _ = train_classifier(target.images(), labels, ClassifierConfig(subgroup="sex", width=8, steps=60,
                                                                               batch=32))
    held = PhantomCorpus(96, LOW, 0.5, seed=99, kind="pretrain")
    low, high = held.images(range(48)), held.images(range(48), size=HIGH)
    reference = features_and_p_female(classifier, held.images(range(48, 96), size=HIGH))[0]
    with torch.no_grad():
        out = super_resolve(unet, low, *text(48).values(), size=HIGH, aug_level=0.0, steps=20,
                            generator=torch.Generator().manual_seed(0), keep_low=False)

    def fid_of(images):
        return fid(features_and_p_female(classifier, images)[0], reference)

    assert fid_of(high) < fid_of(out) < fid_of(bicubic_baseline(low, HIGH))


# ---- sampling through the cascade ---------------------------------------------------------------------------

def test_cascade_is_deterministic_for_a_seed():
    torch.manual_seed(0)
    base = UNet(make_config("tiny").unet, TEXT_DIM, POOLED_DIM, image_size=LOW).eval()
    sr = tiny_sr().eval()
    caption = text(2)

    def cascade(seed):
        g = torch.Generator().manual_seed(seed)
        with torch.inference_mode():
            denoise = D.make_denoiser(base, *caption.values(), guidance=3.0)
            low = D.sample(denoise, (2, 1, LOW, LOW), 3, generator=g)
            return super_resolve(sr, low, *caption.values(), size=HIGH, aug_level=0.2, steps=3, guidance=2.0,
                                 generator=g, batch_size=1)

    a, b, c = cascade(7), cascade(7), cascade(8)
    assert a.shape == (2, 1, HIGH, HIGH) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() <= 1


def test_sr_guidance_mixes_one_batched_call_with_the_same_condition():
    unet = Recorder(tiny_sr().eval())
    x, log_snr = torch.randn(2, 1, HIGH, HIGH), torch.tensor(0.5)
    extra = {"low_res": torch.randn(2, 1, HIGH, HIGH), "aug_log_snr": torch.tensor([1.0, 2.0])}
    caption = text(2)
    with torch.no_grad():
        x0 = {}
        for name, drop in (("cond", False), ("uncond", True)):
            pred = unet.unet(x, log_snr.expand(2), **caption, drop_text=torch.full((2,), drop), **extra)
            x0[name] = D.x0_eps_from_pred(pred, x, log_snr.expand(2), "v")[0]
        guided = D.make_denoiser(unet, *caption.values(), guidance=3.0, threshold=None, **extra)(x, log_snr)
        assert len(unet.calls) == 1 and torch.equal(unet.calls[0]["low_res"], torch.cat([extra["low_res"]] * 2))
        plain = D.make_denoiser(unet, *caption.values(), guidance=1.0, threshold=None, **extra)(x, log_snr)
        assert unet.calls[1]["low_res"].shape[0] == 2  # guidance 1: the conditional half alone
    torch.testing.assert_close(guided, x0["uncond"] + 3.0 * (x0["cond"] - x0["uncond"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, x0["cond"], atol=1e-5, rtol=1e-5)
