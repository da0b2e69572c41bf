"""The differentiable sampler behind alignment tuning (`minimedi.differentiable_sampler`): its forward against the plain
DDIM sampler, its gradients against single-step ones and hand algebra, and its memory under checkpointing."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from minimedi.config import make_config
from minimedi.diffusion import alpha_sigma, make_denoiser, sample_ddim, sampling_log_snrs
from minimedi.differentiable_sampler import chain_factors, random_grad_steps, sample_ddim_teacher, sample_ddim_with_grad
from minimedi.lora import LoRALinear, inject_lora
from minimedi.unet import UNet, token_mask

TEXT_DIM, POOLED_DIM = 24, 20


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    unet = UNet(make_config("tiny").unet, TEXT_DIM, POOLED_DIM, image_channels=1, image_size=16)
    with torch.no_grad():  # wake the zero-initialised output and residual branches
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return unet


def text(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, 10, dtype=torch.long)
    ids[:, 0], ids[:, 1:5], ids[:, 5] = 49406, 400, 49407
    return torch.randn(batch, 10, TEXT_DIM, generator=g), token_mask(ids), torch.randn(batch, POOLED_DIM, generator=g)


def lora_unet_and_noise(seed=0):
    unet = tiny_unet(seed)
    params = inject_lora(unet, rank=2)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    return unet, params, torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(seed + 1))


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_forward_equals_the_plain_sampler_and_the_teacher(prediction):
    unet, _, x_T = lora_unet_and_noise()
    log_snrs = sampling_log_snrs(4)
    tokens, mask, pooled = text()
    with torch.no_grad():
        plain = sample_ddim(make_denoiser(unet, tokens, mask, pooled, 3.0, prediction, threshold=0), x_T, log_snrs)
    ours, _ = sample_ddim_with_grad(unet, x_T, log_snrs, tokens, mask, pooled, 3.0, prediction)
    assert torch.equal(ours, plain)
    assert torch.equal(sample_ddim_teacher(unet, x_T, log_snrs, tokens, mask, pooled, 3.0, prediction), plain)


def test_gradients_reach_the_adapters_and_nothing_else():
    unet, params, x_T = lora_unet_and_noise()
    out, _ = sample_ddim_with_grad(unet, x_T, sampling_log_snrs(3), *text(), guidance=2.0)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    adapter_ids = {id(p) for p in params}
    assert all(p.grad is None for p in unet.parameters() if id(p) not in adapter_ids)


def test_checkpointing_changes_no_gradient():
    unet, params, x_T = lora_unet_and_noise()
    grads = []
    for use_checkpoint in (True, False):
        for p in params:
            p.grad = None
        out, _ = sample_ddim_with_grad(unet, x_T, sampling_log_snrs(3), *text(), guidance=2.0,
                                       checkpoint=use_checkpoint)
        out.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def adapter_grad(unet, params, x_T, grad_steps):
    for p in params:
        p.grad = None
    out, _ = sample_ddim_with_grad(unet, x_T, sampling_log_snrs(4), *text(), guidance=2.0, grad_steps=grad_steps)
    out.square().mean().backward()
    return out.detach(), torch.cat([p.grad.flatten() for p in params])


def test_a_subset_of_gradient_steps_averages_the_single_step_gradients():
    """Same forward for any subset; G(S) = mean_{i in S} G({i}), so a uniform random S is unbiased for G(all)."""
    unet, params, x_T = lora_unet_and_noise()
    single = [adapter_grad(unet, params, x_T, {i}) for i in range(4)]
    out_all, g_all = adapter_grad(unet, params, x_T, None)
    out_sub, g_sub = adapter_grad(unet, params, x_T, {0, 2})
    assert all(torch.equal(out, out_all) for out, _ in single) and torch.equal(out_sub, out_all)
    torch.testing.assert_close(g_sub, (single[0][1] + single[2][1]) / 2, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(g_all, sum(g for _, g in single) / 4, rtol=1e-4, atol=1e-8)
    assert not torch.allclose(single[0][1], single[3][1])  # the steps really differ


def test_random_grad_steps():
    g = torch.Generator().manual_seed(0)
    assert random_grad_steps(10, 0, g) == set(range(10)) == random_grad_steps(10, 12, g)
    draws = [random_grad_steps(10, 3, g) for _ in range(2000)]
    assert all(len(d) == 3 and d <= set(range(10)) for d in draws)
    counts = torch.bincount(torch.tensor([i for d in draws for i in d]), minlength=10).float()
    assert (counts / len(draws) - 0.3).abs().max() < 0.04  # each step is picked with probability m / K
    assert random_grad_steps(10, 3, torch.Generator().manual_seed(5)) == random_grad_steps(
        10, 3, torch.Generator().manual_seed(5))


def saved_bytes(fn):
    """Bytes of the tensors autograd keeps for backward while `fn` runs (outside checkpointed regions)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_checkpointing_keeps_no_unet_activations_and_memory_is_flat_in_steps():
    unet, _, x_T = lora_unet_and_noise()
    tokens, mask, pooled = text()

    def run(steps, use_checkpoint):
        return saved_bytes(lambda: sample_ddim_with_grad(unet, x_T, sampling_log_snrs(steps), tokens, mask, pooled,
                                                         guidance=2.0, checkpoint=use_checkpoint))

    plain, checkpointed = run(4, False), run(4, True)
    assert checkpointed < plain / 20  # every step's UNet activations are gone
    per_step = (run(8, True) - checkpointed) / 4
    assert per_step <= 4 * x_T.numel() * x_T.element_size()  # what stays per step is a few image-sized tensors


