"""Tokens: shown once, stored as a hash only, checked by role, refused when wrong or revoked."""

import pytest

from expunge.errors import ExpungeError
from expunge.service import tokens


def test_a_token_stands_for_its_role_and_only_its_hash_is_stored(sqlite_db, tmp_path):
    token, principal = tokens.create(sqlite_db, "auditor", "dpo office")
    assert token.startswith("exp_") and principal.role == "auditor"
    assert tokens.authenticate(sqlite_db, token) == principal
    secret = token.split("_", 2)[2]
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("service.sqlite*"))
    assert secret.encode() not in stored and principal.token_id.encode() in stored
    assert "secret" not in str(tokens.listing(sqlite_db)) and tokens.listing(sqlite_db)[0]["name"] == "dpo office"


def test_wrong_malformed_and_revoked_tokens_stand_for_nobody(sqlite_db):
    token, principal = tokens.create(sqlite_db, "requester", "portal")
    for bad in (None, "", "Bearer x", "exp_", token[:-1] + ("A" if token[-1] != "A" else "B"), "exp_ffff_secret"):
        assert tokens.authenticate(sqlite_db, bad) is None
    tokens.revoke(sqlite_db, principal.token_id)
    assert tokens.authenticate(sqlite_db, token) is None
    with pytest.raises(ExpungeError, match="already revoked"):
        tokens.revoke(sqlite_db, principal.token_id)
    with pytest.raises(ExpungeError, match="no token 'nope'"):
        tokens.revoke(sqlite_db, "nope")


@pytest.mark.parametrize("role, name, words", [("admin", "x", "unknown role 'admin'"), ("operator", " ", "a name")])
def test_bad_tokens_are_refused(sqlite_db, role, name, words):
    with pytest.raises(ExpungeError, match=words):
        tokens.create(sqlite_db, role, name)
