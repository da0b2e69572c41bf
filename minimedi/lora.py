"""LoRA: low-rank adapters on a frozen network (Hu et al. 2021, "LoRA: Low-Rank Adaptation").

A frozen linear layer W x + b is tuned by adding a trainable low-rank update:

    h = W x + b + (alpha / r) B A x,      A: [r, in],  B: [out, r],  r << min(in, out)

A starts random and B at zero, so at injection the network computes exactly what it did before and
the first gradient step moves B (dL/dA = 0 while B = 0). Only A and B train: r (in + out) numbers
per layer instead of in * out, which is what lets alignment tuning touch a large UNet cheaply and
keeps the tuned model close to the original (Shen et al. 2024 tune LoRA rank 50 on Stable Diffusion).

In the UNet we adapt the attention projections (self-attention `qkv`, `out`; cross-attention `q`,
`kv`, `out`) and the FiLM projections (`film`) that inject the noise level and caption into every
residual block. After tuning, `merge_lora` folds (alpha / r) B A into W, leaving a plain UNet with
exactly the original architecture, so the sampler and checkpoints need to know nothing about LoRA.

Shen et al. tune the text encoder by default. `TEXT_TARGETS` are the CLIP text transformer's linear layers
(attention output `out_proj`, MLP `c_fc`, `c_proj`; its fused q/k/v is a bare weight, not an nn.Linear), so
`align.py --lora-targets ...,text` can adapt the token states every caption reaches the UNet through.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# The UNet's nn.Linear layers that get adapters, by the last component of their module name.
UNET_TARGETS = ("qkv", "q", "kv", "out", "film")
# The CLIP text transformer's, likewise; `--lora-targets` names them all together as "text".
TEXT_TARGETS = ("out_proj", "c_fc", "c_proj")


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable rank-r update (alpha / r) B A."""

    def __init__(self, base, rank, alpha=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=weight.device, dtype=weight.dtype))
        # A as nn.Linear initialises its weight (Kaiming-uniform); B = 0 makes the update start at nothing.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def merged_weight(self):
        """W + (alpha / r) B A: the weight of one linear layer computing the same function."""
        return self.base.weight + self.scale * self.lora_B @ self.lora_A


def inject_lora(model, rank, alpha=None, targets=UNET_TARGETS):
    """Freeze `model` and wrap every nn.Linear whose name ends in one of `targets` in a LoRALinear.

    Returns the list of adapter parameters (the only ones that now require grad), to hand to the optimiser.
    """
    model.requires_grad_(False)
    chosen = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not chosen:
        raise ValueError(f"no nn.Linear named {targets} in {type(model).__name__}")
    params = []
    for name, linear in chosen:
        parent, _, child = name.rpartition(".")
        adapter = LoRALinear(linear, rank, alpha)
        setattr(model.get_submodule(parent), child, adapter)
        params += [adapter.lora_A, adapter.lora_B]
    return params


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its base weight and put the plain nn.Linear back; returns `model`.

    Afterwards the state dict has the original keys again (`...qkv.weight`, not `...qkv.base.weight`).
    """
    adapters = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, adapter in adapters:
        parent, _, child = name.rpartition(".")
        base = adapter.base
        base.weight.copy_(adapter.merged_weight())
        setattr(model.get_submodule(parent), child, base)
    return model
