"""The Ray executor (issue 17): statistics per calibration shard as Ray actors, per-layer solves as Ray
tasks, weights by reference, results written by the driver — the same bytes as in this process.

One local Ray instance (``ray.init(num_cpus=2)``) for the whole module.
"""

from __future__ import annotations

import numpy as np
import pytest

from models import build_transformer_block, random_inputs
from onnxprune import optimize
from onnxprune.errors import OnnxPruneError
from onnxprune.executor import InProcessExecutor, RayExecutor, make_executor
from onnxprune.ir.load import from_proto

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def executor():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield RayExecutor()
    finally:
        ray.shutdown()


def _weights(model) -> dict[str, bytes]:
    return {t.name: np.asarray(model.get_array(t.name)).tobytes() for t in model.graph.initializer}


@pytest.mark.parametrize("spec", ["nm(n=2,m=4,criterion=sparsegpt,calib_shards=2)",
                                  "masks(sparsity=0.5,criterion=sparsegpt,mode=sequential,calib_shards=2)",
                                  "masks(sparsity=0.5,criterion=wanda,calib_shards=3,max_memory=1)"])
def test_ray_gives_the_in_process_bytes(executor, spec: str) -> None:
    proto = build_transformer_block(seed=0, layers=2)
    calib = [random_inputs(proto, batch=4, seq=12, seed=s) for s in range(6)]
    local = optimize(from_proto(proto), spec, calibration=calib).model
    remote = optimize(from_proto(proto), spec, calibration=calib, options={"executor": executor}).model
    assert _weights(local) == _weights(remote)
    assert any(np.count_nonzero(np.asarray(local.get_array(t.name))) < np.asarray(local.get_array(t.name)).size
               for t in local.graph.initializer)  # something was pruned


def test_make_executor_specs() -> None:
    assert isinstance(make_executor(None), InProcessExecutor)
    assert isinstance(make_executor("local"), InProcessExecutor)
    with pytest.raises(OnnxPruneError, match="unknown executor"):
        make_executor("spark")
