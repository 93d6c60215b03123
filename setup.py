"""Ships the repository's DeepSpeed JSONs (top-level `ds_configs/`) inside the wheel as `engine/ds_configs/`:
package data must live in a package, and users keep the top-level folder. Everything else is in pyproject.toml."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithConfigs(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib, "engine", "ds_configs")
        self.mkpath(str(target))
        for config in sorted(Path(__file__).parent.joinpath("ds_configs").glob("*.json")):
            self.copy_file(str(config), str(target / config.name))


setup(cmdclass={"build_py": BuildWithConfigs})
