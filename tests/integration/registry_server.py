"""A real registry for the tests: Debian's ``docker-registry`` on 127.0.0.1, storage in a temp dir.

Auth modes: ``none``; ``basic`` (htpasswd, bcrypt via ``htpasswd -B``); ``token`` (the registry
trusts a self-signed certificate; a small token service in this process checks the user's
password and signs RS256 JWTs with ``openssl``, carrying the certificate in ``x5c``).
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

USER, PASSWORD = "judge", "s3cret-pass"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing_tools() -> str | None:
    for tool in ("docker-registry", "htpasswd", "openssl", "skopeo", "umoci"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (.ci/install installs it)"
    return None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """Issues registry tokens for USER/PASSWORD; refuses everyone else."""

    def __init__(self, directory: Path, issuer: str, service: str) -> None:
        self.key = directory / "token.key"
        self.cert = directory / "token.crt"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=sandbox-test-token", "-keyout", str(self.key), "-out", str(self.cert)],
            check=True, capture_output=True,
        )
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
                             check=True, capture_output=True).stdout
        self.x5c = base64.b64encode(der).decode()
        self.issuer, self.service = issuer, service
        self.requests = 0
        service_self = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                service_self.requests += 1
                expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                if self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.end_headers()
                    return
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                body = json.dumps({"token": service_self.token(query.get("scope", []))}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def token(self, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {"iss": self.issuer, "sub": USER, "aud": self.service, "exp": now + 600,
                  "nbf": now - 60, "iat": now, "jti": secrets.token_hex(8), "access": access}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)],
                                   input=signing_input.encode(), check=True,
                                   capture_output=True).stdout
        return f"{signing_input}.{_b64(signature)}"

    def stop(self) -> None:
        self.server.shutdown()


class Registry:
    """One running registry; ``host`` is ``127.0.0.1:PORT``."""

    def __init__(self, directory: Path, auth: str = "none") -> None:
        self.directory = directory
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.auth = auth
        self.tokens: TokenService | None = None
        config = [
            "version: 0.1",
            "log:\n  level: error",
            f"storage:\n  filesystem:\n    rootdirectory: {directory / 'data'}",
            f"http:\n  addr: {self.host}",
        ]
        if auth == "basic":
            htpasswd = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], check=True,
                                      capture_output=True).stdout
            (directory / "htpasswd").write_bytes(htpasswd)
            path = directory / "htpasswd"
            config.append(f"auth:\n  htpasswd:\n    realm: test\n    path: {path}")
        elif auth == "token":
            self.tokens = TokenService(directory, "sandbox-test-issuer", "sandbox-test-registry")
            config.append(
                "auth:\n  token:\n"
                f"    realm: http://127.0.0.1:{self.tokens.port}/token\n"
                "    service: sandbox-test-registry\n"
                "    issuer: sandbox-test-issuer\n"
                f"    rootcertbundle: {self.tokens.cert}"
            )
        (directory / "config.yml").write_text("\n".join(config) + "\n")
        self.log = open(directory / "registry.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            ["docker-registry", "serve", str(directory / "config.yml")],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # 401: up, and asking for auth
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError(
                        "docker-registry did not start: "
                        + (directory / "registry.log").read_text()[-500:]
                    ) from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        if self.tokens is not None:
            self.tokens.stop()
