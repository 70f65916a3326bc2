"""A job in a child process: the interpreter is only ever loaded by a child that exits when its job is done.

- :mod:`~device_app.jobs.spec`: :class:`Job`, what the child is asked to do (probe, train, evaluate);
- :mod:`~device_app.jobs.child`: the child's entry point (loads the bundle, runs :mod:`device_app.training`);
- :mod:`~device_app.jobs.watch`: :class:`ChildRun`, the parent side (spawn, relay messages, RSS watcher, stop);
- :mod:`~device_app.jobs.runner`: :class:`JobRunner`, one job at a time from a worker thread (:class:`Busy`);
- :mod:`~device_app.jobs.start`: jobs built from the config, and :func:`start_training`, shared by the daemon,
  ``hosvd-device train`` and fleet rounds.
"""

from device_app.jobs.runner import Busy, JobRunner
from device_app.jobs.spec import Job, JobKind
from device_app.jobs.start import (
                                   TrainingRun,
                                   TrainOptions,
                                   fleet_start_weights,
    install_fleet_weights,
                                   make_job,
                                   probe_bundle,
                                   resume_point,
                                   start_training,
)
from device_app.jobs.watch import ChildError, ChildRun, run_job

__all__ = ["Busy", "ChildError", "ChildRun", "Job", "JobKind", "JobRunner", "TrainOptions", "TrainingRun",
           "fleet_start_weights", "install_fleet_weights", "make_job", "probe_bundle", "resume_point", "run_job",
           "start_training"]
