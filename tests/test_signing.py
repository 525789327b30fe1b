"""Signing keys: Ed25519 and HMAC on `cryptography`, where keys come from, and clear errors for bad key files."""

import os
import stat

import pytest

from expunge.errors import ExpungeError
from expunge.signing import ED25519, ENV, HMAC, generate, load_signer, load_verifier

MESSAGE = b"0" * 64


@pytest.mark.parametrize("kind", [ED25519, HMAC])
def test_a_signature_checks_and_a_changed_message_or_signature_does_not(tmp_path, kind):
    signer = generate(tmp_path / "key", kind)
    signature = signer.sign(MESSAGE)
    verifier = load_signer(tmp_path / "key").verifier()
    assert verifier.check(MESSAGE, signature)
    assert not verifier.check(b"1" + MESSAGE[1:], signature)
    flipped = format(int(signature[0], 16) ^ 1, "x") + signature[1:]
    assert not verifier.check(MESSAGE, flipped)
    assert not verifier.check(MESSAGE, "not hex")


def test_the_key_file_is_private_and_the_public_key_checks_signatures(tmp_path):
    signer = generate(tmp_path / "key")
    assert stat.S_IMODE(os.stat(tmp_path / "key").st_mode) == 0o600
    public = load_verifier(tmp_path / "key.pub")
    assert public.key_id == signer.key_id and public.check(MESSAGE, signer.sign(MESSAGE))
    assert signer.describe()["public_key"].startswith("-----BEGIN PUBLIC KEY-----")


def test_another_key_does_not_check_and_has_another_id(tmp_path):
    one, two = generate(tmp_path / "one"), generate(tmp_path / "two")
    assert one.key_id != two.key_id
    assert not two.verifier().check(MESSAGE, one.sign(MESSAGE))


def test_hmac_key_id_does_not_reveal_the_secret(tmp_path):
    signer = generate(tmp_path / "secret", HMAC)
    secret = (tmp_path / "secret").read_text().strip()
    assert signer.describe() == {"alg": HMAC, "key_id": signer.key_id, "public_key": None}
    assert signer.key_id not in secret


def test_the_key_comes_from_the_environment_when_not_given(tmp_path, monkeypatch):
    signer = generate(tmp_path / "key")
    monkeypatch.delenv(ENV, raising=False)
    assert load_signer() is None
    monkeypatch.setenv(ENV, str(tmp_path / "key"))
    assert load_signer().key_id == signer.key_id


@pytest.mark.parametrize("content, words", [
    (b"abcd\n", "at least 32"),
    (b"\x00\x01binary", "neither a PEM Ed25519 key nor an HMAC key"),
    (b"-----BEGIN PRIVATE KEY-----\nnonsense\n-----END PRIVATE KEY-----\n", "not a readable"),
])
def test_bad_key_files_are_clear_errors(tmp_path, content, words):
    (tmp_path / "key").write_bytes(content)
    with pytest.raises(ExpungeError, match=words):
        load_signer(tmp_path / "key")


def test_a_public_key_cannot_sign_and_a_missing_file_is_named(tmp_path):
    generate(tmp_path / "key")
    with pytest.raises(ExpungeError, match="public key: signing needs the private key"):
        load_signer(tmp_path / "key.pub")
    with pytest.raises(ExpungeError, match="cannot read the key file"):
        load_signer(tmp_path / "absent")


def test_an_rsa_key_is_refused(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    (tmp_path / "rsa").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    with pytest.raises(ExpungeError, match="Ed25519"):
        load_signer(tmp_path / "rsa")


def test_keys_are_never_overwritten(tmp_path):
    generate(tmp_path / "key")
    with pytest.raises(ExpungeError, match="exists"):
        generate(tmp_path / "key")
