"""`expunge token create|list|revoke`, and `serve`/`worker` refusing bad input before starting."""

import json

from expunge.service import Database, sqlite_url, tokens

from .helpers import assert_clean_failure, invoke


def test_a_token_is_shown_once_listed_without_its_secret_and_revoked(tmp_path):
    made = invoke("token", "create", "--role", "operator", "--name", "ops desk", "--runs", tmp_path, "--json", "-")
    assert made.exit_code == 0, made.output
    created = json.loads(made.stdout)
    assert created["role"] == "operator" and created["token"].startswith(f"exp_{created['id']}_")
    db = Database(sqlite_url(tmp_path / "service.sqlite"))
    assert tokens.authenticate(db, created["token"]).name == "ops desk"
    listed = invoke("token", "list", "--db", sqlite_url(tmp_path / "service.sqlite"))
    assert created["id"] in listed.output and "ops desk" in listed.output
    assert created["token"].split("_", 2)[2] not in listed.output
    revoked = invoke("token", "revoke", created["id"], "--runs", tmp_path)
    assert revoked.exit_code == 0 and tokens.authenticate(db, created["token"]) is None


def test_token_commands_refuse_bad_input(tmp_path):
    assert_clean_failure(invoke("token", "create", "--role", "root", "--name", "x", "--runs", tmp_path),
                         "unknown role 'root'")
    assert_clean_failure(invoke("token", "list"), "give --db URL, or --runs DIR")
    assert_clean_failure(invoke("token", "list", "--db", "mysql://x"), "give sqlite:///FILE or postgresql://")
    assert_clean_failure(invoke("token", "revoke", "abc", "--runs", tmp_path), "no token 'abc'")


def test_serve_refuses_a_missing_runs_folder(tmp_path):
    assert_clean_failure(invoke("serve", "--runs", tmp_path / "missing"), "no such folder")
