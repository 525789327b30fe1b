"""A throwaway PostgreSQL server for the tests: initdb into a temporary folder and pg_ctl start it on a Unix socket
only (as the postgres user when the tests run as root, which initdb refuses). $EXPUNGE_TEST_POSTGRES, a URL,
uses an existing server instead. Tests skip, saying why, only where PostgreSQL is not installed (NotInstalled); a
server that is installed but fails to start fails them."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid

PORT = 54329


def binaries() -> str | None:
    """The folder holding initdb and pg_ctl, or None."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return os.path.dirname(os.path.realpath(found))
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(f"{folder}/pg_ctl") and os.path.exists(f"{folder}/initdb"):
            return folder
    return None


class NotInstalled(RuntimeError):
    """No PostgreSQL to start here."""


class Server:
    """A running server; ``database()`` makes a fresh database and returns its URL."""

    def __init__(self):
        self.external = os.environ.get("EXPUNGE_TEST_POSTGRES")
        self.folder = None
        if self.external:
            self.admin_url = self.external
            return
        bin_dir = binaries()
        if bin_dir is None:
            raise NotInstalled("PostgreSQL is not installed (apt-get install postgresql; .ci/run installs it)")
        self.folder = tempfile.mkdtemp(prefix="expunge-pg-")
        self.as_user = {}
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root: run them as the postgres user
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise NotInstalled("running as root and there is no postgres user to run PostgreSQL as "
                                   "(the postgresql package makes one)") from None
            os.chown(self.folder, user.pw_uid, user.pw_gid)
            self.as_user = dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[],
                                env=dict(os.environ, HOME=user.pw_dir, USER="postgres", LOGNAME="postgres"))
        data, self.pg_ctl = f"{self.folder}/data", f"{bin_dir}/pg_ctl"
        self._run([f"{bin_dir}/initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
        options = f"-k {self.folder} -c listen_addresses='' -p {PORT} -c fsync=off -c max_connections=200"
        self._run([self.pg_ctl, "-D", data, "-o", options, "-l", f"{self.folder}/log", "-w", "start"])
        self.admin_url = f"postgresql://postgres@/postgres?host={self.folder}&port={PORT}"

    def _run(self, command):
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.folder, **self.as_user)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:6])}... failed: {done.stderr.strip() or done.stdout.strip()}")

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.admin_url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as c:
            c.execute(sql)

    def database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        self._admin(f"CREATE DATABASE {name}")
        base, _, query = self.admin_url.partition("?")
        return f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")

    def drop(self, url: str) -> None:
        name = url.partition("?")[0].rsplit("/", 1)[1]
        self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        if self.folder is None:
            return
        subprocess.run([self.pg_ctl, "-D", f"{self.folder}/data", "-m", "immediate", "stop"], capture_output=True,
                       timeout=60, cwd=self.folder, **self.as_user)
        shutil.rmtree(self.folder, ignore_errors=True)
