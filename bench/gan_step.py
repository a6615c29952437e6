"""Milliseconds per `gan` train_step (deep_conv, hinge) on this machine, printed as a table.

Median and best of ``--steps`` timed steps (best is the figure to compare on a shared machine).

    python bench/gan_step.py [--size 32] [--batch 64] [--ch 64] [--steps 10] [--threads 2]
"""
import argparse
import time
import types

import accelerate
import torch

from handforge.plugins.backbones.deep_conv import DeepConvConfig, build_deep_conv
from handforge.plugins.conditioners.label import ClassBatchNorm, NoCondition, Projection
from handforge.plugins.losses.adversarial import Hinge
from handforge.plugins.tasks.gan import GanConfig, GanTask
from handforge.recipe import Component
from handforge.registry import Entry
from handforge.task import RunContext


def component(kind, name, factory, config=None):
    entry = Entry(kind, name, factory, type(config) if config is not None else None, "bench", None, None, "")
    return Component(name, config, entry, f"model.{name}")


def make_task(size, ch, conditional):
    dataset = types.SimpleNamespace(image_size=size, class_names=[str(i) for i in range(10)])
    backbone = DeepConvConfig(ch=ch)
    components = {
        "generator": component("backbone", "deep_conv", build_deep_conv, backbone),
        "discriminator": component("backbone", "deep_conv", build_deep_conv, backbone),
        "g_conditioner": component("conditioner", "g", ClassBatchNorm if conditional else NoCondition),
        "d_conditioner": component("conditioner", "d", Projection if conditional else NoCondition),
        "loss": component("loss", "hinge", Hinge),
    }
    run = RunContext(recipe=types.SimpleNamespace(seed=0), accelerator=accelerate.Accelerator(cpu=True),
                     run_dir=None, dataset=dataset, components=components)
    task = GanTask(GanConfig())
    task.setup(run)
    return task


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("size", 32), ("batch", 64), ("ch", 64), ("steps", 10), ("threads", 2)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| conditioners | size | batch | ch | G params | D params | ms/step median | ms/step best |")
    print("|---|---|---|---|---|---|---|---|")
    for conditional in (False, True):
        torch.manual_seed(0)
        task = make_task(args.size, args.ch, conditional)
        modules = task.export_modules()
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        batch = {"image": torch.rand(args.batch, 3, args.size, args.size) * 2 - 1,
                 "label": torch.randint(0, 10, (args.batch,))}
        for step in range(2):  # warm-up
            task.train_step(batch, step)
        times = []
        for step in range(args.steps):
            start = time.perf_counter()
            task.train_step(batch, step)
            times.append((time.perf_counter() - start) * 1000)
        times.sort()
        name = "cbn + projection" if conditional else "none"
        print(f"| {name} | {args.size} | {args.batch} | {args.ch} | {count(modules['generator']):,} "
              f"| {count(modules['discriminator']):,} | {times[len(times) // 2]:.0f} | {times[0]:.0f} |")


if __name__ == "__main__":
    main()
