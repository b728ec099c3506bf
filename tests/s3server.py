"""A real S3 API server for the tests: moto's, on 127.0.0.1, in a process of its own, whose
objects survive a restart.

moto keeps its buckets in memory. Here the server process, asked to stop (SIGTERM, SIGINT or
`S3Server.stop_at`), first answers 503 to new requests and lets those in progress finish, then
saves every object to its folder; started again on that folder, it loads them before it
answers anyone. A restart thus loses nothing the server acknowledged, as with a real server and
its disk (a SIGKILL loses everything: nothing is saved then).

Run by hand to try the S3 path (Ctrl-C stops it; the objects are kept in --state):

    python tests/s3server.py --port 5000 --state /tmp/jc-s3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CONTROL = "/_jestcurate/stop-at"  # not an S3 path: a bucket name has no underscore
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
REGION = "us-east-1"


class S3ServerError(RuntimeError):
    """The server did not start, or did not stop cleanly."""


class S3Server:
    """The server as a child process: start, stop, restart, and its clients' environment."""

    def __init__(self, root: Path, port: int = 0) -> None:
        self.root = root
        self.state = root / "objects"
        self.log = root / "server.log"
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        """What botocore (under s3fs) reads: the endpoint, credentials moto accepts, a region,
        and no config files of the user's."""
        missing = str(self.root / "no-aws-config")
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            **CREDENTIALS,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": missing,
            "AWS_SHARED_CREDENTIALS_FILE": missing,
        }

    def start(self, timeout: float = 60.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "--port", str(self.port), "--state", str(self.state)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.proc.poll() is not None:
                raise S3ServerError(
                    f"the S3 server exited with {self.proc.returncode}: {self.tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise S3ServerError(
                    f"the S3 server did not answer in {timeout:.0f} s: {self.tail()}"
                )
            time.sleep(0.1)

    def ensure_running(self) -> None:
        """Start it again where a test left it stopped."""
        if self.proc is not None and self.proc.poll() is None:
            return
        if self.proc is not None:
            with contextlib.suppress(S3ServerError):
                self.wait_stopped()
        self.start()

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint, timeout=2):
                return True
        except urllib.error.HTTPError:  # an S3 error (403, 503) is an answer too
            return True
        except OSError:
            return False

    def stop(self, timeout: float = 60.0) -> None:
        """Stop it (its objects saved); waits until it has exited."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.wait_stopped(timeout)

    def wait_stopped(self, timeout: float = 60.0) -> None:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise S3ServerError(f"the S3 server did not stop in {timeout:.0f} s") from None
        self.proc = None
        if code != 0:
            raise S3ServerError(f"the S3 server exited with {code}: {self.tail()}")

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop_at(self, method: str, path: str) -> None:
        """Make the server stop itself when a `method` request for `path` (/bucket/key)
        arrives, before answering it: a stop at an exact point of a client's work."""
        query = urllib.parse.urlencode({"method": method, "path": path})
        with urllib.request.urlopen(f"{self.endpoint}{CONTROL}?{query}", data=b"", timeout=10):
            pass

    def add_user(self) -> tuple[str, str]:
        """A user allowed everything: its access key id and secret key."""
        iam = client("iam", self.endpoint)
        name = f"user{len(iam.list_users()['Users'])}"
        iam.create_user(UserName=name)
        anything = {"Effect": "Allow", "Action": "*", "Resource": "*"}
        policy = json.dumps({"Version": "2012-10-17", "Statement": [anything]})
        iam.put_user_policy(UserName=name, PolicyName="anything", PolicyDocument=policy)
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    @contextlib.contextmanager
    def checking_credentials(self) -> Iterator[None]:
        """Inside: every request must be signed with a user's key (moto checks none unless
        asked; a restart stops checking too)."""
        self._moto_api("reset-auth", b"0")
        try:
            yield
        finally:
            self._moto_api("reset-auth", b"inf")

    def _moto_api(self, what: str, body: bytes) -> None:
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/{what}", data=body, headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(request, timeout=10):
            pass

    def tail(self, lines: int = 5) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:]) or "no output"


