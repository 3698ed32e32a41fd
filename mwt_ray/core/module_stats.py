"""Method-blind module size metrics: weight share and weight overlap of one-class modules (as MODA reports them).

Conventions:

- The whole model is ``extract_module`` with every unit kept: the plain network, so the state a
  method adds for its units (MwT's mask generators) never counts. Only trainable parameters count
  (``module.parameters()``); BN running statistics are buffers, and the zero channels extraction
  may place are computed, not stored.
- Weight share of class c = |parameters of c's one-class module| / |parameters of the whole model|,
  averaged over classes. Overlap = |parameters two one-class modules share| / |parameters of the
  whole model| (MODA's definition: intersection over the whole model, not Jaccard), averaged over
  all class pairs. Both are also given for conv layers alone (``nn.Conv2d`` weights and biases, in
  numerator and denominator), since VGG16 keeps most of its weights in its FC layers.
- The classifier head: MODA's composition keeps only the target classes' logits, so a one-class
  module counts only its own class's output row of the head (its weight row and bias entry). The
  head is the ``nn.Linear`` module whose output the ``modular_output`` node returns; a network
  whose output is not produced directly by such a module (a conv head followed by a pool, say) has
  its head counted whole, like any other layer. Two classes with the same kernel mask therefore
  overlap in everything but their head rows.

How shared parameters are found: every parameter element of a float64 copy of the modular model is
set to a unique integer id (float64 holds integers exactly up to 2^53), the modules are extracted
from that copy, and each module's ids are read back from its parameters. Extraction only slices and
copies parameters, so whatever method made the units and however a unit cuts a layer, the ids say
exactly which elements of the model a module holds: no per-layer rule here. One extraction per class;
pairs are counted from how many modules hold each id (a pair shares an id held by n modules
n(n-1)/2 times), so the cost does not grow with the square of the classes.
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from .extract import extract_module
from .graph import GraphError, is_modular_output

__all__ = ["parameter_shares"]


def _head(gm: nn.Module) -> nn.Linear | None:
    """The ``nn.Linear`` module whose output the modular graph returns, or None."""
    nodes = gm.graph.nodes if isinstance(gm, fx.GraphModule) else []
    output = next((n for n in nodes if is_modular_output(n)), None)
    if output is None:
        raise ValueError("the model has no modular_output node: pass a modular model, not a plain network")
    logits = output.args[0]
    if getattr(logits, "op", None) != "call_module":
        return None
    module = gm.get_submodule(logits.target)
    return module if isinstance(module, nn.Linear) else None


def _number(model: nn.Module, head: nn.Linear | None) -> tuple[int, int, int, int]:
    """Overwrite every parameter element of ``model`` with its id: conv parameters first, then the
    rest, then the head class by class (row c's weights, then bias c), so that what an id is reads off
    its value. Returns (conv ids, ids before the head, ids per head row, all ids)."""
    head_params = set() if head is None else {id(p) for p in head.parameters()}
    conv, rest, seen = [], [], set(head_params)
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) not in seen:  # a tied parameter is one set of elements
                seen.add(id(p))
                (conv if isinstance(module, nn.Conv2d) else rest).append(p)
    next_id = 0
    with torch.no_grad():
        for p in conv + rest:
            p.copy_(torch.arange(next_id, next_id + p.numel(), dtype=p.dtype).view_as(p))
            next_id += p.numel()
        conv_ids = sum(p.numel() for p in conv)
        before_head, row = next_id, 0
        if head is not None:
            row = head.in_features + (head.bias is not None)
            block = torch.arange(next_id, next_id + head.out_features * row, dtype=head.weight.dtype)
            block = block.view(head.out_features, row)
            head.weight.copy_(block[:, :head.in_features])
            if head.bias is not None:
                head.bias.copy_(block[:, head.in_features])
            next_id += head.out_features * row
    return conv_ids, before_head, row, next_id


def _ids(module: nn.Module, total: int) -> torch.Tensor:
    """The sorted ids a module's parameters hold."""
    values = torch.cat([p.detach().flatten() for p in module.parameters()])
    ids = values.to(torch.int64)
    # Extraction copies parameters: a value that is no id would be a parameter made up on the way.
    if not (torch.equal(ids.to(values.dtype), values) and (ids >= 0).all() and (ids < total).all()):
        raise RuntimeError("an extracted module holds parameters that are not slices of the model's own")
    return torch.unique(ids)


def parameter_shares(modular_model: nn.Module, module_masks: torch.Tensor,
                     example: torch.Tensor | None = None) -> dict:
    """Weight share and overlap of the one-class modules of ``module_masks`` ((classes, kernels) 0/1,
    row c the kernels class c's module keeps), for any modular model ``extract_module`` cuts.

    ``example``: an input of the model's shape (default: one 32x32 image with the first conv's input
    channels), used in float64 on the CPU. The given model is not touched: the work is done on a
    float64 CPU copy. Returns ``weight_share``, ``weight_share_conv``, ``overlap``, ``overlap_conv``
    (NaN with a single row), ``per_class_share`` (one per row), ``model_parameters`` and
    ``model_conv_parameters`` (the whole model's counts, the denominators). A row that keeps no kernel
    in some unit is refused (ValueError naming the class)."""
    masks = torch.as_tensor(module_masks).to(torch.bool).cpu()
    if masks.dim() != 2 or masks.shape[0] == 0:
        raise ValueError(f"module masks must be (classes, kernels), got shape {tuple(masks.shape)}")
    model = copy.deepcopy(modular_model).to("cpu", torch.float64)
    head = _head(model)
    classes = masks.shape[0]
    if head is not None and head.out_features != classes:
        raise ValueError(f"{classes} module masks for a model with {head.out_features} classes")
    if example is None:
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        example = torch.zeros(1, first.in_channels, 32, 32)
    example = example.to("cpu", torch.float64)
    conv_ids, before_head, row, total = _number(model, head)

    def extract(keep: torch.Tensor, label: str | None = None) -> torch.Tensor:
        try:
            return _ids(extract_module(model, keep, example), total)
        except ValueError as error:
            if label is None or isinstance(error, GraphError):  # not a row's fault: nothing to name
                raise
            raise ValueError(f"{label}: {error}") from error

    with torch.no_grad():  # the ids' forward pass (shapes only) records nothing for autograd
        whole = extract(torch.ones(masks.shape[1], dtype=torch.bool))
        whole_conv = int((whole < conv_ids).sum())
        holders = torch.zeros(total, dtype=torch.int64)
        shares, conv_shares = [], []
        for c in range(classes):
            ids = extract(masks[c], f"class {c}")
            # Of the head, only class c's row: the rows of the other classes are their logits.
            ids = ids[(ids < before_head) | ((ids - before_head) // max(row, 1) == c)]
            holders[ids] += 1
            shares.append(len(ids) / len(whole))
            conv_shares.append(int((ids < conv_ids).sum()) / max(whole_conv, 1))
    # An id held by n modules is shared by n(n-1)/2 pairs: the pairs' mean without a loop over pairs.
    pairs = holders * (holders - 1) // 2
    pair_count = classes * (classes - 1) // 2
    nan = float("nan")
    return {
        "weight_share": sum(shares) / classes,
        "weight_share_conv": sum(conv_shares) / classes,
        "overlap": int(pairs.sum()) / pair_count / len(whole) if pair_count else nan,
        "overlap_conv": int(pairs[:conv_ids].sum()) / pair_count / max(whole_conv, 1) if pair_count else nan,
        "per_class_share": shares,
        "model_parameters": len(whole),
        "model_conv_parameters": whole_conv,
    }
