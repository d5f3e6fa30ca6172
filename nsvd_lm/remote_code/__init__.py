"""The Hugging Face custom code that ``save_compressed`` puts into every checkpoint folder.

With it, ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` (and so
``transformers serve --trust-remote-code``, ``lm_eval --model hf ... trust_remote_code=True``,
``pipeline()``) rebuilds the factored model without nsvd-lm installed.

**One source.** The files of this folder are the code, not a template of it: ``save_compressed``
copies them byte for byte (``copy_code``), and nsvd-lm itself runs the same files:

* ``low_rank_linear.py`` - ``LowRankLinear`` and ``factor_layers`` (the module swap of a saved
  checkpoint); ``nsvd_lm.modules`` re-exports them and ``load_compressed`` calls ``factor_layers``;
* ``configuration_nsvd_lm.py`` - the config.json layout (``compressed_config_dict``,
  ``base_config_from_dict``), used by ``save_compressed`` / ``load_compressed`` as well;
* ``modeling_nsvd_lm.py`` - ``NSVDLMForCausalLM``, the ``auto_map`` entry point.

So these files import only the standard library, torch and transformers, and each other by
relative imports (``from .low_rank_linear import ...``), which transformers' dynamic-module
loader copies along. They must never import ``nsvd_lm`` (a test loads a folder in a process
where nsvd_lm cannot be imported).

This ``__init__`` itself imports nothing heavy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

CODE_DIR = Path(__file__).resolve().parent


def copy_code(folder: str | Path) -> None:
    """Copy the custom-code files (``configuration_nsvd_lm.CODE_FILES``) of this package into ``folder``."""
    from nsvd_lm.remote_code.configuration_nsvd_lm import CODE_FILES

    for name in CODE_FILES:
        shutil.copyfile(CODE_DIR / name, Path(folder) / name)
