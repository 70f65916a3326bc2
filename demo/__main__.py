"""``python -m demo``: a factory model learns a new user's motions on a simulated device, over MQTT."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from demo.broker import parse_broker


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="Pre-train a small model ('factory'), convert it with HOSVD compression, and let a "
        "simulated device learn a new user's recordings over MQTT; print and save the before/after summary.",
    )
    from demo.run import DEMOS

    parser.add_argument(
        "--dataset",
        choices=DEMOS,
        default="digits-wide",
        help="digits-wide (default: 8x8 digits through wide 32x32 activations; fit picks the depth under the RAM "
        "ceiling and the device refuses a deeper vanilla bundle), basicmotions (smartwatch IMU) or digits",
    )
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory (default demo-out)")
    parser.add_argument(
        "--broker",
        type=parse_broker,
        metavar="HOST[:PORT]",
        help="use this MQTT broker (e.g. Mosquitto) instead of starting an embedded one",
    )
    parser.add_argument("--fast", action="store_true", help="fewer training steps (used by the tests)")
    parser.add_argument("--seed", type=int, default=0, help="data split and initialisation seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return the process exit code."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for noisy in ("absl", "tensorflow", "h5py", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from demo.mqtt_client import DeviceError
    from demo.run import Options, run, summary_text

    # Ctrl-C and SIGTERM (e.g. a CI timeout) take the same ordered shutdown path, even when started from a
    # shell that ignores SIGINT for background jobs.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    options = Options(
        dataset=args.dataset,
        out_dir=args.out,
        broker=args.broker,
        fast=args.fast,
        seed=args.seed,
        progress_bar=not args.no_progress,
    )
    try:
        summary = run(options)
    except KeyboardInterrupt:
        print("\ninterrupted: everything the demo started has been stopped", file=sys.stderr)
        return 130
    except DeviceError as err:
        print(f"demo failed: {err}\n(device log: {args.out / 'device' / 'device.log'})", file=sys.stderr)
        return 1
    print()
    print(summary_text(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
