"""The API's contract: who may do what (and what is refused, and how), validation with nothing queued,
deduplication, groups, policies, receipts, and the documentation."""

import json
import time

import pytest

from expunge.service import create_app, tokens
from expunge.unlearn.audit import check_receipt

from .conftest import Service


def test_the_openapi_documentation_is_served_without_a_token(service):
    assert service.call(None, "GET", "/docs").status_code == 200
    spec = service.call(None, "GET", "/openapi.json").json()
    assert {"/v1/runs/{run}/requests", "/v1/requests/{request_id}/receipt", "/v1/runs/{run}/policy",
            "/v1/runs/{run}/ledger", "/v1/receipts/verify", "/metrics"} <= set(spec["paths"])
    assert "bearer" in json.dumps(spec["components"]["securitySchemes"]).lower()


CALLS = [("POST", "/v1/runs/digits/requests", {"ids": None}), ("GET", "/v1/requests", None),
         ("GET", "/v1/runs", None), ("PUT", "/v1/runs/digits/policy", {"max_batch": 5}),
         ("POST", "/v1/runs/digits/pause", None), ("GET", "/v1/runs/digits/ledger", None),
         ("GET", "/v1/runs/digits/verify", None), ("GET", "/metrics", None), ("GET", "/v1/batches", None)]


@pytest.mark.parametrize("method, path, body", CALLS)
@pytest.mark.parametrize("token", [None, "exp_nothing_here", "garbage"])
def test_every_call_needs_a_valid_token(service, method, path, body, token):
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    response = service.client.request(method, path, headers=headers, json=body)
    assert response.status_code == 401 and "expunge token create" in response.json()["detail"]
    assert response.headers["www-authenticate"] == "Bearer"


def test_a_revoked_token_is_refused_once_the_token_cache_lapses(runs, sqlite_db):
    service = Service(runs, sqlite_db, token_cache_s=0.3)
    assert service.call("operator", "GET", "/v1/runs").status_code == 200
    tokens.revoke(service.db, service.tokens["operator"].split("_")[1])
    time.sleep(0.35)
    assert service.call("operator", "GET", "/v1/runs").status_code == 401


# (method, path, body) -> the roles allowed; every other role gets 403 with the role it takes
ROLE_MATRIX = [
    ("POST", "/v1/runs/digits/requests", "FORGET", {"requester"}),
    ("PUT", "/v1/runs/digits/policy", {"max_batch": 7}, {"operator"}),
    ("POST", "/v1/runs/digits/pause", None, {"operator"}),
    ("POST", "/v1/runs/digits/resume", None, {"operator"}),
    ("GET", "/v1/runs/digits/ledger", None, {"auditor"}),
    ("GET", "/v1/runs/digits/verify", None, {"auditor"}),
    ("POST", "/v1/receipts/verify", {"receipt": {}}, {"auditor"}),
    ("GET", "/metrics", None, {"operator", "auditor"}),
    ("GET", "/v1/batches", None, {"operator", "auditor"}),
    ("GET", "/v1/runs", None, {"requester", "operator", "auditor"}),
    ("GET", "/v1/runs/digits", None, {"requester", "operator", "auditor"}),
    ("GET", "/v1/requests", None, {"requester", "operator", "auditor"}),
]


@pytest.mark.parametrize("method, path, body, allowed", ROLE_MATRIX)
@pytest.mark.parametrize("role", ["requester", "operator", "auditor"])
def test_each_role_may_do_what_it_is_for_and_nothing_else(service, digits_ids, method, path, body, allowed, role):
    if body == "FORGET":
        body = {"ids": digits_ids[:2]}
    response = service.call(role, method, path, json=body)
    if role in allowed:
        assert response.status_code in (200, 202), response.text
    else:
        assert response.status_code == 403, response.text
        article = "an" if role in ("operator", "auditor") else "a"
        assert f"{article} {role} token cannot do this" in response.json()["detail"]
    if role != "requester" and method == "POST" and "requests" in path:
        assert service.queue.count() == 0  # a forbidden submission queues nothing


