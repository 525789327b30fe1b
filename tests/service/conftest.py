"""Fixtures of the service tests: a tiny digits run trained once (copied per test), the service's database on
SQLite and on PostgreSQL, tokens of each role, and the API under a test client."""

import shutil

import pytest

from expunge import DeltaGrad, TrainRecipe, load_dataset
from expunge.service import Database, Worker, create_app, sqlite_url, tokens

from .postgres import NotInstalled, Server

RECIPE = TrainRecipe(model="logreg", epochs=3, batch_size=256, lr=0.1)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    train, test = load_dataset("digits")
    return DeltaGrad(T0=5, j0=5).fit(train, RECIPE, out=tmp_path_factory.mktemp("trained") / "digits",
                                      test=test, source="digits").path


@pytest.fixture(scope="session")
def digits_ids():
    return [int(i) for i in load_dataset("digits")[0].ids]


@pytest.fixture
def runs(trained_run, tmp_path):
    """A runs folder holding a private copy of the digits run, named 'digits'."""
    folder = tmp_path / "runs"
    shutil.copytree(trained_run, folder / "digits", ignore=shutil.ignore_patterns(".lock"))
    return folder


@pytest.fixture(scope="session")
def postgres():
    try:
        server = Server()
    except NotInstalled as e:
        pytest.skip(str(e))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "service.sqlite")
        return
    server = request.getfixturevalue("postgres")
    url = server.database()
    yield url
    server.drop(url)


@pytest.fixture
def sqlite_db(tmp_path):
    db = Database(sqlite_url(tmp_path / "service.sqlite")).create()
    yield db
    db.dispose()


class Service:
    """The API under a test client, its database, a worker, and a token of each role."""

    def __init__(self, runs, db, **options):
        from fastapi.testclient import TestClient

        self.runs, self.db = runs, db
        self.app = create_app(runs, db, **options)
        self.client = TestClient(self.app)
        self.queue = self.app.state.queue
        self.tokens = {role: tokens.create(db, role, f"{role} one")[0] for role in tokens.ROLES}
        self.tokens["requester2"] = tokens.create(db, "requester", "requester two")[0]

    def headers(self, role):
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def call(self, role, method, path, **kwargs):
        return self.client.request(method, path, headers=self.headers(role) if role else {}, **kwargs)

    def submit(self, body, role="requester", run="digits"):
        return self.call(role, "POST", f"/v1/runs/{run}/requests", json=body)

    def drain(self):
        Worker(self.runs, self.db).drain()


@pytest.fixture
def service(runs, sqlite_db):
    return Service(runs, sqlite_db)
