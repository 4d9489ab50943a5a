"""Tensor and data parallelism over torch.distributed.

group: who am I (TP group, ranks, ranges, agreement; imported by the layers);
launch: process groups and torchrun detection; workers: the spawned pool of a plain
process; dp: the data-parallel helper.
"""