def test_a_requester_sees_only_its_own_requests_and_receipts(service, digits_ids):
    mine = service.submit({"ids": digits_ids[:2]}).json()["request_id"]
    theirs = service.submit({"ids": digits_ids[2:4]}, role="requester2").json()["request_id"]
    assert service.call("requester", "GET", f"/v1/requests/{mine}").status_code == 200
    hidden = service.call("requester", "GET", f"/v1/requests/{theirs}")
    assert hidden.status_code == 404 and "no request" in hidden.json()["detail"]  # not even whether it exists
    assert service.call("requester", "GET", f"/v1/requests/{theirs}/receipt").status_code == 404
    assert [r["request_id"] for r in service.call("requester", "GET", "/v1/requests").json()] == [mine]
    assert {r["request_id"] for r in service.call("auditor", "GET", "/v1/requests").json()} == {mine, theirs}
    assert service.call("operator", "GET", f"/v1/requests/{theirs}").status_code == 200
    assert service.call("operator", "GET", f"/v1/requests/{theirs}/receipt").status_code == 403


def test_a_submission_is_queued_applied_and_answered_with_a_receipt_per_request(service, digits_ids):
    first = service.submit({"ids": digits_ids[:3], "requested_by": "jane@example.org", "reason": "GDPR art. 17",
                            "reference": "T-1"})
    assert first.status_code == 202 and first.headers["location"] == first.json()["status_url"]
    second = service.submit({"ids": digits_ids[2:5]}, role="requester2").json()
    status = service.call("requester", "GET", first.json()["status_url"]).json()
    assert status["status"] == "queued" and status["ids"] == sorted(digits_ids[:3])
    early = service.call("requester", "GET", f"/v1/requests/{first.json()['request_id']}/receipt")
    assert early.status_code == 409 and "is queued" in early.json()["detail"]
    service.drain()
    done = service.call("requester", "GET", first.json()["status_url"]).json()
    other = service.call("auditor", "GET", second["status_url"]).json()
    assert done["status"] == other["status"] == "applied" and done["version"] == other["version"] == 2  # one batch
    assert {done["ledger_seq"], other["ledger_seq"]} == {2, 3}
    receipt = service.call("requester", "GET", done["receipt_url"]).json()["receipt"]
    entry = receipt["entry"]
    assert entry["request_id"] == done["request_id"] and entry["report"]["ids"] == sorted(digits_ids[:3])
    assert entry["requested_by"].startswith("jane@example.org (token ") and entry["reference"] == "T-1"
    assert check_receipt(receipt, run=service.runs / "digits", contains_id=digits_ids[0]).ok
    checked = service.call("auditor", "POST", "/v1/receipts/verify", json={"receipt": receipt, "id": digits_ids[1]})
    assert checked.json()["ok"] and checked.json()["run"] == "digits"
    forged = json.loads(json.dumps(receipt))
    forged["entry"]["report"]["ids"] = [digits_ids[9]]
    assert not service.call("auditor", "POST", "/v1/receipts/verify", json={"receipt": forged}).json()["ok"]


def test_rows_already_deleted_are_answered_with_the_rows_that_deleted_them_not_applied_again(service, digits_ids):
    service.submit({"ids": digits_ids[:2]})
    service.drain()
    again = service.submit({"ids": digits_ids[:2]}).json()  # all gone already
    partly = service.submit({"ids": digits_ids[1:3]}, role="requester2").json()
    service.drain()
    answered = service.call("requester", "GET", again["status_url"]).json()
    assert answered["status"] == "applied" and answered["ledger_seq"] is None and answered["answered_by"] == [2]
    mixed = service.call("requester2", "GET", partly["status_url"]).json()
    assert mixed["applied_ids"] == [digits_ids[2]] and mixed["answered_by"] == [2] and mixed["version"] == 3
    receipts = service.call("requester", "GET", answered["receipt_url"]).json()
    assert receipts["receipt"] is None and receipts["earlier"][0]["entry"]["seq"] == 2
    ledger = service.call("auditor", "GET", "/v1/runs/digits/ledger").json()
    assert ledger["rows"] == 3 and ledger["chain_ok"]  # training, the first request, the new id of the mixed one


def test_an_identical_open_request_of_the_same_token_is_the_same_request(service, digits_ids):
    first = service.submit({"ids": digits_ids[:2]}).json()
    again = service.submit({"ids": list(reversed(digits_ids[:2]))}).json()
    other = service.submit({"ids": digits_ids[:2]}, role="requester2").json()
    assert again["request_id"] == first["request_id"] and again["duplicate"] and not other["duplicate"]
    assert service.queue.count() == 2


