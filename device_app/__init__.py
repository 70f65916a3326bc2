"""hosvd-edge device daemon: sensors -> SQLite store -> MQTT-triggered training inside a RAM ceiling.

Never imports TensorFlow. The interpreter comes from ai-edge-litert or tflite-runtime
(:mod:`device_app.runtime`), and only training/evaluation child processes load it, so the daemon's own
resident memory stays small.
"""

__version__ = "0.1.0"
