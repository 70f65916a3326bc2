"""The demo, stage by stage: data, factory model, bundle, device, MQTT training, evaluation, report.

Everything the demo starts (broker, device daemon, MQTT client) is entered on one ``ExitStack``, so normal
exit, an error and Ctrl-C all leave through the same ordered shutdown: client, then daemon (SIGTERM, then
SIGKILL to its process group), then broker.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from demo import ceiling, datasets, models, scenario
from demo.broker import BrokerAddress, embedded_broker
from demo.device import device_process, write_config
from demo.mqtt_client import DeviceClient, DeviceError
from demo.report import REPORT_FILE, Summary, plot_report, summary_text, write_summary
from demo.scenario import Scenario

log = logging.getLogger(__name__)

DEVICE_ID = "demo-watch"
BASE_TOPIC = "hosvd-edge"
MIB = float(1 << 20)
VAL_FRACTION = 0.2


@dataclass(frozen=True)
class Settings:
    """Per-data-set choices of the demo (see ``docs/demo.md``)."""

    factory_fraction: float
    device_train_fraction: float
    pretrain_epochs: int
    train_last: int
    batch_size: int
    optimizer: str
    learning_rate: float
    steps: int
    fast_steps: int
    ram_ceiling_mb: int
    data: datasets.DatasetName | None = None  # the data set, when the demo's name is not one
    fit_ceiling: bool = False  # choose the ceiling on the device and the depth with ``fit`` (demo.ceiling)
    bench_only: bool = False  # a benchmark data set without a sampling rate for the device's CSV replay


_BENCH_SENSOR_SET = Settings(
    factory_fraction=0.5,
    device_train_fraction=0.25,
    pretrain_epochs=30,
    train_last=2,
    batch_size=16,
    optimizer="adam",
    learning_rate=3e-3,
    steps=150,
    fast_steps=40,
    ram_ceiling_mb=192,
    bench_only=True,
)


SETTINGS: dict[str, Settings] = {
    "basicmotions": Settings(
        factory_fraction=0.5,
        device_train_fraction=0.25,
        pretrain_epochs=30,
        train_last=2,
        batch_size=8,
        optimizer="adam",
        learning_rate=1e-2,
        steps=150,
        fast_steps=40,
        ram_ceiling_mb=192,
    ),
    "digits": Settings(
        factory_fraction=0.5,
        device_train_fraction=0.2,
        pretrain_epochs=8,
        train_last=2,
        batch_size=16,
        optimizer="adam",
        learning_rate=3e-3,
        steps=150,
        fast_steps=40,
        ram_ceiling_mb=192,
    ),
    "digits-wide": Settings(
        factory_fraction=0.5,
        device_train_fraction=0.2,
        pretrain_epochs=8,
        train_last=0,  # chosen by fit under the ceiling
        batch_size=64,
        optimizer="adam",
        learning_rate=3e-3,
        steps=150,
        fast_steps=40,
        ram_ceiling_mb=0,  # chosen on this device between hosvd's and vanilla's needs (demo.ceiling)
        data="digits",
        fit_ceiling=True,
    ),
    # the two benchmark sensor sets (bench.suite's accuracy suite) share one fine-tuning recipe
    "japanesevowels": _BENCH_SENSOR_SET,
    "plaid": _BENCH_SENSOR_SET,
}
DEMOS = tuple(name for name, s in SETTINGS.items() if not s.bench_only)


@dataclass(frozen=True)
class Options:
    """What the user asked for on the command line."""

    dataset: str = "digits-wide"
    out_dir: Path = Path("demo-out")
    broker: BrokerAddress | None = None
    fast: bool = False
    seed: int = 0
    progress_bar: bool = True


class Timer:
    """Wall-clock seconds per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        log.info("== %s", name)
        try:
            yield
        finally:
            self.seconds[name] = round(time.monotonic() - start, 2)


def prepare_data(name: str, settings: Settings, seed: int) -> Scenario:
    """The demo's scenario for ``name`` with its settings' split fractions (used by ``bench`` too)."""
    return scenario.prepare(settings.data or name, settings.factory_fraction, settings.device_train_fraction, seed)


