"""What a pass is: :class:`Pass`, its :class:`PassResult` and the :class:`PassContext` it runs in.

A pass is a class with a kebab-case ``name``, a one-line ``description``, an ``Options``
dataclass and ``run(model, ctx) -> PassResult``. Analyses are cached in the :class:`PassContext`
and dropped after a pass unless the pass lists them in ``preserves``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from onnxprune.errors import PipelineError
from onnxprune.ir.model import Model
from onnxprune.pipeline.options import build_options

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class PassResult:
    """What a pass returns.

    Attributes:
        model: The (possibly same, possibly changed) model.
        modified: True if the pass changed anything.
        stats: Counters for the report (params before/after, nnz, groups removed, ...). Values must
            be JSON-serialisable.
    """

    model: Model
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class NoOptions:
    """Options of a pass that takes none."""


class PassContext:
    """State shared by the passes of one pipeline run.

    Attributes:
        calibration: Calibration data (an object from :mod:`onnxprune.analysis.calibration`,
            or an iterable of feed dicts), or None.
        options: Free-form global options (e.g. ``{"seed": 0}``).
        recipe_overrides: Per-pass, per-layer overrides from a recipe file
            (``{pass_name: {regex: {option: value}}}``).
    """

    def __init__(
        self,
        calibration: Any = None,
        options: Mapping[str, Any] | None = None,
        recipe_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self._calibration = calibration
        #: Whether any pass read :attr:`calibration` (``optimize`` warns when data was given but unused).
        self.calibration_read = False
        self.options: dict[str, Any] = dict(options or {})
        self.recipe_overrides: dict[str, Any] = dict(recipe_overrides or {})
        self._analyses: dict[str, Any] = {}
        self.warnings: list[str] = []

    @property
    def calibration(self) -> Any:
        """The calibration data (reading it marks it used: :attr:`calibration_read`)."""
        self.calibration_read = True
        return self._calibration

    @calibration.setter
    def calibration(self, value: Any) -> None:
        self._calibration = value

    def warn(self, message: str) -> None:
        """Record a warning for the report (the report prints it once; logged at DEBUG only, so that
        ``-v`` does not print it a second time as an INFO line)."""
        log.debug("warning recorded: %s", message)
        self.warnings.append(message)

    def get_analysis(self, key: str, compute: Callable[[], T]) -> T:
        """Return the cached analysis ``key``, computing it with ``compute()`` if absent."""
        if key not in self._analyses:
            self._analyses[key] = compute()
        return self._analyses[key]

    def has_analysis(self, key: str) -> bool:
        """True if ``key`` is cached."""
        return key in self._analyses

    def invalidate(self, preserved: Iterable[str] = ()) -> None:
        """Drop every cached analysis not named in ``preserved``."""
        keep = set(preserved)
        self._analyses = {k: v for k, v in self._analyses.items() if k in keep}


class Pass:
    """Base class of all passes.

    Subclasses set ``name``, ``description``, ``Options`` and implement :meth:`run`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: Analyses (context keys) this pass leaves valid.
    preserves: ClassVar[tuple[str, ...]] = ()
    #: Whether the pass takes per-layer overrides (a recipe's ``[pass.layers]``: regex on node or
    #: initializer names -> options, ``skip = true``); a recipe giving them to another pass is an error.
    layer_overrides: ClassVar[bool] = False

    def __init__(self, options: Any = None, **kwargs: Any) -> None:
        if options is None:
            options = build_options(self.Options, kwargs, self.name)
        elif kwargs:
            raise PipelineError(f"{self.name}: give either an options object or keyword options")
        self.options = options

    def run(self, model: Model, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        """Transform ``model`` and report what changed."""
        raise NotImplementedError

    def options_dict(self) -> dict[str, Any]:
        """The options as a plain dict (for reports)."""
        return dataclasses.asdict(self.options) if dataclasses.is_dataclass(self.options) else {}

    def __repr__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options_dict().items())
        return f"{self.name}({opts})"
