"""MQTT request payloads: one dataclass per command, validated once at the boundary.

A request arrives on ``<base>/<device_id>/request/<command>`` as a JSON object (an empty payload is ``{}``)
with an optional ``transaction`` (string or integer) that the response echoes. Unknown commands, payloads
over the size limit, invalid JSON, unknown keys and wrong types all raise :class:`RequestError` with a
message that names the problem; the daemon sends it back as an error response.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from device_app.config import NAME_PATTERN
from device_app.schema import collect, spec

LABEL_PATTERN = r"[^\x00-\x1f]{1,64}"
MAX_ID = 2**63 - 1  # SQLite's largest rowid


class RequestError(ValueError):
    """A request that cannot be carried out as sent."""


@dataclass(frozen=True, kw_only=True)
class Request:
    transaction: str | int | None = spec(None, doc="echoed in the response")


@dataclass(frozen=True, kw_only=True)
class TrainRequest(Request):
    steps: int | None = spec(None, doc="optimizer steps; default [training] steps", min=1, max=1_000_000)
    batch_size: int | None = spec(None, doc="one of the bundle's train batch sizes", min=1)
    learning_rate: float | None = spec(None, doc="learning rate for this run", min=0.0, max=10.0)
    fleet_round: bool = spec(False, doc="start from the global weights a fleet ClientApp left in "
                                        "<state_dir>/fleet/global.npz (docs/fleet.md)")


@dataclass(frozen=True, kw_only=True)
class EvaluateRequest(Request):
    split: str = spec("val", doc="which stored windows", choices=["val", "train", "all"])
    fleet_round: bool = spec(False, doc="evaluate the fleet's global weights in <state_dir>/fleet/global.npz "
                                        "instead of the newest checkpoint")


@dataclass(frozen=True, kw_only=True)
class LabelRequest(Request):
    label: str = spec(doc="one of the bundle's labels", pattern=LABEL_PATTERN)
    ids: list[int] | None = spec(None, doc="window ids to label", max_len=10000, item_min=1,  # noqa: RUF009
                                 item_max=MAX_ID)
    last: int | None = spec(None, doc="or: the newest N windows", min=1, max=100000)


@dataclass(frozen=True, kw_only=True)
class CollectRequest(Request):
    action: str = spec(doc="start or stop collecting", choices=["start", "stop"])
    label: str | None = spec(None, doc="label for the windows collected now", pattern=LABEL_PATTERN)
    split: str = spec("auto", doc="split for the windows collected now", choices=["auto", "train", "val"])
    windows: int | None = spec(None, doc="stop after this many windows", min=1, max=1_000_000)
    sources: list[str] | None = spec(None, doc="source names; default all", max_len=32)  # noqa: RUF009
    replay: bool = spec(False, doc="csv sources: play every file again from its start, even the windows "
                                   "already stored (by default a replay resumes where it got to)")


@dataclass(frozen=True, kw_only=True)
class ReloadRequest(Request):
    bundle: str = spec(doc="bundle name inside the bundles directory (never a path)", pattern=NAME_PATTERN)


COMMANDS: dict[str, type[Request]] = {
    "train": TrainRequest, "stop": Request, "evaluate": EvaluateRequest, "status": Request,
    "label": LabelRequest, "collect": CollectRequest, "rollback": Request, "reload": ReloadRequest,
    "install_fleet": Request,
}


def _loads(payload: bytes) -> Any:
    """JSON of a request payload; nesting too deep for the parser is invalid JSON too."""
    try:
        return json.loads(payload)
    except RecursionError as err:
        raise ValueError("nested too deeply") from err


def transaction_of(payload: bytes) -> str | int | None:
    """The request's transaction if the payload is readable enough to have one (for error responses)."""
    try:
        data = _loads(payload)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    value = data.get("transaction") if isinstance(data, dict) else None
    return value if isinstance(value, str | int) and not isinstance(value, bool) else None


def parse_request(command: str, payload: bytes, max_bytes: int) -> Request:
    """Validate one request.

    Args:
        command: the last topic level.
        payload: the raw MQTT payload.
        max_bytes: ``[mqtt] max_payload_bytes``.

    Returns:
        The request dataclass of that command.

    Raises:
        RequestError: naming the problem (size, command, JSON, keys, types, ranges).
    """
    if len(payload) > max_bytes:
        raise RequestError(f"payload is {len(payload)} bytes, the limit is {max_bytes} "
                           "([mqtt] max_payload_bytes)")
    if command not in COMMANDS:
        raise RequestError(f"unknown command {command!r}; allowed: {sorted(COMMANDS)}")
    try:
        data: Any = _loads(payload) if payload.strip() else {}
    except ValueError as err:
        raise RequestError(f"payload is not valid JSON: {err}") from err
    request, problems = collect(COMMANDS[command], data, f"request {command}:")
    if problems:
        raise RequestError("; ".join(problems))
    assert request is not None
    if isinstance(request, LabelRequest) and (request.ids is None) == (request.last is None):
        raise RequestError("request label: give exactly one of ids or last")
    return request
