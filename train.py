"""python train.py +experiment=NAME [overrides]  (same as the `alignkit train` console script)."""

from alignkit.run.train import main

if __name__ == "__main__":
    main()
