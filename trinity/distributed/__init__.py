"""Distributed training: device mesh, FSDP2/HSDP wrapping, expert parallelism, and a gloo test launcher."""
