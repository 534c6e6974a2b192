"""Raise each operator-level argument error in turn (one per process line) to locate a crash."""
import sys

import torch

import aether  # noqa: F401

q = torch.randn(2, 4, 64)
k = torch.randn(2, 2, 32, 64)
lens = torch.tensor([32, 32], dtype=torch.int32)
cases = {
    "short_lens": lambda: torch.ops.aether.sparse_decode(q, k, k, lens[:1], 16, 0.1),
    "long_lens": lambda: torch.ops.aether.sparse_decode(q, k, k, lens.long(), 16, 0.1),
    "bad_bs": lambda: torch.ops.aether.block_stats(k, lens, 24, 2),
    "bad_scale": lambda: torch.ops.aether.sparse_decode(q, k, k, lens, 16, -1.0),
}
for name in sys.argv[1:] or cases:
    try:
        cases[name]()
        print(name, "no error")
    except Exception as err:  # noqa: BLE001
        print(name, type(err).__name__, str(err).splitlines()[0])
    sys.stdout.flush()
