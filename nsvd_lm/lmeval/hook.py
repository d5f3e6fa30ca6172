"""Make the plain ``lm_eval`` CLI know ``--model nsvd``, ``--model nsvd-onnx`` and the ``nsvd_*`` tasks.

lm-eval 0.4.13 loads no model plugins (later releases read the ``lm_eval.models`` entry-point
group, which ``pyproject.toml`` already declares). Until then the ``nsvd_lm_lm_eval.pth`` file
that the wheel puts into site-packages runs ``install()`` at interpreter start. ``install()``
only appends a tiny finder to ``sys.meta_path``; nothing of lm-eval, torch or transformers is
imported then. When a program later imports

* ``lm_eval.api.registry``: we import ``lm_eval.models`` first (``get_model`` registers the
  built-in models only when the registry is *empty*, so registering ``nsvd`` alone would make
  ``hf`` & co. disappear), then register each of ``MODELS`` with its lazy target
  (``"nsvd"`` -> ``"nsvd_lm.lmeval.adapter:NSVDLM"``; torch is imported only when a run asks for it);
* ``lm_eval.tasks.manager``: we wrap ``TaskManager.__init__`` so its ``include_path`` always
  holds the installed ``nsvd_lm.tasks`` folder, once (an explicit ``--include_path`` to the
  same folder is recognised and not added twice).

Every step is best effort: a failure logs a warning and never breaks ``import lm_eval``.
"""

from __future__ import annotations

import sys

# The lm-eval models of nsvd-lm, name -> lazy "module:Class" target. pyproject.toml's
# [project.entry-points."lm_eval.models"] declares the same pairs (a test checks they agree).
MODEL_NAME = "nsvd"
ONNX_MODEL_NAME = "nsvd-onnx"
MODELS: dict[str, str] = {
    MODEL_NAME: "nsvd_lm.lmeval.adapter:NSVDLM",
    ONNX_MODEL_NAME: "nsvd_lm.lmeval.onnx_adapter:NSVDOnnxLM",
}
_REGISTRY_MODULE = "lm_eval.api.registry"
_TASK_MANAGER_MODULE = "lm_eval.tasks.manager"
_PATCHED_FLAG = "_nsvd_lm_include_path_patched"


def _warn(message: str) -> None:
    import logging

    logging.getLogger("nsvd_lm").warning("nsvd_lm lm-eval hook: %s", message)


def nsvd_tasks_dir() -> str | None:
    """Folder of the installed ``nsvd_lm.tasks`` package (found without importing it)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("nsvd_lm.tasks")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    if spec.origin:
        import os

        return os.path.dirname(spec.origin)
    return None


def register_model() -> None:
    """Register ``MODELS`` in lm-eval's model registry (after the built-in models)."""
    import lm_eval.models  # noqa: F401  (registers hf, vllm, ... before we add ours)
    from lm_eval.api.registry import model_registry

    for name, target in MODELS.items():
        if name not in model_registry:  # a future lm-eval may have loaded our entry point
            model_registry.register(name, target=target)


def _as_path_list(include_path) -> list:
    if include_path is None:
        return []
    if isinstance(include_path, (list, tuple)):
        return list(include_path)
    return [include_path]


def with_nsvd_tasks(include_path):
    """``include_path`` plus the nsvd_lm tasks folder, unless it (or its realpath) is there already.

    Ours goes first so that a user's own folder still overrides a task of the same name
    (lm-eval lets later paths win).
    """
    import os

    ours = nsvd_tasks_dir()
    paths = _as_path_list(include_path)
    if ours is None:
        return include_path
    real_ours = os.path.realpath(ours)
    if any(os.path.realpath(os.fspath(p)) == real_ours for p in paths):
        return include_path
    return [ours, *paths]


def patch_task_manager() -> None:
    """Wrap ``TaskManager.__init__`` so the nsvd tasks are always indexed."""
    import functools

    from lm_eval.tasks.manager import TaskManager

    if getattr(TaskManager.__init__, _PATCHED_FLAG, False):
        return
    original_init = TaskManager.__init__

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        if len(args) >= 2:  # (verbosity, include_path, ...) given positionally
            args = (args[0], with_nsvd_tasks(args[1]), *args[2:])
        else:
            kwargs["include_path"] = with_nsvd_tasks(kwargs.get("include_path"))
        original_init(self, *args, **kwargs)

    setattr(__init__, _PATCHED_FLAG, True)
    TaskManager.__init__ = __init__


_AFTER_IMPORT = {
    _REGISTRY_MODULE: register_model,
    _TASK_MANAGER_MODULE: patch_task_manager,
}


def _run_after_import(fullname: str) -> None:
    try:
        _AFTER_IMPORT[fullname]()
    except Exception as exc:  # never break `import lm_eval` because of us
        _warn(f"could not set up after importing {fullname}: {exc!r}")


class _LoaderAfterImport:
    """Delegates to the real loader, then runs our step once the module is fully executed."""

    def __init__(self, loader, fullname: str) -> None:
        self._loader = loader
        self._fullname = fullname

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _run_after_import(self._fullname)

    def __getattr__(self, name):  # get_resource_reader, get_source, is_package, ...
        return getattr(self._loader, name)


class LmEvalImportHook:
    """``sys.meta_path`` finder that only reacts to the two lm-eval modules we extend."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _AFTER_IMPORT:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _LoaderAfterImport(spec.loader, fullname)
        return spec


DISABLE_ENV = "NSVD_LM_NO_LM_EVAL_HOOK"


def install() -> None:
    """Called from the ``.pth`` file at interpreter start (and by ``nsvd_lm.lmeval.adapter``).

    ``NSVD_LM_NO_LM_EVAL_HOOK=1`` turns it off (e.g. to debug lm-eval without our additions).
    """
    import os

    if os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes"):
        return
    if any(isinstance(f, LmEvalImportHook) for f in sys.meta_path):
        return
    # Modules imported before we were installed (rare: only if lm_eval was imported already).
    for fullname in _AFTER_IMPORT:
        if fullname in sys.modules:
            _run_after_import(fullname)
    sys.meta_path.insert(0, LmEvalImportHook())
