"""python eval.py model.ckpt=RUN_OR_CKPT evalsets=[...]  (same as the `alignkit eval` console script)."""

from alignkit.run.evaluate import main

if __name__ == "__main__":
    main()
