"""The pass registry: ``@register_pass``, lookup by name, and loading of the built-in passes.

Built-in passes live in :mod:`onnxprune.passes`; they are imported on the first lookup, so
importing the pipeline machinery never imports every pass (and no pass module imports the
registry's users).
"""

from __future__ import annotations

import dataclasses
import re

from onnxprune.errors import PipelineError
from onnxprune.pipeline.base import Pass

_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


# ---------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: add a pass to the registry read by the CLI and the pipeline parser."""
    if not _NAME_RE.match(cls.name or ""):
        raise ValueError(f"pass name {cls.name!r} must be kebab-case")
    if not cls.description:
        raise ValueError(f"pass {cls.name!r} needs a one-line description")
    if not dataclasses.is_dataclass(cls.Options):
        raise ValueError(f"pass {cls.name!r}: Options must be a dataclass")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass {cls.name!r} is already registered by {_REGISTRY[cls.name].__module__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin_passes() -> None:
    """Import ``onnxprune.passes`` (which registers the built-in passes).

    Installed, ``onnxprune.passes`` is the top-level ``passes/`` folder (setuptools
    ``package-dir``). In a plain source checkout on ``PYTHONPATH`` (e.g. on a GPU box without
    installing), the folder is loaded from beside the ``onnxprune`` package instead.
    """
    import importlib.util
    import sys
    from pathlib import Path

    if "onnxprune.passes" in sys.modules:
        return
    try:
        import onnxprune.passes  # noqa: F401
        return
    except ModuleNotFoundError as exc:
        if exc.name != "onnxprune.passes":
            raise
    folder = Path(__file__).resolve().parent.parent / "passes"
    spec = importlib.util.spec_from_file_location(
        "onnxprune.passes", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    if spec is None or spec.loader is None:  # pragma: no cover - broken install
        raise ModuleNotFoundError("onnxprune.passes is neither installed nor beside the package")
    module = importlib.util.module_from_spec(spec)
    sys.modules["onnxprune.passes"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("onnxprune.passes", None)
        raise


def registered_passes() -> dict[str, type[Pass]]:
    """Name -> pass class, sorted by name."""
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    """Look up a pass class by name.

    Raises:
        PipelineError: unknown name (the message lists the valid ones).
    """
    passes = registered_passes()
    if name not in passes:
        raise PipelineError(f"unknown pass {name!r}; available passes: {', '.join(passes)}")
    return passes[name]
