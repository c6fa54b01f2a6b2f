"""The ``alignkit`` console script.

alignkit train [hydra overrides]                 # = python train.py
alignkit eval  [hydra overrides]                 # = python eval.py
alignkit export RUN_OR_CKPT OUT_DIR            # open_clip hub layout (OUT.safetensors: plain state dict)
"""

from __future__ import annotations

import sys

COMMANDS = ("train", "eval", "export")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() if __doc__ else "", f"\ncommands: {', '.join(COMMANDS)}")
        return
    cmd, rest = argv[0], argv[1:]
    if cmd in ("train", "eval"):
        # Hydra reads sys.argv; give it the overrides only.
        if cmd == "train":
            from alignkit.run.train import main as entry
        else:
            from alignkit.eval.entry import main as entry
        sys.argv = [f"{sys.argv[0]} {cmd}", *rest]
        entry()
    elif cmd == "export":
        from alignkit.run.export import main as export_main

        export_main(rest)
    else:
        raise SystemExit(f"unknown command {cmd!r}; use one of: {', '.join(COMMANDS)} (alignkit --help)")


if __name__ == "__main__":
    main()
