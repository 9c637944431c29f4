"""The ledger capability (ledger.core.capability): kept beside the keys, never shown, refused when absent."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from ledger.core.capability import FILE_NAME, Capability, require
from ledger.core.codes import Code
from ledger.core.errors import ConfigError, OperationRefused


def test_given_no_file_then_load_finds_none_and_create_writes_one_mode_0600(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert Capability.load(keys) is None
    made = Capability.load(keys, create=True)
    assert made is not None and made == Capability.load(keys)
    assert (keys / FILE_NAME).stat().st_mode & 0o777 == 0o600
    assert keys.stat().st_mode & 0o777 == 0o700
    assert not [p for p in keys.iterdir() if p.name != FILE_NAME]  # no temporary file left


def test_given_launchers_racing_then_all_end_with_the_same_capability(tmp_path: Path) -> None:
    got: list[Capability | None] = []
    threads = [threading.Thread(target=lambda: got.append(Capability.load(tmp_path, create=True))) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 16 and len(set(got)) == 1 and got[0] is not None


def test_given_a_file_open_to_others_or_a_link_or_garbage_then_config_error(tmp_path: Path) -> None:
    cap = Capability.load(tmp_path, create=True)
    assert cap is not None
    path = tmp_path / FILE_NAME
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="0600"):
        Capability.load(tmp_path)
    os.chmod(path, 0o600)
    path.write_text("not a capability")
    with pytest.raises(ConfigError, match="not a ledger capability"):
        Capability.load(tmp_path)
    path.unlink()
    other = tmp_path / "elsewhere"
    other.write_text(cap.secret)
    os.chmod(other, 0o600)
    path.symlink_to(other)
    with pytest.raises(ConfigError, match="not a link"):
        Capability.load(tmp_path)


def test_given_a_capability_then_no_repr_shows_it() -> None:
    cap = Capability.generate()
    assert cap.secret not in repr(cap) and cap.secret not in str(cap) and cap.secret not in repr([cap])


def test_given_presented_values_then_only_the_capability_itself_is_admitted() -> None:
    cap = Capability.generate()
    assert cap.admits(Capability(cap.secret))
    for wrong in (None, cap.secret, Capability.generate(), "Bearer x", 0, b"", object()):
        assert not cap.admits(wrong)
        with pytest.raises(OperationRefused) as err:
            require(cap, wrong, "top_up")
        assert err.value.code is Code.FORBIDDEN


def test_given_a_purpose_then_the_derived_key_is_stable_and_reveals_nothing() -> None:
    cap = Capability.generate()
    assert cap.derive("detector-caller") == Capability(cap.secret).derive("detector-caller")
    assert cap.derive("detector-caller") != cap.derive("other") != Capability.generate().derive("other")
    assert cap.secret not in cap.derive("detector-caller")
