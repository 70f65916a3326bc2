"""``hosvd-device``: run the daemon, check a config file, or train once locally with a progress bar."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from device_app.config import DEFAULT_CONFIG, SECTIONS, Config, ConfigError, load_config
from device_app.schema import describe
from device_app.sources import SOURCE_TYPES, options_class

log = logging.getLogger("device_app")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_run(cfg: Config, args: argparse.Namespace) -> int:
    """The daemon, holding the state directory's lock (a second one exits at once, naming the first)."""
    from device_app.statelock import StateDirBusy, StateLock

    try:
        lock = StateLock(cfg.state_dir, "hosvd-device run")
        lock.acquire()
    except (StateDirBusy, OSError) as err:
        print(f"hosvd-device run: {err}", file=sys.stderr)
        return 1
    try:
        from device_app.daemon import Daemon

        return Daemon(cfg).run()
    finally:
        lock.release()


def cmd_check(cfg: Config, args: argparse.Namespace) -> int:
    print(f"{cfg.path}: OK")
    print(f"  device {cfg.device.id}, state in {cfg.state_dir}")
    print(f"  broker {'mqtts' if cfg.mqtt.tls else 'mqtt'}://{cfg.mqtt.host}:{cfg.mqtt.port}, topics under "
          f"{cfg.mqtt.base_topic}/{cfg.device.id}/")
    print(f"  bundle {cfg.model.bundle} in {cfg.bundles_dir}")
    print(f"  sources: {', '.join(f'{s.name} ({s.type})' for s in cfg.sources) or 'none'}")
    print(f"  ram ceiling: {cfg.training.ram_ceiling_mb or 'none'} MiB")
    if cfg.homeassistant.enabled:
        from device_app.homeassistant import discovery_topic

        topic = discovery_topic(cfg.homeassistant, cfg.mqtt.base_topic, cfg.device.id)
        print(f"  home assistant: announced on {topic}")
    else:
        print("  home assistant: off")
    return 0


def _collect_first(cfg: Config, seconds: float) -> None:
    """Run the autostart sources for ``seconds`` (or until they end) into the store."""
    from device_app.bundle import resolve_bundle
    from device_app.collector import Collector
    from device_app.sources.base import SourceContext
    from device_app.store import Store
    from device_app.windowing import check_sources_fit
    from hosvd_contract import load_manifest

    manifest = load_manifest(resolve_bundle(cfg.bundles_dir, cfg.model.bundle))
    check_sources_fit(cfg.sources, manifest.input, cfg.model.bundle)
    store = Store(cfg.db_path, cfg.store.max_samples, cfg.store.val_fraction)
    collector = Collector(cfg.sources, SourceContext.for_input(manifest.input), manifest.input.shape[0], store)
    collector.autostart()
    deadline = time.monotonic() + seconds
    while collector.active() and time.monotonic() < deadline:
        time.sleep(0.1)
    collector.stop()
    log.info("Store now holds %s", store.counts())
    store.close()


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def cmd_train(cfg: Config, args: argparse.Namespace) -> int:
    """One local training run on what the store holds, with a tqdm progress bar (:func:`start_training`)."""
    from tqdm import tqdm

    from device_app.jobs import ChildError, TrainOptions, start_training
    from device_app.plan import PlanError
    from device_app.statelock import StateDirBusy, StateLock
    from hosvd_contract import BundleError

    options = TrainOptions(steps=args.steps or None, batch_size=args.batch_size or None,
                           learning_rate=args.learning_rate, progress_every=1)
    try:
        with StateLock(cfg.state_dir, "hosvd-device train"):
            if args.collect_seconds:
                _collect_first(cfg, args.collect_seconds)
            steps = options.steps or cfg.training.steps
            with tqdm(total=steps, unit="step", desc=f"train {cfg.model.bundle}", file=sys.stderr) as bar:

                def progress(event: dict) -> None:
                    bar.n = event["step"]
                    bar.set_postfix(loss=f"{event['loss']:.4f}", rss=f"{event['rss_mb']}MiB", refresh=False)
                    bar.refresh()

                result = start_training(cfg, options, on_progress=progress).wait()
    except (BundleError, PlanError, ChildError, StateDirBusy, OSError) as err:
        print(f"hosvd-device train: {err}", file=sys.stderr)
        return 1
    if result["status"] == "error":
        print(f"hosvd-device train: {result['error']}", file=sys.stderr)
        return 1
    print(f"{result['status']}: {result['steps_done']} steps, loss {_number(result['first_loss'])} -> "
          f"{_number(result['final_loss'])}, val {result['val_before']} -> {result['val_after']}, "
          f"peak RSS {result['peak_rss_mb']} MiB, checkpoint {result['checkpoint']}")
    if result["reason"]:
        print(result["reason"])
    return 0 if result["status"] == "ok" else 3


def cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    """The daemon's state, store counts, training and last report from the state directory (no MQTT)."""
    import json

    from device_app.snapshot import look, render

    view = look(cfg)
    print(json.dumps(view, indent=2, default=str) if args.json else render(view))
    return 0 if view["running"] else 3


def cmd_ha_remove(cfg: Config, args: argparse.Namespace) -> int:
    """Remove the device from Home Assistant (an empty retained discovery config)."""
    from device_app.homeassistant import remove

    try:
        topic = remove(cfg, force=args.force)
    except RuntimeError as err:
        print(f"hosvd-device ha-remove: {err}", file=sys.stderr)
        return 1
    print(f"removed the device from Home Assistant: cleared {topic}")
    return 0


def explain() -> str:
    """The config reference as text (every key, type, default and meaning)."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"[{name}]")
        lines += [f"  {k} ({t}, default {d}): {doc}" for k, t, d, doc in describe(cls)]
    for kind in SOURCE_TYPES:
        lines.append(f"[[sources]] type = \"{kind}\"")
        lines += [f"  {k} ({t}, default {d}): {doc}" for k, t, d, doc in describe(options_class(kind))
                  if k != "type"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hosvd-device", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon (foreground)")
    run.add_argument("--config", default=DEFAULT_CONFIG)
    check = sub.add_parser("check-config", help="validate a config file and print a summary")
    check.add_argument("file", nargs="?", default=None)
    check.add_argument("--config", default=None)
    check.add_argument("--explain", action="store_true", help="print every key with its default")
    train = sub.add_parser("train", help="one local training run (no MQTT) with a progress bar")
    train.add_argument("--config", default=DEFAULT_CONFIG)
    train.add_argument("--steps", type=int, default=0)
    train.add_argument("--batch-size", type=int, default=0)
    train.add_argument("--learning-rate", type=float, default=None)
    train.add_argument("--collect-seconds", type=float, default=0.0,
                       help="first run the autostart sources this long (or until they end)")
    status = sub.add_parser("status", help="the daemon's state at a glance, from its state directory (no MQTT)")
    status.add_argument("--config", default=DEFAULT_CONFIG)
    status.add_argument("--json", action="store_true", help="print it as JSON")
    ha_remove = sub.add_parser("ha-remove", help="remove the device from Home Assistant (stop the daemon first)")
    ha_remove.add_argument("--config", default=DEFAULT_CONFIG)
    ha_remove.add_argument("--force", action="store_true", help="even if the daemon's status says it runs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config" and args.explain:
        print(explain())
        return 0
    path = (args.file or args.config or DEFAULT_CONFIG) if args.command == "check-config" else args.config
    try:
        cfg = load_config(path)
    except ConfigError as err:
        print(f"hosvd-device: {err}", file=sys.stderr)
        return 2
    _setup_logging(cfg.device.log_level)
    handler = {"run": cmd_run, "check-config": cmd_check, "train": cmd_train, "status": cmd_status,
               "ha-remove": cmd_ha_remove}[args.command]
    return handler(cfg, args)


if __name__ == "__main__":
    sys.exit(main())
