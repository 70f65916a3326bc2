"""The aarch64 tier's own tests run only inside ``make test-arm64``, which sets HOSVD_ARM64_FIXTURES.

``test_on_aarch64.py`` runs in the emulated arm64 root filesystem, ``test_parity.py`` on the x86 host (it runs
the same training there and, through ``tools/arm64/rootfs.sh run``, in the root filesystem). Elsewhere (``make
test``, a real Pi) neither is collected: they need what the tier prepares, so they are not skipped either.
"""

from __future__ import annotations

import os
import platform

ON_ARM = platform.machine() in ("aarch64", "arm64")

collect_ignore: list[str] = []
if not os.environ.get("HOSVD_ARM64_FIXTURES"):
    collect_ignore += ["test_on_aarch64.py", "test_parity.py"]
else:
    collect_ignore.append("test_parity.py" if ON_ARM else "test_on_aarch64.py")
