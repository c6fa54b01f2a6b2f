"""Ships the repository's ``configs/`` inside the wheel as ``alignkit/configs`` (everything else is in pyproject.toml).

The configs stay at the repository root, where ``python train.py`` and the docs expect them; a non-editable
``pip install .`` or a built wheel then still finds them (``alignkit.run.train.CONFIG_DIR``)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:  # an editable install reads <repo>/configs directly
            shutil.copytree(
                Path("configs"), Path(self.build_lib) / "alignkit" / "configs", dirs_exist_ok=True
            )


setup(cmdclass={"build_py": BuildPyWithConfigs})
