"""Command line: `aether demo`, `aether eval` (also `python -m aether ...`).

`aether demo` runs SmolLM2-135M-Instruct on a long prompt, dense and with AETHER, and prints a
table (needs the eval extra: `pip install -e .[eval]`); `aether demo --synthetic` runs one decode
step over a synthetic cache instead (no model needed). `aether eval` is the accuracy harness
(`python -m aether.eval --help`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "eval":  # every flag after `eval` belongs to the harness's own parser
        from aether.eval import main as eval_main

        return eval_main(argv[1:])
    parser = argparse.ArgumentParser(prog="aether", description="AETHER block-sparse decode attention")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="SmolLM2-135M on a long prompt, dense vs AETHER (--synthetic: a synthetic "
                                       "cache, no model)")
    demo.add_argument("--synthetic", action="store_true", help="one decode step on a synthetic cache (no model)")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--context", type=int, default=None,
                      help="real demo: prompt + decoded tokens (default 4096 on CPU, 8192 on GPU)")
    demo.add_argument("--decode", type=int, default=64, help="real demo: tokens decoded one at a time")
    demo.add_argument("--gen-tokens", type=int, default=32, help="real demo: greedy tokens compared with dense")
    demo.add_argument("--plot", type=Path, default=Path("aether_demo.png"), help="real demo: where to save the plot")
    demo.add_argument("--threads", type=int, default=None, help="real demo: torch CPU threads (default 1)")
    demo.add_argument("--seq", type=int, default=16384, help="synthetic: tokens in the KV cache")
    demo.add_argument("--batch", type=int, default=2, help="synthetic: batch size")
    demo.add_argument("--block-size", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0, help="synthetic: random seed")
    sub.add_parser("eval", help="accuracy harness on the real model (aether eval --help)", add_help=False)
    args = parser.parse_args(argv)
    if args.synthetic:
        from aether.demo import run_synthetic_demo

        run_synthetic_demo(device=args.device, seq=args.seq, batch=args.batch, block_size=args.block_size,
                           seed=args.seed)
        return 0
    from aether.models import MissingExtraError

    try:
        from aether.eval import run_model_demo

        run_model_demo(context=args.context, decode=args.decode, gen_tokens=args.gen_tokens, device=args.device,
                       block_size=args.block_size, plot=args.plot, threads=args.threads)
    except MissingExtraError as err:
        print(f"aether demo: {err}\n(`aether demo --synthetic` runs without the model)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
