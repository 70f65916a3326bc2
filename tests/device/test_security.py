"""The daemon reaches brokers that require a username/password or TLS with the config's credentials; wrong
credentials give a clear error and retries with backoff, not a crash."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from conftest import Broker, idle, make_password_file, make_tls_files, wait_until


def _attempt_times(log: str, needle: str) -> list[float]:
    stamps = []
    for line in log.splitlines():
        if needle in line:
            m = re.match(r"\d{4}-\d\d-\d\d (\d\d):(\d\d):(\d\d),(\d{3})", line)
            if m:
                h, mi, s, ms = (int(g) for g in m.groups())
                stamps.append(h * 3600 + mi * 60 + s + ms / 1000)
    return stamps


def test_password_broker_right_and_wrong_credentials(tmp_path: Path, client_factory, device_factory) -> None:
    pw = make_password_file(tmp_path, {"pi": "s3cret", "tester": "t3st"})
    broker = Broker(tmp_path, extra=["allow_anonymous false", f"password_file {pw}"]).start()
    try:
        secret = tmp_path / "mqtt-password"
        secret.write_text("s3cret\n")
        good = device_factory(broker.port, mqtt={"username": "pi", "password_file": str(secret)}).start()
        bad = device_factory(broker.port, device={"id": "dev2"},
                             mqtt={"username": "pi", "password": "wrong", "reconnect_min_s": 0.2,
                                   "reconnect_max_s": 0.8}).start()
        cl = client_factory(broker.port, username="tester", password="t3st")
        assert cl.wait("status", idle, timeout=60)["device_id"] == "dev1"
        assert cl.request("status")["status"] == "ok"

        needle = "refused the connection: Not authorized (check [mqtt] username and password)"
        wait_until(lambda: len(_attempt_times(bad.log(), needle)) >= 4, 30, "four refused connection attempts",
                   lambda: bad.log()[-2000:])
        times = _attempt_times(bad.log(), needle)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # 0.2 s doubling up to 0.8 s; a busy machine only makes the gaps longer, so only lower bounds are checked
        assert gaps[0] >= 0.15 and max(gaps) >= 0.7, gaps
        assert bad.alive() and "Traceback" not in bad.log()
        assert good.alive()
    finally:
        broker.stop()


def test_tls_broker_with_the_test_ca(tmp_path: Path, client_factory, device_factory) -> None:
    tls = make_tls_files(tmp_path / "tls")
    broker = Broker(tmp_path, extra=[f"cafile {tls['ca']}", f"certfile {tls['cert']}",
                                     f"keyfile {tls['key']}"]).start()
    try:
        dev = device_factory(broker.port, mqtt={"tls": True, "ca_file": str(tls["ca"])}).start()
        cl = client_factory(broker.port, ca_file=str(tls["ca"]))
        assert cl.wait("status", idle, timeout=60)["device_id"] == "dev1"
        assert cl.request("status")["status"] == "ok"
        assert dev.alive()
        # without the CA the certificate cannot be verified: logged, retried, no crash
        untrusting = device_factory(broker.port, device={"id": "dev3"}, mqtt={"tls": True}).start()
        wait_until(lambda: untrusting.log().count("certificate verify failed") >= 2, 30,
                   "two failed certificate checks", lambda: untrusting.log()[-2000:])
        assert untrusting.alive()
    finally:
        broker.stop()
