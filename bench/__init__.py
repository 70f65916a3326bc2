"""Benchmarks of on-device training: memory, speed and accuracy, compression vs vanilla (``python -m bench``).

Modules: :mod:`bench.archs` (the models, BatchNorm calibration, structured inputs), :mod:`bench.suite` (which
runs a suite holds), :mod:`bench.realdata` (the real-data adapter over ``demo``), :mod:`bench.runner` (convert,
then measure in a fresh child), :mod:`bench.child` (the device side: numpy + ai-edge-litert only),
:mod:`bench.report` (Markdown) and :mod:`bench.plots` (PNG).
"""
