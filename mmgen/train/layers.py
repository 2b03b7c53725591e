"""Speed options applied to a built model's decoder layers, in place: activation checkpointing and compilation.

Both wrap each layer's call without wrapping the layer in another module, so parameter names and
state-dict keys stay as they are: checkpoints, resume, EMA, optimizer state and `save_pretrained`
do not see them. Checkpointing is torch.utils.checkpoint, non-reentrant (DDP- and compile-safe);
compilation is `nn.Module.compile()` (torch.compile of the layer's call). Apply checkpointing first.
"""

from __future__ import annotations

from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpoint_layers(layers: nn.ModuleList) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them (less memory,
    one more forward per layer); outputs and gradients are unchanged."""
    for layer in layers:
        run = layer.forward

        def checkpointed(*args, run=run):
            return checkpoint(run, *args, use_reentrant=False)

        layer.forward = checkpointed  # an instance attribute: nn.Module calls it, the keys do not change


def compile_layers(layers: nn.ModuleList) -> None:
    """torch.compile every layer in place; layers of one shape share the compiled code (parameters are
    graph inputs), so compiling costs about one layer's compile per input shape."""
    for layer in layers:
        layer.compile()
