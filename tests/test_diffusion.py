"""Diffusion maths against closed forms, samplers against exact denoisers of toy data, and one tiny UNet."""
import math

import numpy as np
import pytest
import torch

from minimedi import diffusion as D
from minimedi.config import make_config
from minimedi.unet import UNet, token_mask

MU, S = 0.5, 0.3      # Gaussian toy data N(MU, S^2)
P_POS = 0.3           # two-point toy data: +1 with probability P_POS, else -1


def gaussian_denoiser(x, log_snr):
    """E[x0 | x_t] for x0 ~ N(MU, S^2): MU + alpha S^2 / (alpha^2 S^2 + sigma^2) (x_t - alpha MU)."""
    alpha, sigma = D.alpha_sigma(log_snr)
    return MU + alpha * S ** 2 / (alpha ** 2 * S ** 2 + sigma ** 2) * (x - alpha * MU)


def two_point_denoiser(x, log_snr):
    """E[x0 | x_t] for x0 in {-1, +1}: tanh(logit(P_POS) / 2 + alpha x_t / sigma^2)."""
    alpha, sigma = D.alpha_sigma(log_snr)
    return torch.tanh(0.5 * math.log(P_POS / (1 - P_POS)) + alpha * x / sigma ** 2)


def run(sampler, denoise, steps, n=20000, seed=0, **kwargs):
    shape = n if isinstance(n, tuple) else (n,)
    return D.sample(denoise, shape, steps, sampler, generator=torch.Generator().manual_seed(seed), **kwargs)


# ---- schedules and parameterisations -------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_identities(schedule):
    t = torch.linspace(0, 1, 1001)
    log_snr = D.log_snr_schedule(schedule)(t)
    alpha, sigma = D.alpha_sigma(log_snr)
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones_like(t))
    assert (log_snr[1:] < log_snr[:-1]).all()  # strictly less signal as t grows
    assert log_snr.min() >= D.LOG_SNR_MIN and log_snr.max() <= D.LOG_SNR_MAX