class PerStepToy(nn.Module):
    """pred = theta_i + 0.5 x at the i-th log-SNR: linear, so d x_final / d theta_i = A_i * (number of pixels)."""

    def __init__(self, log_snrs):
        super().__init__()
        self.log_snrs = log_snrs[:-1]
        self.theta = nn.Parameter(torch.zeros(len(self.log_snrs)))

    def forward(self, x, log_snr, tokens, mask, pooled, drop_text):
        i = int(torch.nonzero(self.log_snrs == log_snr[0])[0, 0])
        return self.theta[i] + 0.5 * x


def hand_factors(log_snrs, prediction):
    """A_i from the textbook forms of DDIM (eta = 0), independent of the library's coefficients:
    v: x_s = cos(phi_t - phi_s) x_t - sin(phi_t - phi_s) v, with (alpha, sigma) = (cos phi, sin phi);
    eps: x_s = (alpha_s / alpha_t) x_t + (sigma_s - alpha_s sigma_t / alpha_t) eps."""
    alpha, sigma = (t.tolist() for t in alpha_sigma(log_snrs.double()))
    steps = []
    for i in range(len(alpha) - 1):
        if prediction == "v":
            phi_t, phi_s = math.atan2(sigma[i], alpha[i]), math.atan2(sigma[i + 1], alpha[i + 1])
            steps.append((math.cos(phi_t - phi_s), -math.sin(phi_t - phi_s)))
        else:
            steps.append((alpha[i + 1] / alpha[i], sigma[i + 1] - alpha[i + 1] * sigma[i] / alpha[i]))
    return [b * math.prod(d for d, _ in steps[i + 1:]) for i, (_, b) in enumerate(steps)]


@pytest.mark.parametrize("prediction,schedule", [("v", "cosine"), ("eps", "cosine"), ("v", "linear")])
def test_rescaling_on_a_linear_toy_where_the_factors_are_known(prediction, schedule):
    log_snrs = sampling_log_snrs(5, schedule)
    factors = hand_factors(log_snrs, prediction)
    torch.testing.assert_close(chain_factors(log_snrs, prediction), torch.tensor(factors, dtype=torch.float64))
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    pixels = x_T.numel()
    for rescale, expected in ((False, factors), (True, [math.copysign(1 / 5, a) for a in factors])):
        toy = PerStepToy(log_snrs)
        out, _ = sample_ddim_with_grad(toy, x_T, log_snrs, *text(), guidance=3.0, prediction=prediction,
                                       rescale=rescale)
        out.sum().backward()
        torch.testing.assert_close(toy.theta.grad.double() / pixels, torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-4, atol=1e-6)


