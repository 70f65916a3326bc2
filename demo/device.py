"""The simulated device: its TOML config, and ``hosvd-device run --config FILE`` as a child process.

The daemon runs in its own session (process group), so a Ctrl-C in the terminal reaches only the demo,
which then stops the daemon in order: SIGTERM (the daemon publishes ``offline`` and exits), and after a grace
period SIGKILL to the whole group, so a training child it left behind goes too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TomlValue = str | int | float | bool | list[str]


def _toml_value(value: TomlValue) -> str:
    """One TOML value (strings JSON-escaped, which TOML basic strings accept)."""
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML: {value!r}")


def to_toml(sections: dict[str, dict[str, TomlValue]], arrays: dict[str, list[dict[str, TomlValue]]]) -> str:
    """A small TOML document: ``[section]`` tables, then ``[[array]]`` tables; ``None`` values left out.

    Args:
        sections: section name -> key -> value.
        arrays: array-of-tables name -> list of tables.

    Returns:
        The document text.
    """
    lines: list[str] = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
        lines.append("")
    for name, tables in arrays.items():
        for table in tables:
            lines.append(f"[[{name}]]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
            lines.append("")
    return "\n".join(lines)


def write_config(path: Path, sections: dict[str, dict[str, Any]], sources: list[dict[str, Any]]) -> Path:
    """Write the device's TOML config file and validate it with the daemon's own loader when available.

    Raises:
        device_app.config.ConfigError: the daemon would refuse the file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(sections, {"sources": sources}))
    from device_app.config import load_config

    load_config(path)
    log.info("Wrote device config %s", path)
    return path


def device_command(config: Path) -> list[str]:
    """``hosvd-device run --config FILE``: the console script next to this interpreter, else the module."""
    script = Path(sys.executable).parent / "hosvd-device"
    if script.is_file():
        return [str(script), "run", "--config", str(config)]
    return [
        sys.executable,
        "-c",
        "import sys; from device_app.cli import main; sys.exit(main())",
        "run",
        "--config",
        str(config),
    ]


def stop_group(proc: subprocess.Popen, name: str, timeout_s: float = 15.0) -> None:
    """SIGTERM a child we started in its own session; SIGKILL its process group if it is still up after
    ``timeout_s`` (the group id is the child's pid, still ours because the child is not reaped yet)."""
    if proc.poll() is not None:
        return
    log.debug("Stopping %s (pid %d)", name, proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %d) did not stop within %.0f s; killing its process group", name, proc.pid, timeout_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def device_process(config: Path, log_path: Path) -> Iterator[subprocess.Popen]:
    """Run the device daemon for the duration of the ``with`` block, its output going to ``log_path``
    (overwritten).

    Yields:
        The running process.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            device_command(config),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.info("Started the device daemon (pid %d), log %s", proc.pid, log_path)
        try:
            yield proc
        finally:
            stop_group(proc, "device daemon")
            log.info("Stopped the device daemon (exit code %s)", proc.returncode)