def test_schedule_endpoints_and_closed_forms():
    cosine = D.cosine_log_snr(torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(cosine, torch.tensor([20.0, 0.0, -20.0]), atol=1e-3, rtol=0)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    torch.testing.assert_close(D.cosine_log_snr(t), -2 * torch.log(torch.tan(math.pi * t / 2)), atol=2e-3, rtol=0)
    linear = D.linear_log_snr(torch.tensor([0.0, 1.0], dtype=torch.float64))
    expected = [-math.log(math.expm1(1e-4)), -math.log(math.expm1(1e-4 + 10))]
    torch.testing.assert_close(linear, torch.tensor(expected, dtype=torch.float64))


def test_q_sample_and_conversions_invert():
    g = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    log_snr = torch.tensor([-8.0, -2.0, 0.0, 1.5, 6.0, 12.0], dtype=torch.float64)
    x_t = D.q_sample(x0, log_snr, noise)
    alpha, sigma = D.alpha_sigma(log_snr)
    torch.testing.assert_close(x_t, alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * noise)
    for prediction, pred in (("eps", noise), ("v", D.v_target(x0, noise, log_snr))):
        x0_hat, eps_hat = D.x0_eps_from_pred(pred, x_t, log_snr, prediction)
        torch.testing.assert_close(x0_hat, x0)
        torch.testing.assert_close(eps_hat, noise)


def test_min_snr_weights():
    snr = torch.tensor([1.0, 5.0, 10.0])
    log_snr = snr.log()
    torch.testing.assert_close(D.min_snr_weight(log_snr, 5.0, "eps"), torch.tensor([1.0, 1.0, 0.5]))
    torch.testing.assert_close(D.min_snr_weight(log_snr, 5.0, "v"), torch.tensor([0.5, 5 / 6, 5 / 11]))
    torch.testing.assert_close(D.min_snr_weight(log_snr, 0.0, "v"), torch.ones(3))


def test_weighted_losses_agree_across_parameterisations():
    """Both weightings equal min(SNR, gamma) ||x0_hat - x0||^2 for the same (wrong) x0_hat."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64)
    noise, x0_wrong = torch.randn_like(x0), x0 + 0.1 * torch.randn_like(x0)
    t = torch.linspace(0.05, 0.95, 8, dtype=torch.float64)

    def model_fn(prediction):
        def predict(x_t, log_snr):  # the eps or v that corresponds to x0_wrong at this x_t
            alpha, sigma = (c[:, None, None, None] for c in D.alpha_sigma(log_snr))
            eps = (x_t - alpha * x0_wrong) / sigma
            return eps if prediction == "eps" else alpha * eps - sigma * x0_wrong
        return predict

    losses = {p: D.training_losses(model_fn(p), x0, "cosine", p, 5.0, t=t, noise=noise) for p in ("eps", "v")}
    snr = losses["v"]["log_snr"].exp()
    expected = snr.clamp(max=5.0) * (x0_wrong - x0).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(losses["eps"]["loss"].double(), expected)
    torch.testing.assert_close(losses["v"]["loss"].double(), expected)


def test_low_discrepancy_t_covers_the_unit_interval():
    t = D.sample_t(8, torch.Generator().manual_seed(3))
    assert ((t >= 0) & (t < 1)).all()
    assert torch.allclose(torch.sort(t).values.diff(), torch.full((7,), 1 / 8))


# ---- samplers with exact denoisers ---------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m"])
def test_one_point_data_is_recovered(sampler):
    x_star = torch.tensor([0.7, -0.2, 0.1])
    out = run(sampler, lambda x, log_snr: x_star.expand_as(x), steps=10, n=(4, 3))
    torch.testing.assert_close(out, x_star.expand(4, 3))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m"])
def test_gaussian_data_statistics(sampler):
    x = run(sampler, gaussian_denoiser, steps=100)
    assert abs(x.mean() - MU) < 0.01 and abs(x.std() - S) < 0.015


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m"])
def test_two_point_data_statistics(sampler):
    x = run(sampler, two_point_denoiser, steps=100)
    torch.testing.assert_close(x.abs(), torch.ones_like(x), atol=1e-4, rtol=0)
    assert abs((x > 0).float().mean() - P_POS) < 0.015


def gaussian_flow(x, log_snr_from, log_snr_to):
    """The exact probability-flow map for Gaussian data: the standardised coordinate is conserved."""
    def mean_std(log_snr):
        alpha, sigma = D.alpha_sigma(log_snr)
        return alpha * MU, (alpha ** 2 * S ** 2 + sigma ** 2).sqrt()
    (m0, s0), (m1, s1) = mean_std(log_snr_from), mean_std(log_snr_to)
    return m1 + s1 * (x - m0) / s0


def test_deterministic_solvers_converge_at_their_order():
    """Against the exact ODE solution: DDIM's error halves with twice the steps, DPM-Solver++(2M)'s quarters."""
    x_T = torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = {}
    for steps in (40, 80):
        log_snrs = torch.linspace(-10, 8, steps + 1, dtype=torch.float64)
        exact = gaussian_flow(x_T, log_snrs[0], log_snrs[-1])
        for name, solver in (("ddim", D.sample_ddim), ("dpmpp2m", D.sample_dpmpp_2m)):
            errors[name, steps] = (solver(gaussian_denoiser, x_T, log_snrs) - exact).abs().max()
    assert 1.7 < errors["ddim", 40] / errors["ddim", 80] < 2.3
    assert 3.5 < errors["dpmpp2m", 40] / errors["dpmpp2m", 80] < 4.5
    assert errors["dpmpp2m", 80] < errors["ddim", 80] / 10


def test_ddim_eta_one_is_the_ancestral_sampler():
    ddpm = run("ddpm", two_point_denoiser, steps=20, n=500)
    ddim = run("ddim", two_point_denoiser, steps=20, n=500, eta=1.0)
    torch.testing.assert_close(ddim, ddpm, atol=1e-4, rtol=1e-4)


def test_ddim_is_deterministic_and_invertible():
    """Invert data to noise and regenerate it: exact up to DDIM's first-order step error."""
    x0 = MU + S * torch.randn(1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errors = []
    for steps in (100, 200):
        log_snrs = torch.linspace(-10, 10, steps + 1, dtype=torch.float64)
        x_T = D.ddim_invert(gaussian_denoiser, x0, log_snrs)
        torch.testing.assert_close(x_T, gaussian_flow(x0, log_snrs[-1], log_snrs[0]), atol=10 / steps, rtol=0)
        again = D.sample_ddim(gaussian_denoiser, x_T, log_snrs)
        assert torch.equal(D.sample_ddim(gaussian_denoiser, x_T, log_snrs), again)
        errors.append((again - x0).abs().max())
    assert errors[1] < 0.03 and 1.7 < errors[0] / errors[1] < 2.3
    with pytest.raises(ValueError):
        D.ddim_invert(gaussian_denoiser, x0, D.sampling_log_snrs(4))


def test_ddim_coefficients_match_the_step():
    g = torch.Generator().manual_seed(0)
    x_t, x0_hat, z = (torch.randn(5, generator=g) for _ in range(3))
    lt, ls = torch.tensor(-1.0), torch.tensor(2.0)
    c_x, c_x0, c_z = D.ddim_coefficients(lt, ls, eta=0.5)
    alpha_t, sigma_t = D.alpha_sigma(lt)
    alpha_s, sigma_s = D.alpha_sigma(ls)
    v_anc = sigma_s ** 2 * (1 - math.exp(lt - ls))
    eps_hat = (x_t - alpha_t * x0_hat) / sigma_t
    expected = alpha_s * x0_hat + (sigma_s ** 2 - 0.25 * v_anc).sqrt() * eps_hat + 0.5 * v_anc.sqrt() * z
    torch.testing.assert_close(D.ddim_step(x_t, x0_hat, lt, ls, 0.5, z), expected)
    torch.testing.assert_close(c_x * x_t + c_x0 * x0_hat + c_z * z, expected)


def test_dynamic_threshold_matches_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g) * torch.tensor([0.2, 1.0, 3.0, 10.0])[:, None, None, None]
    got = D.dynamic_threshold(x, 0.95)
    for xi, gi in zip(x.numpy(), got.numpy()):
        s = max(1.0, float(np.quantile(np.abs(xi), 0.95)))
        np.testing.assert_allclose(gi, np.clip(xi, -s, s) / s, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[0], x[0])  # already inside [-1, 1]: untouched
    assert got.abs().max() <= 1


# ---- with a tiny UNet ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    unet = UNet(make_config("tiny").unet, text_dim=24, pooled_dim=20, image_size=16)
    with torch.no_grad():  # wake the zero-initialised layers so guidance has something to mix
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:4], tokens[:, 4] = 49406, 500, 49407
    text = {"text_tokens": torch.randn(2, 77, 24), "text_mask": token_mask(tokens), "text_pooled": torch.randn(2, 20)}
    return unet.eval(), text


