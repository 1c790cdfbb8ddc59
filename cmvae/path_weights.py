"""DReG's second importance-weight factor on the samples' path gradient, as two autograd Functions (no tensor
hooks, so torch.compile captures the whole step as one graph).

DReG multiplies the gradient reaching each reparameterised sample t[m, s, b] (z or w) by its normalised weight
w~[m, s, b], which is known only after the forward has used t. Reverse mode runs later nodes first, so the
weight travels backwards as a message: `tag` returns t unchanged plus a zero token [M, S, B]; `send` takes the
weights and the tokens and returns a zero scalar that the caller adds to the loss. In the backward, `send` hands
each token the weights as its incoming "gradient" (whatever the loss scale), and `tag` multiplies t's gradient
by what its token received. Values are untouched: the token is zero and the scalar is an exact 0.
"""

from __future__ import annotations

import torch


class _Tag(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return t.clone(), t.new_zeros(t.shape[:-1])

    @staticmethod
    def backward(ctx, grad_t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return grad_t * weights[..., None].to(grad_t.dtype)


class _Send(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights: torch.Tensor, *tokens: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weights)
        ctx.n_tokens = len(tokens)
        return weights.new_zeros(())

    @staticmethod
    def backward(ctx, _grad: torch.Tensor):
        (weights,) = ctx.saved_tensors
        # The message is the weights themselves: the loss scale already rides on the samples' own gradient.
        return (None, *([weights] * ctx.n_tokens))


def tag(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t [..., D] -> (t, token [...]): use the returned t downstream and pass the token to `send`."""
    return _Tag.apply(t)


def send(weights: torch.Tensor, *tokens: torch.Tensor) -> torch.Tensor:
    """A zero scalar to add to the loss; its backward scales the gradient of each tagged sample by weights
    (detached, the tokens' shape)."""
    return _Send.apply(weights.detach(), *tokens)
