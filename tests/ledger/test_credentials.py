"""ledger.core.credentials: key ring on disk, issue/verify round trip, and the attack matrix."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import stat
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.core.codes import Code
from ledger.core.credentials import (
    ALGORITHMS,
    AUDIENCE,
    ISSUER,
    Claims,
    KeyRing,
    Verifier,
    issue,
    new_id,
    new_jti,
)
from ledger.core.errors import ConfigError, CredentialError

NOW = 1_700_000_000
DROP = object()  # marks a claim to leave out


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


@pytest.fixture
def ring(key_dir: Path, clock: FakeClock) -> KeyRing:
    return KeyRing.open(key_dir, clock=clock)


@pytest.fixture
def verifier(ring: KeyRing, clock: FakeClock) -> Verifier:
    return Verifier(ring.public_keys(), clock=clock)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(obj: object) -> str:
    return b64(json.dumps(obj).encode())


def claims(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "tok_1",
        "pkg": "pkg_1",
        "jti": "jti_1",
        "iat": NOW,
        "exp": NOW + 3600,
        "typ": "access",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not DROP}


def private_key(ring: KeyRing, key_dir: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key((key_dir / f"{ring.active_kid}.pem").read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


def hand_signed(key: Ed25519PrivateKey, header: object, payload: object) -> str:
    """A compact JWS built by hand, so any header or payload (even invalid JSON types) can be signed."""
    signing_input = f"{segment(header)}.{segment(payload)}"
    return f"{signing_input}.{b64(key.sign(signing_input.encode()))}"


def valid_token(ring: KeyRing) -> str:
    return issue(ring, sub="tok_1", pkg="pkg_1", jti="jti_1", typ="access", exp=NOW + 3600)


def refused(verifier: Verifier, credential: object, code: Code = Code.INVALID_TOKEN) -> CredentialError:
    with pytest.raises(CredentialError) as info:
        verifier.verify(credential)  # type: ignore[arg-type]
    assert info.value.code is code
    if isinstance(credential, str) and len(credential) >= 16:
        assert credential not in str(info.value)  # never echo the credential
    return info.value


# ----------------------------------------------------------------------------- happy path


def test_given_issued_credential_when_verified_then_claims_round_trip(ring: KeyRing, verifier: Verifier) -> None:
    token = issue(ring, sub="tok_a", pkg="pkg_root", jti="jti_x", typ="admin", exp=NOW + 60)

    got = verifier.verify(token)

    assert got == Claims(
        sub="tok_a", pkg="pkg_root", jti="jti_x", typ="admin", iat=NOW, exp=NOW + 60, kid=ring.active_kid
    )
    assert jwt.get_unverified_header(token)["alg"] == "EdDSA"


@pytest.mark.parametrize("prefix", ["Bearer ", "bearer ", "BEARER ", "bEaReR "])
def test_given_bearer_prefix_when_verified_then_accepted(ring: KeyRing, verifier: Verifier, prefix: str) -> None:
    assert verifier.verify(prefix + valid_token(ring)).sub == "tok_1"


def test_given_times_within_leeway_when_verified_then_accepted(ring: KeyRing, verifier: Verifier) -> None:
    token = issue(ring, sub="t", pkg="p", jti="j", typ="access", exp=NOW - 3, now=NOW - 100)
    early = ring.sign(claims(iat=NOW + 4, nbf=NOW + 4.5))

    assert verifier.verify(token).exp == NOW - 3
    assert verifier.verify(early).iat == NOW + 4


def test_given_past_nbf_when_verified_then_accepted(ring: KeyRing, verifier: Verifier) -> None:
    assert verifier.verify(ring.sign(claims(nbf=NOW - 10))).sub == "tok_1"


URL_SAFE_20 = r"[A-Za-z0-9_-]{20}"


def test_new_id_is_prefixed_url_safe_and_unique() -> None:
    ids = {new_id("tok") for _ in range(10_000)}
    from_trailing = [new_id("pkg_") for _ in range(10_000)]

    # ids are opaque: read by their prefix, never split on "_", so a random part may begin with "_" or "-"
    assert len(ids) == 10_000
    assert all(re.fullmatch(f"tok_{URL_SAFE_20}", i) for i in ids)
    assert all(re.fullmatch(f"pkg_{URL_SAFE_20}", i) for i in from_trailing)  # the prefix's "_" is not doubled
    assert len(set(from_trailing)) == 10_000
    assert re.fullmatch(f"jti_{URL_SAFE_20}", new_jti()) and new_jti() != new_jti()


@pytest.mark.parametrize("random_part", ["_" * 20, "-" * 20, "_-" + "A" * 18, "-_" + "0" * 18])
def test_given_a_random_part_starting_with_a_separator_when_new_id_then_prefix_underscore_and_that_part(
    monkeypatch: pytest.MonkeyPatch, random_part: str
) -> None:
    asked: list[int] = []

    def token_urlsafe(nbytes: int) -> str:
        asked.append(nbytes)
        return random_part

    monkeypatch.setattr(secrets, "token_urlsafe", token_urlsafe)

    assert new_id("pkg_") == new_id("pkg") == f"pkg_{random_part}"
    assert asked == [15, 15]  # 120 random bits, 20 url-safe characters


@pytest.mark.parametrize("prefix", ["", "_", "1abc", "a/b", "tok-x", "a" * 17])
def test_given_bad_prefix_when_new_id_then_value_error(prefix: str) -> None:
    with pytest.raises(ValueError):
        new_id(prefix)


@pytest.mark.parametrize(
    "changes",
    [{"sub": ""}, {"pkg": "x" * 257}, {"typ": "root"}, {"exp": NOW}, {"exp": NOW - 1}, {"jti": 5}],
)
def test_given_bad_arguments_when_issue_then_value_error(ring: KeyRing, changes: dict[str, object]) -> None:
    args: dict[str, object] = {"sub": "t", "pkg": "p", "jti": "j", "typ": "access", "exp": NOW + 60, **changes}
    with pytest.raises(ValueError):
        issue(ring, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("exp", [None, "123", 1.5, True])
def test_given_non_int_exp_when_sign_then_type_error(ring: KeyRing, exp: object) -> None:
    with pytest.raises(TypeError):
        ring.sign(claims(exp=exp))


# ------------------------------------------------------------------------------ key ring


def test_given_new_ring_then_dir_is_0700_and_every_file_0600(ring: KeyRing, key_dir: Path) -> None:
    ring.rotate()

    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    files = sorted(p.name for p in key_dir.iterdir())
    assert len(files) == 3 and "index.json" in files  # two keys + index, no temp files left
    assert all(stat.S_IMODE((key_dir / f).stat().st_mode) == 0o600 for f in files)


def test_given_existing_ring_when_reopened_then_same_keys_and_active_kid(ring: KeyRing, key_dir: Path) -> None:
    token = valid_token(ring)

    again = KeyRing.open(key_dir, clock=ring.clock)

    assert again.active_kid == ring.active_kid
    assert again.public_keys() == ring.public_keys()
    assert Verifier(again.public_keys(), clock=ring.clock).verify(token).kid == ring.active_kid


def test_given_rotation_when_verifying_then_old_tokens_verify_and_new_ones_carry_new_kid(
    ring: KeyRing, clock: FakeClock
) -> None:
    old_kid, old = ring.active_kid, valid_token(ring)

    new_kid = ring.rotate()
    new = valid_token(ring)
    verifier = Verifier(ring.public_keys(), clock=clock)

    assert new_kid == ring.active_kid != old_kid
    assert set(ring.public_keys()) == {old_kid, new_kid}
    assert verifier.verify(old).kid == old_kid
    assert verifier.verify(new).kid == new_kid
    assert jwt.get_unverified_header(new)["kid"] == new_kid


def test_given_retired_key_when_pruned_then_removed_only_once_its_last_exp_passed(
    ring: KeyRing, key_dir: Path, clock: FakeClock
) -> None:
    old_kid = ring.active_kid
    token = issue(ring, sub="t", pkg="p", jti="j", typ="access", exp=NOW + 100)
    issue(ring, sub="t", pkg="p", jti="j", typ="access", exp=NOW + 50)  # an earlier exp does not lower last_exp
    clock.now = NOW + 10
    new_kid = ring.rotate()

    clock.now = NOW + 99
    assert ring.prune() == []
    assert Verifier(ring.public_keys(), clock=clock, leeway_s=0).verify(token).kid == old_kid
    clock.now = NOW + 100
    assert ring.prune() == []  # last_exp must be strictly in the past

    clock.now = NOW + 101
    assert ring.prune() == [old_kid]
    assert set(ring.public_keys()) == {new_kid}
    assert not (key_dir / f"{old_kid}.pem").exists()
    assert set(KeyRing.open(key_dir, clock=clock).public_keys()) == {new_kid}
    refused(Verifier(ring.public_keys(), clock=clock), token)
    assert ring.prune() == []  # the active key is never pruned


def test_given_last_exp_when_ring_reopened_then_prune_still_honours_it(
    ring: KeyRing, key_dir: Path, clock: FakeClock
) -> None:
    old_kid = ring.active_kid
    issue(ring, sub="t", pkg="p", jti="j", typ="access", exp=NOW + 100)
    ring.rotate()

    reopened = KeyRing.open(key_dir, clock=clock)

    assert reopened.prune() == []
    clock.now = NOW + 101
    assert reopened.prune() == [old_kid]


def test_given_retired_key_that_never_signed_when_pruned_then_removed(ring: KeyRing) -> None:
    unused = ring.active_kid
    ring.rotate()

    assert ring.prune() == [unused]


def test_given_verifier_when_keys_updated_then_new_kid_accepted(ring: KeyRing, verifier: Verifier) -> None:
    ring.rotate()
    token = valid_token(ring)
    refused(verifier, token)

    verifier.update_keys(ring.public_keys())

    assert verifier.verify(token).kid == ring.active_kid


def test_given_key_file_readable_by_others_when_opened_then_config_error(ring: KeyRing, key_dir: Path) -> None:
    (key_dir / f"{ring.active_kid}.pem").chmod(0o644)

    with pytest.raises(ConfigError):
        KeyRing.open(key_dir)


def test_given_key_file_is_a_symlink_when_opened_then_config_error(
    ring: KeyRing, key_dir: Path, tmp_path: Path
) -> None:
    pem = key_dir / f"{ring.active_kid}.pem"
    elsewhere = tmp_path / "elsewhere.pem"
    pem.rename(elsewhere)
    pem.symlink_to(elsewhere)

    with pytest.raises(ConfigError):
        KeyRing.open(key_dir)


@pytest.mark.parametrize(
    "index",
    [
        "not json",
        "[]",
        '{"version": 1}',
        '{"version": 2, "active": "k", "keys": {"k": {"created_at": 1, "retired_at": null, "last_exp": null}}}',
        '{"version": 1, "active": "k", "keys": {}}',
        '{"version": 1, "active": "../x", "keys": {"../x": {"created_at": 1, "retired_at": null, "last_exp": null}}}',
        '{"version": 1, "active": "k", "keys": {"k": {"created_at": "x", "retired_at": null, "last_exp": null}}}',
        '{"version": 1, "active": "k", "keys": {"k": {"created_at": 1, "retired_at": 2, "last_exp": null}}}',
        '{"version": 1, "active": "k", "keys": {"k": {"created_at": 1}}}',
        '{"version": 1, "active": "k", "keys": {"k": {"created_at": 1, "retired_at": null, "last_exp": 1.5}}}',
    ],
)
def test_given_malformed_index_when_opened_then_config_error(key_dir: Path, index: str) -> None:
    key_dir.mkdir(mode=0o700)
    (key_dir / "index.json").write_text(index)

    with pytest.raises(ConfigError):
        KeyRing.open(key_dir)


def test_given_index_naming_a_missing_key_when_opened_then_config_error(ring: KeyRing, key_dir: Path) -> None:
    (key_dir / f"{ring.active_kid}.pem").unlink()

    with pytest.raises(ConfigError):
        KeyRing.open(key_dir)


def test_given_key_files_without_index_when_opened_then_config_error(ring: KeyRing, key_dir: Path) -> None:
    (key_dir / "index.json").unlink()

    with pytest.raises(ConfigError):
        KeyRing.open(key_dir)


@pytest.mark.parametrize(
    "public_keys",
    [
        {"k": b"not a pem"},
        {"../k": b""},
        {
            "k": rsa.generate_private_key(65537, 2048)
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        },
    ],
)
def test_given_unusable_public_keys_when_verifier_built_then_config_error(public_keys: dict[str, bytes]) -> None:
    with pytest.raises(ConfigError):
        Verifier(public_keys)


# --------------------------------------------------------------------------- attack matrix


@pytest.mark.parametrize("credential", [None, "", "   ", "Bearer ", "bearer \t"])
def test_given_no_credential_when_verified_then_missing_token(verifier: Verifier, credential: str | None) -> None:
    refused(verifier, credential, Code.MISSING_TOKEN)


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signature", ["", "c2ln"])
def test_given_alg_none_when_verified_then_invalid(ring: KeyRing, verifier: Verifier, alg: str, signature: str) -> None:
    token = f"{segment({'alg': alg, 'typ': 'JWT', 'kid': ring.active_kid})}.{segment(claims())}.{signature}"

    refused(verifier, token)


@pytest.mark.parametrize("secret", ["pem", "raw"])
def test_given_hs256_keyed_with_our_public_key_when_verified_then_invalid(
    ring: KeyRing, verifier: Verifier, secret: str
) -> None:
    kid = ring.active_kid
    pem = ring.public_keys()[kid]
    public = serialization.load_pem_public_key(pem)
    key = pem if secret == "pem" else public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    signing_input = f"{segment({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{segment(claims())}"
    mac = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()

    err = refused(verifier, f"{signing_input}.{b64(mac)}")

    assert "algorithm" in err.message


def test_given_rs256_signed_with_another_key_when_verified_then_invalid(ring: KeyRing, verifier: Verifier) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(), other, algorithm="RS256", headers={"kid": ring.active_kid})

    refused(verifier, token)


@pytest.mark.parametrize("alg", ["HS512", "ES256", "PS256", "Ed25519", "eddsa", "EDDSA", "", 5, None, ["EdDSA"]])
def test_given_any_other_alg_when_verified_then_invalid(
    ring: KeyRing, key_dir: Path, verifier: Verifier, alg: object
) -> None:
    token = hand_signed(private_key(ring, key_dir), {"alg": alg, "kid": ring.active_kid}, claims())

    refused(verifier, token)


def test_given_expired_credential_when_verified_then_expired(ring: KeyRing, verifier: Verifier) -> None:
    token = issue(ring, sub="t", pkg="p", jti="j", typ="access", exp=NOW - 6, now=NOW - 3600)

    err = refused(verifier, token, Code.EXPIRED_TOKEN)

    assert "expired" in err.message


def test_given_credential_expiring_later_when_clock_passes_exp_then_expired(
    ring: KeyRing, verifier: Verifier, clock: FakeClock
) -> None:
    token = valid_token(ring)
    clock.now = NOW + 3600 + 5

    refused(verifier, token, Code.EXPIRED_TOKEN)


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"nbf": NOW + 60}, "future nbf"),
        ({"nbf": "yesterday"}, "non-numeric nbf"),
        ({"iat": NOW + 60}, "future iat"),
        ({"iat": float(NOW)}, "float iat"),
        ({"exp": float(NOW + 3600) + 0.5, "iat": NOW}, "float exp"),
        ({"aud": "someone-else"}, "wrong aud"),
        ({"aud": [AUDIENCE, "someone-else"]}, "aud list"),
        ({"iss": "evil"}, "wrong iss"),
        ({"iss": DROP}, "missing iss"),
        ({"aud": DROP}, "missing aud"),
        ({"sub": DROP}, "missing sub"),
        ({"jti": DROP}, "missing jti"),
        ({"iat": DROP}, "missing iat"),
        ({"pkg": DROP}, "missing pkg"),
        ({"typ": DROP}, "missing typ"),
        ({"typ": "root"}, "wrong typ"),
        ({"typ": ""}, "empty typ"),
        ({"typ": ["access"]}, "list typ"),
        ({"pkg": 5}, "int pkg"),
        ({"pkg": ""}, "empty pkg"),
        ({"sub": {"id": 1}}, "object sub"),
        ({"sub": "x" * 257}, "overlong sub"),
    ],
)
def test_given_bad_claims_signed_by_our_key_when_verified_then_invalid(
    ring: KeyRing, key_dir: Path, verifier: Verifier, changes: dict[str, object], why: str
) -> None:
    token = hand_signed(private_key(ring, key_dir), {"alg": "EdDSA", "kid": ring.active_kid}, claims(**changes))

    refused(verifier, token)


def test_given_missing_exp_when_verified_then_invalid(ring: KeyRing, key_dir: Path, verifier: Verifier) -> None:
    token = hand_signed(private_key(ring, key_dir), {"alg": "EdDSA", "kid": ring.active_kid}, claims(exp=DROP))

    refused(verifier, token)


@pytest.mark.parametrize("exp", [float("inf"), float("nan"), True, "soon", 10**400])
def test_given_hostile_exp_signed_by_our_key_when_verified_then_invalid(
    ring: KeyRing, key_dir: Path, verifier: Verifier, exp: object
) -> None:
    token = hand_signed(private_key(ring, key_dir), {"alg": "EdDSA", "kid": ring.active_kid}, claims(exp=exp))

    refused(verifier, token)


def test_given_other_audience_or_issuer_configured_when_verified_then_invalid(ring: KeyRing, clock: FakeClock) -> None:
    token = valid_token(ring)

    refused(Verifier(ring.public_keys(), audience="other-api", clock=clock), token)
    refused(Verifier(ring.public_keys(), issuer="other-issuer", clock=clock), token)


def test_given_unknown_kid_when_verified_then_invalid(ring: KeyRing, key_dir: Path, verifier: Verifier) -> None:
    token = hand_signed(private_key(ring, key_dir), {"alg": "EdDSA", "kid": "key_unknown"}, claims())

    err = refused(verifier, token)

    assert "unknown key id" in err.message


@pytest.mark.parametrize(
    "kid",
    [
        "../../etc/passwd",
        "' OR 1=1 --",
        "\x00",
        "key\x00.pem",
        "a/b",
        "..",
        "%2e%2e%2f",
        "kid with space",
        "ключ",
        "line\nbreak",
        "a" * 65,
        "",
        "|cat /etc/shadow",
        "$(reboot)",
    ],
)
def test_given_kid_injection_when_verified_then_invalid(
    ring: KeyRing, key_dir: Path, verifier: Verifier, kid: str
) -> None:
    token = hand_signed(private_key(ring, key_dir), {"alg": "EdDSA", "kid": kid}, claims())

    err = refused(verifier, token)

    assert "key id" in err.message


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "EdDSA"},
        {"alg": "EdDSA", "kid": None},
        {"alg": "EdDSA", "kid": 5},
        {"alg": "EdDSA", "kid": ["k"]},
        {"alg": "EdDSA", "kid": {"k": 1}},
    ],
)
def test_given_missing_or_non_string_kid_when_verified_then_invalid(
    ring: KeyRing, key_dir: Path, verifier: Verifier, header: dict[str, object]
) -> None:
    refused(verifier, hand_signed(private_key(ring, key_dir), header, claims()))


@pytest.mark.parametrize(
    ("claim", "value"), [("sub", "tok_other"), ("typ", "admin"), ("exp", NOW + 10**6), ("pkg", "pkg_other")]
)
def test_given_tampered_payload_with_original_signature_when_verified_then_invalid(
    ring: KeyRing, verifier: Verifier, claim: str, value: object
) -> None:
    header, _, signature = valid_token(ring).split(".")

    refused(verifier, f"{header}.{segment(claims(**{claim: value}))}.{signature}")


def test_given_signature_from_other_ed25519_key_with_our_kid_when_verified_then_invalid(
    ring: KeyRing, verifier: Verifier
) -> None:
    token = hand_signed(Ed25519PrivateKey.generate(), {"alg": "EdDSA", "kid": ring.active_kid}, claims())

    err = refused(verifier, token)

    assert "signature" in err.message


def test_given_flipped_signature_bit_when_verified_then_invalid(ring: KeyRing, verifier: Verifier) -> None:
    head, payload, signature = valid_token(ring).split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=="))
    raw[0] ^= 1

    refused(verifier, f"{head}.{payload}.{b64(bytes(raw))}")


@pytest.mark.parametrize(
    "credential",
    [
        "garbage",
        "a.b",
        "a.b.c.d",
        "...",
        "a..c",
        "a.b.",
        ".b.c",
        "e30.e30.e30",
        "eyJhbGciOiJFZERTQSJ9.e30.c2ln",
        f"{segment({'alg': 'EdDSA', 'kid': 'k'})}.!!!.c2ln",
        f"{segment('just a string')}.e30.c2ln",
        f"{segment([1, 2])}.e30.c2ln",
        f"{b64(b'[' * 3000)}.e30.c2ln",
        f"{b64(bytes(range(256)))}.e30.c2ln",
        "a+b/c=.d.e",
        "Bearer Bearer abc.def.ghi",
        "Basic dXNlcjpwYXNz",
    ],
)
def test_given_garbage_when_verified_then_invalid(verifier: Verifier, credential: str) -> None:
    refused(verifier, credential)


@pytest.mark.parametrize(
    "credential",
    ["токен.токен.токен", "🙂.🙂.🙂", "a\x00.b.c", "\uff41.\uff42.\uff43", "e30\u200b.e30.e30", "\ud800.a.b", "é" * 50],
)
def test_given_non_ascii_when_verified_then_invalid(verifier: Verifier, credential: str) -> None:
    refused(verifier, credential)


def test_given_non_ascii_inside_a_valid_token_when_verified_then_invalid(ring: KeyRing, verifier: Verifier) -> None:
    token = valid_token(ring)

    refused(verifier, token[:10] + "é" + token[11:])


@pytest.mark.parametrize("credential", ["a" * 10_000, "a.b." + "c" * 10_000, "Bearer " + "a.b.c" * 2_000])
def test_given_10k_char_strings_when_verified_then_invalid(verifier: Verifier, credential: str) -> None:
    err = refused(verifier, credential)

    assert "too long" in err.message


def test_given_valid_token_padded_past_the_cap_when_verified_then_invalid(ring: KeyRing, verifier: Verifier) -> None:
    refused(verifier, valid_token(ring) + "A" * 10_000)


def test_given_non_string_when_verified_then_invalid(verifier: Verifier) -> None:
    refused(verifier, b"abc.def.ghi")


def test_given_payload_that_is_not_an_object_when_verified_then_invalid(
    ring: KeyRing, key_dir: Path, verifier: Verifier
) -> None:
    key, header = private_key(ring, key_dir), {"alg": "EdDSA", "kid": ring.active_kid}

    payloads: list[object] = [[1, 2], "claims", 5, None, [[[[[]]]]]]
    for payload in payloads:
        refused(verifier, hand_signed(key, header, payload))


def test_given_deeply_nested_payload_signed_by_our_key_when_verified_then_invalid(
    ring: KeyRing, key_dir: Path, verifier: Verifier
) -> None:
    signing_input = f"{segment({'alg': 'EdDSA', 'kid': ring.active_kid})}.{b64(b'[' * 2900)}"
    token = f"{signing_input}.{b64(private_key(ring, key_dir).sign(signing_input.encode()))}"
    assert len(token) <= 4096  # reaches the JSON parser rather than the length cap

    refused(verifier, token)


def test_given_crit_or_b64_header_when_verified_then_invalid(ring: KeyRing, key_dir: Path, verifier: Verifier) -> None:
    key, kid = private_key(ring, key_dir), ring.active_kid

    refused(verifier, hand_signed(key, {"alg": "EdDSA", "kid": kid, "crit": ["exp"]}, claims()))
    refused(verifier, hand_signed(key, {"alg": "EdDSA", "kid": kid, "b64": False, "crit": ["b64"]}, claims()))


def test_algorithms_allowlist_is_eddsa_only() -> None:
    assert ALGORITHMS == ("EdDSA",)


# ------------------------------------------------------------------------------------ fuzz


@pytest.fixture(scope="module")
def fuzz_ring(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeyRing, Ed25519PrivateKey, Verifier]:
    key_dir = tmp_path_factory.mktemp("fuzz") / "keys"
    ring = KeyRing.open(key_dir, clock=lambda: NOW)
    return ring, private_key(ring, key_dir), Verifier(ring.public_keys(), clock=lambda: NOW)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
CLAIM_NAMES = ("iss", "aud", "sub", "pkg", "jti", "iat", "exp", "nbf", "typ")
HEADER_NAMES = ("alg", "kid", "typ", "crit", "b64", "jku", "x5u", "cty")


def _only_credential_error(verifier: Verifier, credential: str) -> None:
    try:
        result = verifier.verify(credential)
    except CredentialError as exc:
        assert exc.code in {Code.MISSING_TOKEN, Code.INVALID_TOKEN, Code.EXPIRED_TOKEN}
    else:
        assert isinstance(result, Claims)


@settings(max_examples=400, deadline=None)
@given(text=st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_fuzz_given_random_text_when_verified_then_only_credential_error(
    fuzz_ring: tuple[KeyRing, Ed25519PrivateKey, Verifier], text: str
) -> None:
    _, _, verifier = fuzz_ring
    with pytest.raises(CredentialError):
        verifier.verify(text)


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(st.binary(max_size=200), min_size=1, max_size=5),
    bearer=st.booleans(),
)
def test_fuzz_given_random_base64url_segments_when_verified_then_only_credential_error(
    fuzz_ring: tuple[KeyRing, Ed25519PrivateKey, Verifier], parts: list[bytes], bearer: bool
) -> None:
    _, _, verifier = fuzz_ring
    with pytest.raises(CredentialError):
        verifier.verify(("Bearer " if bearer else "") + ".".join(b64(p) for p in parts))


@settings(max_examples=400, deadline=None)
@given(
    header_changes=st.dictionaries(st.sampled_from(HEADER_NAMES), JSON, max_size=3),
    claim_changes=st.dictionaries(st.sampled_from(CLAIM_NAMES) | st.text(max_size=5), JSON, max_size=4),
    dropped=st.sets(st.sampled_from(CLAIM_NAMES)),
    whole_payload=st.none() | JSON,
)
def test_fuzz_given_signed_hostile_header_and_claims_when_verified_then_only_credential_error(
    fuzz_ring: tuple[KeyRing, Ed25519PrivateKey, Verifier],
    header_changes: dict[str, object],
    claim_changes: dict[str, object],
    dropped: set[str],
    whole_payload: object,
) -> None:
    ring, key, verifier = fuzz_ring
    header = {"alg": "EdDSA", "kid": ring.active_kid, **header_changes}
    payload = claims(**{**claim_changes, **dict.fromkeys(dropped, DROP)}) if whole_payload is None else whole_payload

    _only_credential_error(verifier, hand_signed(key, header, payload))


# ---------------------------------------------------------------- verified credentials remembered (issue 22 §4)
def test_given_a_credential_verified_once_then_again_it_costs_no_signature_check(
    ring: KeyRing, verifier: Verifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = valid_token(ring)
    first = verifier.verify(token)
    calls = []
    real = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert verifier.verify(f"Bearer {token}") == first == verifier.verify(token)
    assert calls == []  # remembered: no Ed25519 verification


def test_given_a_remembered_credential_then_any_change_to_it_is_verified_and_refused(
    ring: KeyRing, verifier: Verifier
) -> None:
    token = valid_token(ring)
    verifier.verify(token)
    head, body, sig = token.split(".")
    forged_body = segment(claims(sub="tok_other", jti="jti_1"))  # same jti, another token
    refused(verifier, f"{head}.{forged_body}.{sig}")
    refused(verifier, f"{head}.{body}.{sig[:-2]}AA")


def test_given_a_remembered_credential_past_its_exp_then_it_is_refused_as_expired(
    ring: KeyRing, verifier: Verifier, clock: FakeClock
) -> None:
    token = valid_token(ring)
    verifier.verify(token)
    clock.now = NOW + 3600 + 60
    refused(verifier, token, Code.EXPIRED_TOKEN)
    refused(verifier, token, Code.EXPIRED_TOKEN)  # forgotten, then refused by the full check too


def test_given_its_key_pruned_from_the_ring_then_a_remembered_credential_is_refused(
    ring: KeyRing, verifier: Verifier, clock: FakeClock, key_dir: Path
) -> None:
    token = valid_token(ring)
    verifier.verify(token)
    other = KeyRing.open(key_dir.parent / "other", clock=clock)  # a ring without this token's key
    verifier.update_keys(other.public_keys())
    refused(verifier, token)


def test_given_more_credentials_than_remembered_then_the_oldest_is_forgotten_and_verified_again(
    ring: KeyRing, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Verifier, "CACHE_SIZE", 3)
    verifier = Verifier(ring.public_keys(), clock=clock)
    tokens = [issue(ring, sub=f"tok_{i}", pkg="pkg_1", jti=f"jti_{i}", typ="access", exp=NOW + 60) for i in range(4)]
    for t in tokens:
        verifier.verify(t)
    assert list(verifier._verified) == tokens[1:]
    assert verifier.verify(tokens[0]).sub == "tok_0"  # verified again, in full
