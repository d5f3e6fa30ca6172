"""Build hook: put ``nsvd_lm_lm_eval.pth`` at the root of every wheel (normal and editable).

All metadata lives in ``pyproject.toml``; this file only adds the ``.pth`` that lets the plain
``lm_eval`` CLI of lm-eval 0.4.13 find ``--model nsvd`` and our tasks (see
``nsvd_lm/lmeval/hook.py`` and docs/lm_eval.md). The ``.pth`` text is generated here (one
line, so it needs no MANIFEST entry in the sdist).
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "nsvd_lm_lm_eval.pth"
# site.py executes .pth lines that start with "import". The hook module imports nothing heavy;
# ImportError (package removed but .pth left behind) must not break every interpreter start.
PTH_TEXT = (
    "import sys; exec('try:\\n    import nsvd_lm.lmeval.hook as _nsvd_hook\\n"
    "except ImportError:\\n    _nsvd_hook = None\\n"
    "if _nsvd_hook is not None:\\n    _nsvd_hook.install()')\n"
)


class build_py_with_pth(build_py):
    """``build_py`` that also writes the ``.pth`` next to the top-level packages."""

    def run(self) -> None:
        super().run()
        target = os.path.join(self._wheel_root(), PTH_NAME)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w", encoding="utf-8") as fh:
            fh.write(PTH_TEXT)
        self._pth_output = target

    def _wheel_root(self) -> str:
        # A normal wheel is made from build_lib. setuptools' editable_wheel does not ship
        # build_lib (it writes a finder instead) but zips its "unpacked wheel" folder, which
        # it configures as install.install_lib; files written there land in site-packages.
        if getattr(self, "editable_mode", False):
            return self.get_finalized_command("install").install_lib
        return self.build_lib

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if not getattr(self, "editable_mode", False):
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
        return outputs


setup(cmdclass={"build_py": build_py_with_pth})