def test_a_group_names_its_rows(service):
    response = service.submit({"group": "class-3"})
    assert response.status_code == 202
    groups = service.call("requester", "GET", "/v1/runs/digits").json()["groups"]
    assert response.json()["n_ids"] == groups["class-3"] > 100
    unknown = service.submit({"group": "class-77"})
    assert unknown.status_code == 422 and "no group 'class-77'" in unknown.json()["detail"]


def test_rows_are_added(service):
    response = service.submit({"kind": "add", "rows": {"X": [[0.5] * 64, [1.0] * 64], "y": [3, 4]}})
    assert response.status_code == 202
    service.drain()
    status = service.call("requester", "GET", response.json()["status_url"]).json()
    assert status["status"] == "applied" and len(status["applied_ids"]) == 2


def big_body(n):
    return {"ids": list(range(n))}


INVALID = [
    ("nope", {"ids": [1]}, 404, "no run 'nope' here; runs: digits"),
    ("digits", {"ids": [1.5]}, 422, "ids.0: Input should be a valid integer"),
    ("digits", {"ids": [1.0]}, 422, "valid integer"),  # never truncated
    ("digits", {"ids": ["7"]}, 422, "valid integer"),
    ("digits", {"ids": "ID-1"}, 422, "valid list"),
    ("digits", {"ids": []}, 422, "ids is empty"),
    ("digits", {"ids": "DUPLICATE"}, 422, "appear more than once"),
    ("digits", {"ids": [10**6, 10**6 + 1]}, 422, "2 id(s) are not rows of run digits"),
    ("digits", {"ids": [2**70]}, 422, "ids must fit in 64-bit"),
    ("digits", {}, 422, "either ids or a group"),
    ("digits", {"ids": "SOME", "group": "class-1"}, 422, "either ids or a group"),
    ("digits", {"ids": "SOME", "colour": "red"}, 422, "colour: Extra inputs are not permitted"),
    ("digits", {"kind": "purge", "ids": "SOME"}, 422, "kind: Input should be 'forget' or 'add'"),
    ("digits", {"kind": "add", "rows": {"X": [[0.0] * 3], "y": [1]}}, 422, "the rows have 3 features but run digits "
     "takes 64"),
    ("digits", {"kind": "add", "rows": {"X": [[0.0] * 64], "y": [12]}}, 422, "labels must lie in 0..9"),
    ("digits", {"kind": "add", "rows": {"X": [[0.0] * 64], "y": [1, 2]}}, 422, "1 rows of features but 2 labels"),
    ("digits", {"kind": "add", "rows": {"X": [[0.0] * 64], "y": [1], "ids": "SOME1"}}, 422, "already rows of run"),
    ("digits", {"kind": "add", "ids": "SOME"}, 422, "an add request gives rows"),
    ("digits", {"requested_by": "x" * 2001, "ids": "SOME"}, 422, "requested_by: String should have at most 2000"),
]


@pytest.mark.parametrize("run, body, code, words", INVALID)
def test_bad_requests_get_a_clear_4xx_and_nothing_is_queued(service, digits_ids, run, body, code, words):
    body = json.loads(json.dumps(body).replace('"SOME1"', json.dumps(digits_ids[:1]))
                      .replace('"SOME"', json.dumps(digits_ids[:2]))
                      .replace('"DUPLICATE"', json.dumps([digits_ids[0], digits_ids[0]])))
    response = service.submit(body, run=run)
    assert response.status_code == code, response.text
    assert words in response.json()["detail"], response.json()["detail"]
    assert service.queue.count() == 0


