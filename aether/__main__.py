"""Command line: `aether demo` (also `python -m aether demo`)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aether", description="AETHER block-sparse decode attention")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="dense vs sparse decode attention on a synthetic long-context cache")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--seq", type=int, default=16384, help="tokens in the KV cache")
    demo.add_argument("--batch", type=int, default=2)
    demo.add_argument("--block-size", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from aether.demo import run_synthetic_demo

        run_synthetic_demo(device=args.device, seq=args.seq, batch=args.batch, block_size=args.block_size,
                           seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
