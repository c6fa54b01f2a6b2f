"""The ``alignkit`` console script: ``alignkit train [hydra overrides]``, ``alignkit export SRC OUT``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() if __doc__ else "", "\ncommands: train, export")
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from alignkit.train import main as train_main

        sys.argv = [sys.argv[0], *rest]
        train_main()
    elif cmd == "export":
        from alignkit.export import export_checkpoint

        p = argparse.ArgumentParser(
            prog="alignkit export", description="Lightning checkpoint or run dir -> open_clip state dict"
        )
        p.add_argument("src", help="a .ckpt file or a run directory (uses checkpoints/last.ckpt)")
        p.add_argument("out", help="output .safetensors (or .pt / .bin)")
        a = p.parse_args(rest)
        print(export_checkpoint(a.src, a.out))
    else:
        raise SystemExit(f"unknown command {cmd!r}; use: alignkit train ... | alignkit export SRC OUT")


if __name__ == "__main__":
    main()