class BranchToy(nn.Module):
    """pred = theta_cond for captioned rows, theta_uncond for null-caption rows (plus 0.5 x): each branch's
    share of the guided prediction w cond + (1 - w) uncond is its parameter's gradient."""

    def __init__(self):
        super().__init__()
        self.theta_cond, self.theta_uncond = nn.Parameter(torch.zeros(())), nn.Parameter(torch.zeros(()))

    def forward(self, x, log_snr, tokens, mask, pooled, drop_text):
        theta = torch.where(drop_text, self.theta_uncond, self.theta_cond)
        return theta.view(-1, 1, 1, 1) + 0.5 * x


def test_detach_uncond_stops_the_gradient_at_the_null_caption_branch_only():
    log_snrs, x_T, w = sampling_log_snrs(4), torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)), 3.0
    outs, grads = [], []
    for detach in (False, True):
        toy = BranchToy()
        out, _ = sample_ddim_with_grad(toy, x_T, log_snrs, *text(), guidance=w, detach_uncond=detach)
        out.sum().backward()
        outs.append(out.detach())
        grads.append((toy.theta_cond.grad, toy.theta_uncond.grad))
    assert torch.equal(outs[0], outs[1])  # the forward is the same guided sampler
    (cond, uncond), (cond_detached, uncond_detached) = grads
    torch.testing.assert_close(uncond / cond, torch.tensor((1 - w) / w))  # -2/3 at w = 3: the leak
    torch.testing.assert_close(cond_detached, cond)
    assert uncond_detached is None or uncond_detached == 0


def test_null_drift_measures_the_null_branch_alone_against_the_anchor():
    """BranchToy's null-caption prediction differs from a zero anchor's by theta_uncond everywhere, so the drift
    is theta_uncond^2 at every step that carries gradient, and its gradient reaches theta_uncond only."""
    log_snrs, x_T = sampling_log_snrs(4), torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    anchor, toy = BranchToy().requires_grad_(False), BranchToy()
    with torch.no_grad():
        toy.theta_cond.fill_(0.7)
        toy.theta_uncond.fill_(0.3)
    for detach in (False, True):
        toy.zero_grad(set_to_none=True)
        out, drift = sample_ddim_with_grad(toy, x_T, log_snrs, *text(), guidance=3.0, grad_steps={1, 3},
                                           detach_uncond=detach, null_anchor=anchor)
        torch.testing.assert_close(drift, torch.tensor(0.09))
        drift.backward()
        torch.testing.assert_close(toy.theta_uncond.grad, torch.tensor(0.6))  # d/dtheta theta^2
        assert toy.theta_cond.grad is None or toy.theta_cond.grad == 0
    _, none = sample_ddim_with_grad(toy, x_T, log_snrs, *text(), guidance=3.0)
    assert none.item() == 0 and not none.requires_grad


def test_null_drift_is_zero_until_the_adapters_move_and_then_reaches_them():
    unet, params, x_T = lora_unet_and_noise()
    for adapter in (m for m in unet.modules() if isinstance(m, LoRALinear)):
        adapter.lora_B.data.zero_()  # the adapters' state at injection: the UNet computes the anchor's function
    anchor = copy.deepcopy(unet).requires_grad_(False)
    _, drift = sample_ddim_with_grad(unet, x_T, sampling_log_snrs(3), *text(), guidance=2.0, null_anchor=anchor)
    assert drift.item() < 1e-10  # rounding alone: the anchor runs the null rows in a batch of their own
    for p in params:
        p.data.normal_(0, 0.05)
    _, drift = sample_ddim_with_grad(unet, x_T, sampling_log_snrs(3), *text(), guidance=2.0, null_anchor=anchor)
    drift.backward()
    assert drift.item() > 0 and all(p.grad is not None for p in params)