def test_bodies_that_are_too_large_not_json_or_broken_are_refused_before_anything_is_queued(runs, sqlite_db,
                                                                                             digits_ids):
    service = Service(runs, sqlite_db, max_body=4096, max_ids=50)
    big = service.submit({"ids": list(range(2000))})
    assert big.status_code == 413 and "over the limit of 4096" in big.json()["detail"]
    many = service.submit({"ids": digits_ids[:60]})
    assert many.status_code == 422 and "at most 50" in many.json()["detail"]
    text = service.client.post("/v1/runs/digits/requests", content=b"ids=1,2",
                               headers={**service.headers("requester"), "Content-Type": "text/plain"})
    assert text.status_code == 415 and "must be JSON" in text.json()["detail"]
    broken = service.client.post("/v1/runs/digits/requests", content=b'{"ids": [1,',
                                 headers={**service.headers("requester"), "Content-Type": "application/json"})
    assert broken.status_code == 422 and "not valid JSON" in broken.json()["detail"]
    chunked = service.client.post("/v1/runs/digits/requests", content=iter([b'{"ids": [' + b"1," * 3000 + b"1]}"]),
                                  headers={**service.headers("requester"), "Content-Type": "application/json"})
    assert chunked.status_code == 413  # no Content-Length: counted as it arrives
    assert service.queue.count() == 0


def test_operators_set_policies_checked_against_the_run_and_pause_runs(service, digits_ids):
    policy = service.call("operator", "PUT", "/v1/runs/digits/policy", json={"max_batch": 2, "max_wait_s": 0.5})
    assert policy.json()["max_batch"] == 2 and policy.json()["max_wait_s"] == 0.5
    assert service.call("operator", "PUT", "/v1/runs/digits/policy", json={"method": "retrain"}).json()["method"] == "retrain"
    wrong = service.call("operator", "PUT", "/v1/runs/digits/policy", json={"method": "sisa"})
    assert wrong.status_code == 422 and "sisa updates only runs trained with it" in wrong.json()["detail"]
    unknown = service.call("operator", "PUT", "/v1/runs/digits/policy", json={"method": "magic"})
    assert unknown.status_code == 422 and "unknown method 'magic'" in unknown.json()["detail"]
    assert service.call("operator", "PUT", "/v1/runs/digits/policy", json={"max_batch": 0}).status_code == 422
    assert service.call("operator", "POST", "/v1/runs/digits/pause").json()["paused"]
    request = service.submit({"ids": digits_ids[:2]}).json()
    service.drain()
    assert service.call("requester", "GET", request["status_url"]).json()["status"] == "queued"
    assert service.call("operator", "POST", "/v1/runs/digits/resume").json()["paused"] is False
    service.drain()
    done = service.call("requester", "GET", request["status_url"]).json()
    assert done["status"] == "applied"
    batch = service.call("operator", "GET", "/v1/batches").json()[0]
    assert batch["method"] == "retrain" and batch["figures"]["method"] == "retrain" and batch["seconds"] > 0


def test_metrics_show_the_queue_and_the_updates(service, digits_ids):
    service.submit({"ids": digits_ids[:2]})
    text = service.call("operator", "GET", "/metrics").text
    assert 'expunge_queue_depth{run="digits",status="queued"} 1.0' in text
    assert 'expunge_submission_seconds_count 1.0' in text
    service.drain()
    text = service.call("auditor", "GET", "/metrics").text
    assert 'expunge_batches_committed_total{run="digits"} 1.0' in text
    assert 'expunge_requests{run="digits",status="applied"} 1.0' in text


def test_runs_describe_their_method_guarantees_and_queue(service, digits_ids):
    service.submit({"ids": digits_ids[:2]})
    (run,) = service.call("auditor", "GET", "/v1/runs").json()
    assert run["name"] == "digits" and run["method"] == "deltagrad" and run["figures"] == {"T0": 5, "j0": 5, "m": 2}
    assert run["queue"]["queued"] == 1 and run["queue"]["oldest_age_s"] >= 0 and run["policy"]["max_batch"] == 256


def test_an_auditor_reads_the_ledger_and_verifies_the_run(service, digits_ids):
    service.submit({"ids": digits_ids[:2]})
    service.drain()
    ledger = service.call("auditor", "GET", "/v1/runs/digits/ledger").json()
    assert ledger["chain_ok"] and [e["seq"] for e in ledger["entries"]] == [1, 2]
    assert ledger["entries"][1]["batch"]["size"] == 1 and ledger["entries"][1]["request_id"]
    verification = service.call("auditor", "GET", "/v1/runs/digits/verify").json()
    assert verification["ok"] and verification["problems"] == []


def test_an_app_on_a_missing_runs_folder_is_refused(tmp_path, sqlite_db):
    from expunge.errors import ExpungeError

    with pytest.raises(ExpungeError, match="no such folder"):
        create_app(tmp_path / "missing", sqlite_db)