def test_guidance_is_one_batched_mix_of_cond_and_uncond(tiny):
    unet, text = tiny
    x, log_snr = torch.randn(2, 1, 16, 16), torch.tensor(0.5)
    with torch.no_grad():
        x0 = {}
        for name, drop in (("cond", False), ("uncond", True)):
            pred = unet(x, log_snr.expand(2), **text, drop_text=torch.full((2,), drop))
            x0[name] = D.x0_eps_from_pred(pred, x, log_snr.expand(2), "v")[0]
        plain = D.make_denoiser(unet, **text, guidance=1.0, threshold=None)(x, log_snr)
        guided = D.make_denoiser(unet, **text, guidance=3.0, threshold=None)(x, log_snr)
    torch.testing.assert_close(plain, x0["cond"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided, x0["uncond"] + 3.0 * (x0["cond"] - x0["uncond"]), atol=1e-5, rtol=1e-5)


def test_same_seed_same_images(tiny):
    unet, text = tiny
    denoise = D.make_denoiser(unet, **text, guidance=3.0)
    with torch.no_grad():
        a, b, c = (D.sample(denoise, (2, 1, 16, 16), 3, "ddpm", generator=torch.Generator().manual_seed(s))
                   for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() <= 1  # dynamic thresholding keeps the final x0_hat in range


def test_training_loss_decreases_when_overfitting_one_batch():
    torch.manual_seed(0)
    unet = UNet(make_config("tiny").unet, text_dim=24, pooled_dim=20, image_size=16)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 16, 16, generator=g).clamp(-1, 1)
    text = {"text_tokens": torch.randn(4, 77, 24, generator=g), "text_mask": torch.ones(4, 77, dtype=torch.bool),
            "text_pooled": torch.randn(4, 20, generator=g)}
    t, noise = torch.rand(4, generator=g), torch.randn(4, 1, 16, 16, generator=g)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        keep_all = torch.zeros(4, dtype=torch.bool)
        loss = D.training_losses(unet, x0, t=t, noise=noise, drop_text=keep_all, **text)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


# ---- noise conditioning augmentation ---------------------------------------------------------------

def test_augmentation_levels_follow_the_schedule_and_zero_is_clean():
    levels = torch.tensor([0.0, 0.1, 0.2, 0.5, 1.0])
    log_snr = D.augmentation_log_snr(levels)
    assert torch.isinf(log_snr[0]) and log_snr[0] > 0
    torch.testing.assert_close(log_snr[1:], D.cosine_log_snr(levels[1:]))
    # lambda(s) = -2 log tan(pi s / 2) away from the squeezed ends: level 0.5 has alpha = sigma
    assert abs(log_snr[3].item()) < 1e-5
    x, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    z, lam = D.noise_augment(x, 0.0, noise)
    assert torch.equal(z, x) and torch.isinf(lam).all() and lam.shape == (4,)
    z, lam = D.noise_augment(x, torch.tensor([0.0, 0.1, 0.3, 0.5]), noise)
    alpha = torch.sigmoid(lam).sqrt()[:, None, None, None]
    torch.testing.assert_close(z, alpha * x + (1 - alpha ** 2).sqrt() * noise)
    assert torch.equal(z[0], x[0])
