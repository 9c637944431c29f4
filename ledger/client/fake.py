"""FakeLedger: what unit tests of the gate, the ingress and the console use instead of the
Ray-backed `LedgerClient`. It implements `ledger.core.api.LedgerApi` with the real shard and
coordinator cores on a throwaway SQLite file (`InProcessLedger`), so a test that passes
against it passes for the ledger's real rules, not for a hand-rolled imitation of them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ledger.client.inprocess import InProcessLedger
from ledger.core.settings import LedgerSettings


class FakeLedger(InProcessLedger):
    def __init__(self, directory: Path | None = None, **settings: Any) -> None:
        self._tmp = None if directory is not None else tempfile.TemporaryDirectory(prefix="fake-ledger-")
        root = Path(directory or self._tmp.name)  # type: ignore[union-attr]
        super().__init__(
            LedgerSettings(
                database_url=f"sqlite:///{root / 'ledger.db'}", data_dir=root, sweep_interval_s=0, **settings
            )
        )

    def close(self) -> None:
        super().close()
        if self._tmp is not None:
            self._tmp.cleanup()
