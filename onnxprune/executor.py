"""Where the per-layer calibration work runs: in this process, or as Ray tasks and actors.

Layer-wise calibration splits into independent pieces of work (see
:mod:`onnxprune.analysis.calibration` and the ``masks``/``nm`` passes):

* **statistics per calibration shard**: each shard of the calibration batches is walked through
  the dense (or pruned-so-far) model by its own :class:`~onnxprune.analysis.calibration.SegmentRunner`
  (an *actor*: it keeps the shard's frontier tensors between stages) and returns its partial sums
  ``Σ xᵀx``; the driver adds the shards' sums in shard order;
* **per-layer solves**: every weight of a stage is pruned (OBS / SparseGPT, Wanda) from its own
  ``[K, N]`` weight and statistics, independently of the others (a *task*).

An executor runs both. :class:`InProcessExecutor` calls them here, one after the other;
:class:`RayExecutor` (``--executor ray[:ADDRESS]``, extra ``onnxprune[distributed]``) makes the
shard runners Ray actors and the solves Ray tasks. Arguments go by reference: arrays are put
once into Ray's object store (workers on the same node read them without a copy), the model
travels as its small proto with memory-mapped weights named by path (shared storage), and the
results come back to the driver, which alone writes the model. Both executors run the same
functions on the same inputs and sum in the same order, so they give the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from onnxprune.errors import OnnxPruneError

__all__ = ["Executor", "InProcessExecutor", "RayExecutor", "make_executor"]


class Executor:
    """The interface: put objects, run functions on keyword arguments, hold stateful workers."""

    name = "executor"

    def put(self, obj: Any) -> Any:
        """A reference to ``obj`` that :meth:`map` and actor calls resolve (the object itself here)."""
        return obj

    def map(self, fn: Callable[..., Any], calls: Sequence[Mapping[str, Any]]) -> list[Any]:
        """``[fn(**kw) for kw in calls]``, results in order."""
        return [fn(**kw) for kw in calls]

    def actors(self, cls: type, args: Sequence[Sequence[Any]]) -> list[Any]:
        """One ``cls(*a)`` per entry of ``args``."""
        return [cls(*a) for a in args]

    def call_all(self, actors: Sequence[Any], method: str, *args: Any) -> list[Any]:
        """``[actor.method(*args) for actor in actors]``, results in order."""
        return [getattr(a, method)(*args) for a in actors]


class InProcessExecutor(Executor):
    """Everything in this process (the default)."""

    name = "in-process"


class RayExecutor(Executor):
    """Ray tasks and actors on a local instance (no address) or a running cluster (``ADDRESS``).

    Raises:
        OnnxPruneError: Ray is not installed.
    """

    name = "ray"

    def __init__(self, address: str | None = None, **init_kwargs: Any) -> None:
        try:
            import ray
        except ImportError:
            raise OnnxPruneError("--executor ray needs Ray: pip install 'onnxprune[distributed]'") from None
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address or None, **({"log_to_driver": False} | init_kwargs))
        self._remote: dict[Callable[..., Any], Any] = {}

    def put(self, obj: Any) -> Any:
        return self.ray.put(obj)

    def map(self, fn: Callable[..., Any], calls: Sequence[Mapping[str, Any]]) -> list[Any]:
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self.ray.remote(fn)
        return list(self.ray.get([remote.remote(**kw) for kw in calls]))

    def actors(self, cls: type, args: Sequence[Sequence[Any]]) -> list[Any]:
        remote = self.ray.remote(cls)
        return [remote.remote(*a) for a in args]

    def call_all(self, actors: Sequence[Any], method: str, *args: Any) -> list[Any]:
        return list(self.ray.get([getattr(a, method).remote(*args) for a in actors]))


def make_executor(spec: str | Executor | None) -> Executor:
    """The executor for ``spec``: None / ``local`` / ``in-process``, ``ray`` or ``ray:ADDRESS``.

    ``ray`` starts a local Ray instance (or joins the one ``RAY_ADDRESS`` names); ``ray:auto`` joins
    a running cluster; ``ray:HOST:PORT`` a given head node.

    Raises:
        OnnxPruneError: an unknown spec, or Ray missing.
    """
    if isinstance(spec, Executor):
        return spec
    if spec in (None, "", "local", "in-process"):
        return InProcessExecutor()
    assert isinstance(spec, str)
    if spec == "ray" or spec.startswith("ray:"):
        return RayExecutor(spec[4:] or os.environ.get("RAY_ADDRESS") or None)
    raise OnnxPruneError(f"unknown executor {spec!r}; expected local, ray or ray:ADDRESS")