def client(service: str, endpoint: str) -> Any:
    """A boto3 client of the server with the test credentials."""
    import boto3

    keys = {name.lower(): value for name, value in CREDENTIALS.items()}
    return boto3.client(service, endpoint_url=endpoint, region_name=REGION, **keys)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The server process.


class Gate:
    """WSGI middleware: counts requests in progress; once closed, answers 503 (a client's
    retry will find the restarted server) and lets those in progress finish."""

    def __init__(self, app: Any, on_stop: Any) -> None:
        self.app = app
        self.on_stop = on_stop
        self.cond = threading.Condition()
        self.active = 0
        self.closed = False
        self.stop_at: tuple[str, str] | None = None

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        if path == CONTROL:
            query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
            self.stop_at = (query["method"][0], query["path"][0])
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        with self.cond:
            if (method, path) == self.stop_at:
                self.closed = True
                threading.Thread(target=self.on_stop).start()
            if self.closed:
                start_response("503 Service Unavailable", [("Content-Type", "application/xml")])
                return [b"<Error><Code>ServiceUnavailable</Code>"
                        b"<Message>stopping</Message></Error>"]  # fmt: skip
            self.active += 1
        try:
            return list(self.app(environ, start_response))  # the whole answer, then counted
        finally:
            with self.cond:
                self.active -= 1
                self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.wait_for(lambda: self.active == 0)


def serve(port: int, state: Path) -> None:
    import moto.server
    from moto import settings
    from werkzeug.serving import make_server

    app = moto.server.DomainDispatcherApplication(moto.server.create_backend_app)
    # moto's own request handler (recent releases) keeps underscores in header names.
    handler = getattr(moto.server, "MotoRequestHandler", None)
    # Objects are loaded and saved through the S3 API on a port of its own, so only the public
    # port is closed while they are.
    private = make_server("127.0.0.1", 0, app, threaded=True, request_handler=handler)
    threading.Thread(target=private.serve_forever, daemon=True).start()
    s3 = client("s3", f"http://127.0.0.1:{private.server_port}")
    load(s3, state)

    def stop() -> None:
        gate.close()
        public.shutdown()

    gate = Gate(app, stop)
    public = make_server("127.0.0.1", port, gate, threaded=True, request_handler=handler)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=stop).start())
    print(f"serving S3 at http://127.0.0.1:{port}, objects in {state}", flush=True)
    public.serve_forever()
    public.server_close()
    settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")  # saving needs no user's key
    save(s3, state)
    print(f"stopped; {sum(1 for _ in state.glob('*/*'))} objects saved", flush=True)


def load(s3: Any, state: Path) -> None:
    """Each folder of `state` a bucket, each file an object (its key quoted as a file name)."""
    if not state.is_dir():
        return
    for bucket in sorted(p for p in state.iterdir() if p.is_dir()):
        s3.create_bucket(Bucket=bucket.name)
        for obj in sorted(bucket.iterdir()):
            key = urllib.parse.unquote(obj.name)
            s3.put_object(Bucket=bucket.name, Key=key, Body=obj.read_bytes())


def save(s3: Any, state: Path) -> None:
    new = state.with_name(state.name + ".new")
    if new.exists():
        shutil.rmtree(new)
    new.mkdir(parents=True)
    for bucket in s3.list_buckets()["Buckets"]:
        name = bucket["Name"]
        (new / name).mkdir()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
            for obj in page.get("Contents", []):
                body = s3.get_object(Bucket=name, Key=obj["Key"])["Body"].read()
                (new / name / urllib.parse.quote(obj["Key"], safe="")).write_bytes(body)
    if state.exists():
        shutil.rmtree(state)
    os.replace(new, state)


def main() -> None:
    parser = argparse.ArgumentParser(description="moto's S3 server, its objects kept on stop")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--state", type=Path, default=Path("s3-state"))
    args = parser.parse_args()
    serve(args.port, args.state)


if __name__ == "__main__":
    main()
