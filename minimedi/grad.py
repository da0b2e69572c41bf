"""`ScaleGrad`: identity on the way forward, a constant factor on the gradient on the way back.

Two places need a gradient that differs from the forward's by a known constant:
- the differentiable sampler of alignment tuning (`differentiable_sampler.sample_ddim_with_grad`) detaches every UNet
  input and scales each step's prediction gradient by its chain factor, so that one step carries the
  gradient the whole chain would have passed to it;
- the CLIP loss under DDP (`distributed.gather_with_local_grad`) scales the local slice of the gathered
  features by the number of ranks, because DDP averages gradients over ranks where one process would sum.
"""
import torch


class ScaleGrad(torch.autograd.Function):
    """ScaleGrad.apply(x, factor): x forward; grad * factor backward."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None
