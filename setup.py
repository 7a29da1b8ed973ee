"""Only what pyproject.toml cannot say: install ``apex_tune_quiet_torchao.pth`` at the
root of site-packages, from a wheel and from an editable install alike (see
recipes/apex_tune_quiet_torchao.py for why a start-up hook is needed)."""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

STARTUP_PTH = "apex_tune_quiet_torchao.pth"
SOURCE = os.path.join("recipes", STARTUP_PTH)


class BuildPyWithStartupPth(build_py):
    """Regular wheels: build_py's output is the wheel's root."""

    def run(self):
        super().run()
        self.copy_file(SOURCE, os.path.join(self.build_lib, STARTUP_PTH))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, STARTUP_PTH)]


class EditableWheelWithStartupPth(editable_wheel):
    """Editable wheels hold only a path hook, not build_py's output; setuptools writes the
    files for the wheel's root (its own namespace-package .pth files) in this step.
    tests/test_torchao_log.py checks the installed environment, so a setuptools that
    stops calling it fails the suite instead of printing the line again."""

    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copy(os.path.join(self.project_dir or ".", SOURCE), os.path.join(installation_dir, STARTUP_PTH))


setup(cmdclass={"build_py": BuildPyWithStartupPth, "editable_wheel": EditableWheelWithStartupPth})
