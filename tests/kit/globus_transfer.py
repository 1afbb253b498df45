"""Globus Transfer and Auth at the network boundary, for staging without a shared filesystem:
the responses are globus-sdk's own testing fixtures (``globus_sdk.testing``), served through
``responses`` inside this process; only the copy a Transfer task makes between two
collections is done here (``TransferService``), as the files' new owner would find it.

- ``store_login(cfg, ...)``: the tokens ``edgeloop globus login`` would have stored, the
  Transfer access token already expired (so the SDK must refresh it);
- ``TransferService(collections)``: a context manager; ``.tasks`` lists each submission's
  items, ``.bearers`` the Authorization headers the Transfer calls carried;
- ``AuthService(client_id, identity)``: Globus Auth for an interactive login: the code
  exchange answers with Transfer and OpenID tokens, the id_token signed with a key of its own
  and published as Globus Auth publishes its JWKS."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import jwt
import responses
from cryptography.hazmat.primitives.asymmetric import rsa
from globus_sdk.testing import RegisteredResponse, get_response_set, load_response
from globus_sdk.token_storage import SQLiteTokenStorage, TokenStorageData

TRANSFER_RS = "transfer.api.globus.org"
TRANSFER_SCOPE = "urn:globus:auth:scope:transfer.api.globus.org:all"
REFRESHED = "refreshed-transfer-access-token"


def store_login(token_file: Path, identity: str | None = None) -> None:
    """A stored login: openid and Transfer tokens with refresh tokens, Transfer's expired."""
    identity = identity or str(uuid.uuid4())
    now = int(time.time())
    store = SQLiteTokenStorage(token_file)
    try:
        store.store_token_data_by_resource_server(
            {
                "auth.globus.org": TokenStorageData(
                    resource_server="auth.globus.org",
                    identity_id=identity,
                    scope="openid",
                    access_token="auth-access-token",
                    refresh_token="auth-refresh-token",
                    expires_at_seconds=now + 3600,
                    token_type="Bearer",
                ),
                TRANSFER_RS: TokenStorageData(
                    resource_server=TRANSFER_RS,
                    identity_id=identity,
                    scope=TRANSFER_SCOPE,
                    access_token="expired-transfer-access-token",
                    refresh_token="transfer-refresh-token",
                    expires_at_seconds=now - 60,
                    token_type="Bearer",
                ),
            }
        )
    finally:
        store.close()


class TransferService:
    """Transfer's API as globus-sdk's fixtures answer it.  ``collections`` maps a collection
    id to (uid, gid) of whoever owns what a task writes there: each task copies its items
    then, checksums verified, ends SUCCEEDED (``status`` to end it otherwise)."""

    def __init__(self, collections: dict[str, tuple[int, int]], status: str = "SUCCEEDED"):
        self.collections, self.status = collections, status
        self.tasks: list[list[tuple[str, str]]] = []
        self.bearers: list[str] = []
        self.cancelled = 0
        self._mock = responses.RequestsMock(assert_all_requests_are_fired=False)

    def __enter__(self):
        self._mock.start()
        refreshed = {
            "access_token": REFRESHED,
            "expires_in": 172800,
            "resource_server": TRANSFER_RS,
            "scope": TRANSFER_SCOPE,
            "token_type": "Bearer",
            "refresh_token": "transfer-refresh-token-2",
            "other_tokens": [],
        }
        RegisteredResponse(
            service="auth", method="POST", path="/v2/oauth2/token", json=refreshed
        ).add(requests_mock=self._mock)
        submitted = get_response_set("transfer.submit_transfer").lookup("default")
        task_id = submitted.metadata["task_id"]
        load_response("transfer.get_submission_id", requests_mock=self._mock)
        cancel = get_response_set("transfer.cancel_task").lookup("default")
        task_url = f"{submitted.full_url.rsplit('/', 1)[0]}/task/{task_id}"
        self._mock.add_callback(
            responses.POST, submitted.full_url, callback=self._submit(submitted.json)
        )
        self._mock.add_callback(responses.GET, task_url, callback=self._task(task_id))
        self._mock.add_callback(
            responses.POST, f"{task_url}/cancel", callback=self._cancel(cancel)
        )
        return self

    def __exit__(self, *exc):
        self._mock.stop()
        self._mock.reset()

    def _submit(self, accepted: dict):
        def callback(request):
            self.bearers.append(request.headers.get("Authorization", ""))
            body = json.loads(request.body)
            owner = self.collections[body["destination_endpoint"]]
            items = [(i["source_path"], i["destination_path"]) for i in body["DATA"]]
            self.tasks.append(items)
            if self.status == "SUCCEEDED":
                for source, dest in items:
                    copy_as(Path(source), Path(dest), owner)
            return 202, {}, json.dumps(accepted)

        return callback

    def _cancel(self, fixture):
        def callback(request):
            self.cancelled += 1
            return fixture.status, {}, json.dumps(fixture.json)

        return callback

    def _task(self, task_id: str):
        def callback(request):
            self.bearers.append(request.headers.get("Authorization", ""))
            task = {"DATA_TYPE": "task", "task_id": task_id, "status": self.status}
            return 200, {}, json.dumps(task)

        return callback


def copy_as(source: Path, dest: Path, owner: tuple[int, int]) -> None:
    """``source`` to ``dest``, the folders made on the way and everything new owned by
    ``owner``, as a collection's storage gateway writes for its mapped account."""
    missing = [p for p in reversed(dest.parents) if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    for path in (*missing, dest):
        os.chown(path, *owner)


class AuthService:
    """Globus Auth's token, OpenID configuration and JWK endpoints for a login by the
    authorization code ``CODE``; ``.codes`` lists the codes exchanged."""

    CODE = "the-code-the-browser-showed"

    def __init__(self, client_id: str, identity: str):
        self.client_id, self.identity, self.codes = client_id, identity, []
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._mock = responses.RequestsMock(assert_all_requests_are_fired=False)

    def __enter__(self):
        self._mock.start()
        base = "https://auth.globus.org"
        self._mock.add(
            responses.GET,
            f"{base}/.well-known/openid-configuration",
            json={
                "issuer": base,
                "jwks_uri": f"{base}/jwk.json",
                "id_token_signing_alg_values_supported": ["RS512"],
            },
        )
        public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self._key.public_key()))
        self._mock.add(responses.GET, f"{base}/jwk.json", json={"keys": [public]})
        self._mock.add_callback(responses.POST, f"{base}/v2/oauth2/token", callback=self._token)
        return self

    def __exit__(self, *exc):
        self._mock.stop()
        self._mock.reset()

    def _token(self, request):
        from urllib.parse import parse_qs

        form = parse_qs(request.body if isinstance(request.body, str) else request.body.decode())
        self.codes.extend(form.get("code", []))
        now = int(time.time())
        claims = {
            "sub": self.identity,
            "aud": self.client_id,
            "iss": "https://auth.globus.org",
            "iat": now,
            "exp": now + 3600,
        }
        openid = {
            "access_token": "auth-access-token",
            "refresh_token": "auth-refresh-token",
            "scope": "openid",
            "expires_in": 172800,
            "token_type": "Bearer",
            "resource_server": "auth.globus.org",
            "id_token": jwt.encode(claims, self._key, algorithm="RS512"),
        }
        transfer = {
            "access_token": "transfer-access-token",
            "refresh_token": "transfer-refresh-token",
            "scope": TRANSFER_SCOPE,
            "expires_in": 172800,
            "token_type": "Bearer",
            "resource_server": TRANSFER_RS,
        }
        return 200, {}, json.dumps({**openid, "other_tokens": [transfer]})
