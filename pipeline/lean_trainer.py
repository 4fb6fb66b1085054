"""A ``TorchTrainer`` that starts only the helper processes this pipeline's runs use.

Every ``TorchTrainer.fit`` (Ray Train V2, Ray 2.60) starts, besides its workers, a controller and a
set of helper actors, each its own Python process: about 2 CPU-seconds to start on a 2-core machine,
paid again by every sweep trial. Two of them never do anything for a distillation run here:

* Ray Data's ``DatasetManager``: ``DatasetsCallback`` creates it even when the trainer was given no
  datasets. Ours never are; every worker builds its own split (:func:`amad.data.benchmark.make_split`).
  :func:`lean_torch_trainer` returns a ``TorchTrainer`` subclass that leaves that callback out when
  ``datasets`` is empty, and keeps it otherwise.
* Ray Train's ``PreemptionWatcher``: it polls the GCS for nodes being drained (spot preemption) so that
  workers can checkpoint in time. A cluster that this process started on its own machine
  (:func:`pipeline.local_cluster.started_here`) has no node a cloud can take away, so
  :func:`preemption_watcher_env` switches it off there through Ray's own
  ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER``. On a cluster joined by address Ray's default (on) stands,
  and a value the user set is never overridden.

The placement-group cleaner, the synchronisation actor and Tune's report queue stay: Train and Tune
need them. Measured with both sweep trials of a pair starting together (2 workers each, 2 cores), see
docs/sweep.md.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


@functools.cache
def lean_torch_trainer() -> type:
    """``TorchTrainer`` without Ray Data's ``DatasetManager`` actor when it has no datasets (same constructor)."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [callback for callback in callbacks if not isinstance(callback, DatasetsCallback)]

    return LeanTorchTrainer


@contextlib.contextmanager
def preemption_watcher_env(watch: bool) -> Iterator[None]:
    """For the duration: Ray Train's preemption watcher off unless ``watch`` or the user set the variable.

    Ray reads the variable when ``fit`` starts its controller (and passes it on to it), so wrap ``fit``.
    """
    if watch or PREEMPTION_WATCHER_ENV in os.environ:
        yield
        return
    os.environ[PREEMPTION_WATCHER_ENV] = "0"
    try:
        yield
    finally:
        os.environ.pop(PREEMPTION_WATCHER_ENV, None)
