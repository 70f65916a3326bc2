"""Fleet learning on Flower: devices improve one model together without sharing their windows.

- :mod:`fleet.weights`: what crosses the network (a bundle's trainable weights only) and the checks on it;
- :mod:`fleet.client_app`: the ClientApp a SuperNode runs beside a device: each round is a training job of
  ``device_app`` (planner, child process, RAM ceiling, checkpoints) on the device's own stored windows;
- :mod:`fleet.server_app`: the ServerApp (Flower's FedAvg or FedAdam) that starts from the bundle's weights and
  writes a device checkpoint, a table and a plot after every round;
- :mod:`fleet.cli`: ``hosvd-fleet``, one line to run a federation or start a SuperNode for a device.

See ``docs/fleet.md``.
"""