def _fingerprint(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def factory_model(data: Scenario, name: str, settings: Settings, seed: int, cache_dir: Path) -> Any:
    """The pre-trained "factory" model, from the cache when the same recipe built it before.

    The cache key covers the data set name and contents, seed, epochs and the model's layer configuration, so
    a change to any of them trains again.
    """
    import keras

    model = models.build(name, classes=len(data.factory.labels), seed=seed)
    key = _fingerprint(
        dataset=name,
        seed=seed,
        epochs=settings.pretrain_epochs,
        config=model.to_json(),
        data=hashlib.sha256(data.factory.x.tobytes() + data.factory.y.tobytes()).hexdigest(),
    )
    path = cache_dir / f"factory-{name}-{key}.keras"
    if path.is_file():
        log.info("Using the cached factory model %s", path)
        return keras.saving.load_model(path)
    models.pretrain(model, data.normalise(data.factory.x), data.factory.y, settings.pretrain_epochs, seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.keras")
    model.save(tmp)
    tmp.replace(path)
    log.info("Saved the factory model to %s", path)
    return model


def bundle_options(data: Scenario, settings: Settings) -> dict[str, Any]:
    """The converter options every demo bundle shares: batch, optimizer, input spec, labels, calibration data."""
    factory = data.factory
    input_spec: dict[str, Any] = {"layout": factory.layout}
    if factory.layout == "NLC":
        input_spec.update(
            channels=factory.channels, rate_hz=factory.rate_hz, mean=data.mean.tolist(), std=data.std.tolist()
        )
    rng = np.random.default_rng(0)
    return dict(
        optimizer=settings.optimizer,
        learning_rate=settings.learning_rate,
        input_spec=input_spec,
        labels=factory.labels,
        calibration_data=data.normalise(factory.x[rng.permutation(len(factory))[:64]]),
    )


def convert_bundle(model: Any, data: Scenario, settings: Settings, bundle_dir: Path) -> Any:
    """Convert the factory model into a training bundle with HOSVD compression (see ``converter.convert``).

    Returns:
        The bundle's ``hosvd_contract.Manifest``.
    """
    from converter.convert import convert

    if bundle_dir.exists():
        shutil.rmtree(bundle_dir)
    return convert(
        model,
        bundle_dir,
        train_last=settings.train_last,
        compression="hosvd",
        epsilon=0.8,
        batch_sizes=(settings.batch_size,),
        measure_memory=True,
        progress=lambda stage: log.info("convert: %s", stage),
        **bundle_options(data, settings),
    )


def saved_activation_mib(manifest: Any) -> tuple[float, float]:
    """``(compressed, vanilla)`` saved-activation MiB over the trainable layers (the paper's formula)."""
    layers = [layer for layer in manifest.layers if layer.trainable]
    return (
        sum(layer.saved_bytes_compressed for layer in layers) / MIB,
        sum(layer.saved_bytes_vanilla for layer in layers) / MIB,
    )


def device_config(
    out: Path, broker: BrokerAddress, protocol: str, bundle_name: str, settings: Settings, steps: int,
    ram_ceiling_mb: int,
) -> dict[str, dict[str, Any]]:
    """The device's config sections (see ``docs/device.md`` for every key); sources are added separately."""
    return {
        "device": {"id": DEVICE_ID, "state_dir": str(out / "device" / "state"), "log_level": "INFO"},
        "mqtt": {"host": broker.host, "port": broker.port, "base_topic": BASE_TOPIC, "protocol": protocol},
        "model": {"bundle": bundle_name, "bundles_dir": str(out / "bundles"), "threads": 2},
        "store": {"val_fraction": VAL_FRACTION},
        "training": {
            "ram_ceiling_mb": ram_ceiling_mb,
            "batch_size": settings.batch_size,
            "steps": steps,
            "progress_every": max(1, steps // 30),
            "checkpoint_every": steps,
            "rollback_tolerance": 0.5,
        },
    }


def hand_over_recordings(user: datasets.Dataset, device_dir: Path) -> tuple[list[dict[str, Any]], Path]:
    """Give the new user's recordings to the device before it starts.

    Sensor windows become an Edge Impulse CSV that the daemon's ``csv`` source replays (``pacing = "fast"``):
    the device windows the stream itself, as it would a live sensor. Images have no source plug-in (the
    daemon's sources produce sensor windows), so they are written into the device's window store with the
    store's own API, as a ``collect`` would have left them.

    Returns:
        ``([[sources]] tables, path of the CSV file or the store)``.
    """
    names = [user.labels[i] for i in user.y]
    if user.layout == "NLC":
        csv_path = datasets.write_edge_impulse_csv(
            device_dir / "new-user.csv", user.x, names, user.channels or [], user.rate_hz or 1.0
        )
        return [{"type": "csv", "name": "newuser", "path": str(csv_path), "pacing": "fast"}], csv_path
    from device_app.store import Store

    db_path = device_dir / "state" / "store.sqlite"
    db_path.parent.mkdir(parents=True, exist_ok=True)
    store = Store(db_path, val_fraction=VAL_FRACTION)
    try:
        for x, name in zip(user.x, names, strict=True):
            store.add(x, name, source="newuser")
    finally:
        store.close()
    log.info("Put %d images into the device store %s", len(user), db_path)
    return [], db_path


def evaluate_bundle(bundle_dir: Path, checkpoints_root: Path | None, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of a bundle on raw inputs, with the newest device checkpoint's weights when there is one.

    Uses the device app's own reader (:class:`device_app.bundle.Bundle`, :mod:`device_app.checkpoint`), so the
    numbers are what the device would compute. Without a checkpoint (none given, or the device rolled the run
    back and kept none) the bundle's initial weights are evaluated.
    """
    from device_app import checkpoint
    from device_app.bundle import Bundle

    bundle = Bundle(bundle_dir)
    if checkpoints_root is not None:
        directory = checkpoint.bundle_dir(checkpoints_root, bundle.sha256)
        ckpt = checkpoint.latest(directory, names={w.name for w in bundle.manifest.weights})
        if ckpt is None:
            log.warning("The device kept no checkpoint under %s: evaluating the initial weights", directory)
        else:
            bundle.set_weights(ckpt.weights)
            log.info("Evaluating checkpoint %s (step %d)", ckpt.path, ckpt.step)
    return float(bundle.evaluate(x, y.astype(np.int32))["accuracy"])


def train_over_mqtt(
    client: DeviceClient, steps: int, progress_bar: bool, timeout_s: float
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Send ``train``, show its progress messages as a bar, and return ``(progress, report)``.

    Only messages carrying this request's ``transaction`` count, so another client's training (on a shared
    broker) or a retained report from an earlier run cannot end the wait.

    Raises:
        DeviceError: the device refused, failed, went offline, or did not report within ``timeout_s``.
    """
    from tqdm import tqdm

    transaction = uuid.uuid4().hex
    client.request("train", {"steps": steps, "transaction": transaction}, timeout_s=60)
    progress: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    with tqdm(total=steps, desc="device training", unit="step", disable=not progress_bar, dynamic_ncols=True) as bar:
        while time.monotonic() < deadline:
            message = client.messages(timeout_s=0.5)
            if message is None or not isinstance(message.payload, dict):
                continue
            payload = message.payload
            if message.topic == "status" and not message.retained and _state(payload) in ("error", "offline"):
                raise DeviceError(f"device went {payload.get('state')} while training: {payload}")
            if payload.get("transaction") != transaction:
                continue
            if message.topic == "progress":
                progress.append(payload)
                bar.update(max(0, int(payload.get("step") or 0) - bar.n))
                bar.set_postfix(loss=_fmt(payload.get("loss"), ".3f"), rss=_fmt(payload.get("rss_mb"), ".0f") + "MB")
            elif message.topic == "report":
                if payload.get("status") == "error":
                    raise DeviceError(f"training failed on the device: {payload.get('error')}")
                bar.update(steps - bar.n)
                return progress, payload
    raise DeviceError(f"no training report within {timeout_s:.0f} s")


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, int | float) else "?"


def _state(payload: Any) -> str | None:
    return payload.get("state") if isinstance(payload, dict) else None


class DeviceSession:
    """Starts the device daemon with the demo's config and recordings; several runs share its state directory
    (the CSV replay resumes where it stopped, so a second run stores no window twice)."""

    def __init__(self, out: Path, broker: BrokerAddress, protocol: str, settings: Settings, steps: int,
                 sources: list[dict[str, Any]], windows: int) -> None:
        self.out, self.broker, self.protocol = out, broker, protocol
        self.settings, self.steps, self.sources, self.windows = settings, steps, sources, windows

    @contextlib.contextmanager
    def running(self, bundle: str, ram_ceiling_mb: int, name: str = "device"
                ) -> Iterator[tuple[DeviceClient, dict[str, Any], Path]]:
        """The daemon with ``bundle`` under ``ram_ceiling_mb``, idle with every recording stored.

        Yields:
            ``(client, status, config path)``; the config and log are ``device/<name>.toml`` and ``.log``.
        """
        sections = device_config(self.out, self.broker, self.protocol, bundle, self.settings, self.steps,
                                 ram_ceiling_mb)
        config_path = write_config(self.out / "device" / f"{name}.toml", sections, self.sources)
        with DeviceClient(self.broker, DEVICE_ID, BASE_TOPIC, self.protocol) as client, \
                device_process(config_path, self.out / "device" / f"{name}.log"):
            client.wait_for_state({"idle", "collecting"}, timeout_s=120, live=True)
            status = wait_for_windows(client, expected=self.windows, timeout_s=120)
            yield client, status, config_path


def fit_on_device(model: Any, data: Scenario, settings: Settings, bundles_dir: Path, name: str,
                  device: DeviceSession, timer: Timer) -> ceiling.CeilingFit:
    """Choose the ceiling from what this device needs for both methods at full depth, then fit under it
    (see :mod:`demo.ceiling`)."""
    options = bundle_options(data, settings)
    with timer.stage("full depth"):
        full = ceiling.measure_full_depth(model, options, settings.batch_size, bundles_dir, name)
    with timer.stage("device base"):
        with device.running(full.vanilla_bundle, ceiling.PROBE_CEILING_MB, name="device-probe") as (client, _, _):
            base = ceiling.device_base(client.refusal("train", {"steps": device.steps}, timeout_s=120))
        log.info("The device holds %.0f MiB besides the training step (margin %.0f MiB)", base.base_mb,
                 base.margin_mb)
    with timer.stage("fit"):
        fitted = ceiling.fit_bundles(model, options, settings.batch_size, bundles_dir, name, full, base)
    log.info("RAM ceiling %d MiB: hosvd trains the last %d layers, vanilla the last %d", fitted.ceiling_mb,
             fitted.hosvd.chosen.train_last, fitted.vanilla.chosen.train_last)
    return fitted


def run(options: Options) -> Summary:
    """Run the whole demo and return its summary (also written to ``<out>/demo-summary.json``)."""
    settings = SETTINGS[options.dataset]
    steps = settings.fast_steps if options.fast else settings.steps
    out = options.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    timer = Timer()

    with timer.stage("data"):
        data = prepare_data(options.dataset, settings, options.seed)
    with timer.stage("factory model"):
        model = factory_model(data, options.dataset, settings, options.seed, out / "cache")
        factory_acc = models.accuracy(model, data.normalise(data.user_holdout_unshifted.x), data.user_holdout.y)
        log.info("Factory model on the held-out recordings: %.1f%% as recorded", 100 * factory_acc)
    bundle_name = f"{options.dataset}-hosvd"
    bundle_dir = out / "bundles" / bundle_name
    state_dir = out / "device" / "state"
    shutil.rmtree(state_dir, ignore_errors=True)  # a fresh device every run: empty store, no checkpoints
    user = data.user_train
    sources, recordings = hand_over_recordings(user, out / "device")
    with contextlib.ExitStack() as stack:
        with timer.stage("broker"):
            if options.broker is None:
                broker, protocol = stack.enter_context(embedded_broker()), "3.1.1"
            else:
                broker, protocol = options.broker, "5"
        device = DeviceSession(out, broker, protocol, settings, steps, sources, len(user))
        fitted: ceiling.CeilingFit | None = None
        if settings.fit_ceiling:
            fitted = fit_on_device(model, data, settings, out / "bundles", options.dataset, device, timer)
            manifest, ram_ceiling_mb = fitted.hosvd.manifest, fitted.ceiling_mb
        else:
            with timer.stage("convert"):
                manifest, ram_ceiling_mb = convert_bundle(model, data, settings, bundle_dir), settings.ram_ceiling_mb
        saved, saved_vanilla = saved_activation_mib(manifest)
        with timer.stage("accuracy before"):
            before = evaluate_bundle(bundle_dir, None, data.user_holdout.x, data.user_holdout.y)

        first_bundle = fitted.refused_bundle if fitted is not None else bundle_name
        with timer.stage("device start"):
            client, status, config_path = stack.enter_context(device.running(first_bundle, ram_ceiling_mb))
        refusal = None
        if fitted is not None:
            with timer.stage("vanilla refused"):
                refusal = client.refusal("train", {"steps": steps}, timeout_s=120)
                log.info("The device refused the vanilla bundle %s: %s", fitted.refused_bundle, refusal)
                client.request("reload", {"bundle": bundle_name}, timeout_s=120)
        with timer.stage("device training"):
            progress, report = train_over_mqtt(client, steps, options.progress_bar, timeout_s=600)
        with timer.stage("device evaluate"):
            device_eval = client.request("evaluate", {"split": "val"}, timeout_s=120)
            log.info("The device's own evaluation of its validation windows: %s", device_eval)

    with timer.stage("accuracy after"):
        after = evaluate_bundle(bundle_dir, state_dir / "checkpoints", data.user_holdout.x, data.user_holdout.y)

    peaks = [float(report[k]) for k in ("peak_rss_mb", "watched_peak_rss_mb") if report.get(k) is not None]
    peak = max(peaks) if peaks else None
    daemon_rss = status.get("daemon_rss_mb")
    summary = Summary(
        dataset=options.dataset,
        accuracy_before=before,
        accuracy_after=after,
        peak_rss_mib=peak,
        daemon_rss_mib=float(daemon_rss) if daemon_rss is not None else None,
        ram_ceiling_mib=float(ram_ceiling_mb),
        saved_activation_mib=saved,
        saved_activation_mib_vanilla=saved_vanilla,
        factory_accuracy=factory_acc,
        holdout_samples=len(data.user_holdout),
        device_train_windows=len(user),
        train_steps=steps,
        batch_size=settings.batch_size,
        compression="hosvd",
        epsilon=0.8,
        train_last=manifest.train_last,
        broker=f"{'embedded amqtt' if options.broker is None else 'external'} {broker}",
        seconds=timer.seconds,
        paths={
            "out_dir": str(out),
            "bundle": str(bundle_dir),
            "device_config": str(config_path),
            "device_log": str(out / "device" / "device.log"),
            "recordings": str(recordings),
            "report": str(out / REPORT_FILE),
            "summary": str(out / "demo-summary.json"),
        },
        device_report=report,
        device_evaluate=device_eval,
        progress=progress,
        ceiling=None if fitted is None else ceiling.ceiling_summary(fitted, refusal, peak, status.get("daemon_rss_mb")),
    )
    plot_report(summary, out / REPORT_FILE)
    write_summary(summary, out)
    log.debug("Settings: %s", asdict(settings))
    return summary


def wait_for_windows(client: DeviceClient, expected: int, timeout_s: float) -> dict[str, Any]:
    """Wait until the device is idle with at least ``expected`` stored windows (the CSV replay is done).

    Returns:
        The device's status.
    """

    def done(payload: Any) -> bool:
        if not isinstance(payload, dict) or payload.get("state") != "idle":
            return False
        samples = payload.get("samples")
        return isinstance(samples, dict) and int(samples.get("total", 0)) >= expected

    return client.wait_for("status", done, timeout_s, f"idle with {expected} stored windows", live=True)


__all__ = ["DEMOS", "SETTINGS", "Options", "Summary", "run", "summary_text"]
