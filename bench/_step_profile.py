"""Where one training iteration's CPU time goes: ``profile_step(step, modules)`` for bench/gan_step.py
and bench/diffusion_step.py.

One call of ``step()`` under ``torch.profiler`` (CPU). Every op's self time goes to one category:

- forward ops to the innermost module scope open around them (forward pre/post hooks on the
  given modules' submodules open a ``record_function`` per category): "spectral norm" (torch's
  ``_SpectralNorm`` parametrization: its power iteration and W / sigma), "conv", "attention"
  (a module with ``attention`` in its class name, less its convs, which count as conv),
  "batchnorm" (BatchNorm and the conditional BatchNorm modules around it, with their
  gain / bias linears), "other norms" (RMS, group and layer norms: the U-Net's),
  "linear / embedding"; ops under ``aten::contiguous`` (the memory-format
  conversions: NCHW <-> channels_last copies) count as "layout conversions" wherever they run;
- backward ops (autograd's ``evaluate_function: XBackward`` nodes) to the category of the
  forward op that made them (matched by autograd sequence number);
- ``Optimizer.step`` and ``zero_grad`` to "optimizer step"; everything else to "other
  (activations, losses, EMA, glue)".

Returns (categories, top ops): lists of dicts, time in ms, forward and backward apart.
"""
import collections

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile, record_function

PREFIX = "cat::"
LAYOUT_OPS = ("aten::contiguous",)
ORDER = ("conv", "spectral norm", "attention", "batchnorm", "other norms", "linear / embedding",
         "layout conversions", "optimizer step", "other (activations, losses, EMA, glue)")
OTHER = ORDER[-1]


def category_of(module):
    name = type(module).__name__
    if name == "_SpectralNorm":
        return "spectral norm"
    if isinstance(module, nn.Conv2d):
        return "conv"
    if "attention" in name.lower():
        return "attention"
    if isinstance(module, nn.modules.batchnorm._BatchNorm) or "batchnorm" in name.lower() or "cbn" in name.lower():
        return "batchnorm"
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) or name.lower().endswith("norm"):
        return "other norms"
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return "linear / embedding"
    return None


class scopes:
    """While active, every categorised submodule's forward runs inside ``record_function('cat::<category>')``."""

    def __init__(self, *modules):
        self.targets = [(m, c) for module in modules if module is not None
                        for m in module.modules() for c in [category_of(m)] if c is not None]

    def __enter__(self):
        self.handles = []
        for module, cat in self.targets:
            stack = []

            def pre(mod, args, cat=cat, stack=stack):
                scope = record_function(PREFIX + cat)
                scope.__enter__()
                stack.append(scope)

            def post(mod, args, out, stack=stack):
                stack.pop().__exit__(None, None, None)

            self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _is_layout(event):
    return event.name in LAYOUT_OPS


def _forward_category(event):
    """Category of a forward-side op from its ancestors: layout wins, then the innermost scope."""
    scope = None
    node = event
    while node is not None:
        if _is_layout(node):
            return "layout conversions"
        if node.name.startswith("Optimizer.step") or node.name.startswith("Optimizer.zero_grad"):
            return "optimizer step"
        if scope is None and node.name.startswith(PREFIX):
            scope = node.name[len(PREFIX):]
        node = node.cpu_parent
    return scope


def profile_step(step, modules, top=15):
    with scopes(*modules), profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    # forward op -> category, keyed by (thread, sequence number): what its backward node inherits
    by_seq = {}
    for e in events:
        if e.sequence_nr is not None and e.sequence_nr >= 0 and not e.name.startswith("autograd::") \
                and not e.name.startswith(PREFIX):
            cat = _forward_category(e)
            key = (e.thread, e.sequence_nr)
            if cat is not None and key not in by_seq:
                by_seq[key] = cat
    totals = collections.defaultdict(lambda: [0.0, 0.0])  # category -> [forward ms, backward ms]
    ops = collections.defaultdict(lambda: [0.0, 0])  # op name -> [self ms, calls]
    for e in events:
        self_ms = e.self_cpu_time_total / 1000  # a scope's own self time is its hooks' overhead
        if self_ms <= 0:
            continue
        # backward: the nearest evaluate_function ancestor names the node; its forward op gives the category
        node, backward_node = e, None
        while node is not None:
            if node.name.startswith("autograd::engine::evaluate_function"):
                backward_node = node
                break
            node = node.cpu_parent
        if backward_node is not None:
            cat = by_seq.get((backward_node.fwd_thread, backward_node.sequence_nr))
            if cat is None:
                cat = "optimizer step" if _forward_category(e) == "optimizer step" else OTHER
            totals[cat][1] += self_ms
        else:
            totals[_forward_category(e) or OTHER][0] += self_ms
        if not e.name.startswith(PREFIX):
            ops[e.name][0] += self_ms
            ops[e.name][1] += 1
    total = sum(f + b for f, b in totals.values())
    categories = [{"category": c, "forward_ms": totals[c][0], "backward_ms": totals[c][1],
                   "ms": sum(totals[c]), "share": sum(totals[c]) / total if total else 0.0}
                  for c in ORDER if c in totals]
    top_ops = [{"op": name, "self_ms": ms, "calls": calls, "share": ms / total if total else 0.0}
               for name, (ms, calls) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]]
    return {"total_ms": total, "categories": categories, "top_ops": top_ops}


def markdown(result, title):
    lines = [title, "", "| category | forward ms | backward ms | total ms | share |", "|---|---|---|---|---|"]
    lines += [f"| {c['category']} | {c['forward_ms']:.0f} | {c['backward_ms']:.0f} | {c['ms']:.0f} "
              f"| {100 * c['share']:.1f}% |" for c in result["categories"]]
    lines.append(f"| all (profiled self time) | | | {result['total_ms']:.0f} | 100% |")
    lines += ["", "| op (self CPU time) | calls | ms | share |", "|---|---|---|---|"]
    lines += [f"| `{o['op']}` | {o['calls']} | {o['self_ms']:.0f} | {100 * o['share']:.1f}% |" for o in result["top_ops"]]
    return "\n".join(lines)
