"""alignkit: config-driven post-pre-training for vision-language models.

usage: alignkit COMMAND [ARGS]     (python -m alignkit COMMAND [ARGS] is the same)

  train          [hydra overrides]            train / refine (= python train.py); alignkit train --help
  eval           [hydra overrides]            evaluate a run or model (= python eval.py); alignkit eval --help
  export         RUN_OR_CKPT OUT_DIR          open_clip hub layout (OUT.safetensors: plain state dict)
  make-shards    --csv|--coco ... --out DIR   images + captions -> img2dataset-layout webdataset shards
  build-evalsets fashion-mnist|digits|openclipart --out DIR   CLIP_benchmark-layout eval sets from offline data
  reproduce      offline|clip_refine_coco|structure_coco ...  the reproduction recipes and offline table
  --version                                   print the installed version

Shell completion of the Hydra overrides: eval "$(alignkit train -sc install=bash)"
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

PROG = "alignkit"
HYDRA_COMMANDS = ("train", "eval")
COMMANDS = (*HYDRA_COMMANDS, "export", "make-shards", "build-evalsets", "reproduce")


def _hydra_entry(cmd: str) -> Callable[[], None]:
    if cmd == "train":
        from alignkit.run.train import main as entry
    else:
        from alignkit.run.evaluate import main as entry
    return entry


def _complete(rest: list[str]) -> None:
    """Hydra's bash completion calls ``alignkit -sc query=bash`` with the whole line in ``COMP_LINE``: drop the
    subcommand from the line (Hydra strips only the program name) and answer with that subcommand's configs."""
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    if len(words) < 2 or words[1] not in HYDRA_COMMANDS:
        return  # completing the subcommand itself: nothing Hydra knows
    cut = line.index(words[1]) + len(words[1])
    os.environ["COMP_LINE"] = words[0] + line[cut:]
    point = int(os.environ.get("COMP_POINT", len(line)))
    os.environ["COMP_POINT"] = str(max(len(words[0]), point - (cut - len(words[0]))))
    sys.argv = [PROG, "-sc", *rest]
    _hydra_entry(words[1])()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from alignkit import __version__

    try:
        return version("alignkit")
    except PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        return __version__


def main(argv: list[str] | None = None) -> int | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() if __doc__ else "")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in ("-V", "--version"):
        print(f"{PROG} {_version()}")
        return 0
    if cmd == "-sc":
        _complete(rest)
    elif cmd in HYDRA_COMMANDS:
        # Hydra reads sys.argv: the overrides only, and the program's plain name (its completion script
        # registers basename(argv[0]), which must be one word)
        sys.argv = [PROG, *rest]
        _hydra_entry(cmd)()
    elif cmd == "export":
        from alignkit.run.export import main as export_main

        return export_main(rest)
    elif cmd == "make-shards":
        from alignkit.tools.make_shards import main as tool
    elif cmd == "build-evalsets":
        from alignkit.tools.build_evalsets import main as tool
    elif cmd == "reproduce":
        from alignkit.tools.reproduce import main as tool
    else:
        raise SystemExit(
            f"{PROG}: unknown command {cmd!r}; use one of: {', '.join(COMMANDS)} (alignkit --help)"
        )
    if cmd in ("make-shards", "build-evalsets", "reproduce"):
        return tool(rest, prog=f"{PROG} {cmd}")
    return None


if __name__ == "__main__":
    sys.exit(main())
