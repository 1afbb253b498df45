"""Who the service is to Globus Transfer: ``transfer_app(cfg)`` (a globus-sdk app whose tokens
live in its token storage and are refreshed by the SDK), ``transfer_client(cfg)`` (refusing at
once, naming the command, when no login is stored), and ``login(cfg)`` (what
``edgeloop globus login`` runs once per host and user).

Two identities, as Globus Compute's endpoint has them:

- a user's: ``remote.globus_client_id`` names a native app registered for edgeloop
  (app.globus.org); ``edgeloop globus login`` stores that user's tokens, with refresh
  tokens, in ``remote.globus_token_file`` (SQLite);
- a service account's: ``GLOBUS_CLIENT_ID`` and ``GLOBUS_CLIENT_SECRET`` in the environment
  (a confidential client); it gets its tokens itself and needs no login.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgeloop.config import Config
from edgeloop.optional import require

APP_NAME = "edgeloop"
LOGIN_COMMAND = "edgeloop globus login"


class GlobusLoginError(RuntimeError):
    pass


def token_file(cfg: Config) -> Path:
    return Path(cfg.remote.globus_token_file).expanduser()


def transfer_app(cfg: Config):
    """The globus-sdk app that authorises Transfer calls, its scope requirements including
    the collections' data access when ``remote.globus_data_access``."""
    globus_sdk = require("globus_sdk", "globus")
    from globus_sdk.token_storage import SQLiteTokenStorage

    client_id = os.environ.get("GLOBUS_CLIENT_ID")
    secret = os.environ.get("GLOBUS_CLIENT_SECRET")
    if client_id and secret:
        app = globus_sdk.ClientApp(APP_NAME, client_id=client_id, client_secret=secret)
    else:
        if not cfg.remote.globus_client_id:
            raise GlobusLoginError(
                "Globus Transfer needs remote.globus_client_id (a native app registered for "
                "edgeloop at app.globus.org) and `edgeloop globus login` once, or "
                "GLOBUS_CLIENT_ID and GLOBUS_CLIENT_SECRET of a confidential client"
            )
        path = token_file(cfg)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        storage = SQLiteTokenStorage(path)
        path.chmod(0o600)  # refresh tokens: this user's alone
        config = globus_sdk.GlobusAppConfig(token_storage=storage, request_refresh_tokens=True)
        app = globus_sdk.UserApp(APP_NAME, client_id=cfg.remote.globus_client_id, config=config)
    client = globus_sdk.TransferClient(app=app)
    if cfg.remote.globus_data_access:
        for collection in (cfg.remote.globus_source_collection, cfg.remote.globus_dest_collection):
            if collection:
                client.add_app_data_access_scope(collection)
    return app, client


def transfer_client(cfg: Config):
    """A TransferClient whose tokens come from the stored login; GlobusLoginError naming
    the login command when there is none (the SDK would otherwise prompt on stdin, which a
    service under procServ or systemd never answers)."""
    app, client = transfer_app(cfg)
    if app.login_required():
        raise GlobusLoginError(
            f"no Globus login for Transfer stored in {token_file(cfg)} (or one without the "
            f"collections' consents); run `{LOGIN_COMMAND}` once as this user"
        )
    return client


def login(cfg: Config) -> str:
    """Log in interactively (the SDK prints a URL and reads the code it shows) and store the
    tokens; returns where they are."""
    app, _ = transfer_app(cfg)
    app.login()
    return str(token_file(cfg))
