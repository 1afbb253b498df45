"""Only the right people change what is served: the ML IOC's ACF (CA and PVA) and the edge's
own check on edge:LoadModel, exercised by real clients running as other Unix users."""

import getpass
from types import SimpleNamespace

import pytest

from edgeloop.config import Config, SecurityConfig
from edgeloop.edge_pva.access import WriteAccess, peer_address
from edgeloop.ioc import softioc

ME = getpass.getuser()  # runs the servers; the service user


# TEST-NET-1 (RFC 5737): never the address of a client on this host
ELSEWHERE = "192.0.2.1"


# ---- without servers -----------------------------------------------------------------------
def test_acf_lists_are_quoted_so_their_commas_survive_macro_expansion():
    subs = softioc.acf_substitutions(
        SecurityConfig(operators=("alice", "bob"), service_user="svc", hosts=("h1", "h2"))
    )
    assert subs == 'OPERATORS="alice,bob",SERVICE="svc",HOSTS="h1,h2"'
    assert softioc.acf_substitutions() == f'OPERATORS="{ME}",SERVICE="{ME}",ANYHOST="#"'
    with pytest.raises(ValueError, match="not a user or host name"):
        softioc.acf_substitutions(SecurityConfig(operators=('x",SERVICE="me',)))


def test_access_flags_override_the_config(tmp_path, monkeypatch):
    from edgeloop.app import cli

    path = tmp_path / "config.json"
    Config(security=SecurityConfig(operators=("carol",), hosts=("h9",))).dump(path)
    seen = {}
    for name in ("ioc", "edge"):
        run = lambda args, name=name: seen.update({name: cli._config(args).security})  # noqa: E731
        monkeypatch.setattr(cli, f"cmd_{name}", run)
    monkeypatch.setattr(cli, "config_logging", lambda *a, **k: None)
    cli.main(["ioc", "--config", str(path), "--operators", "alice, bob", "--service-user", "svc"])
    cli.main(["edge", "--config", str(path), "--hosts", "h1,h2"])
    assert seen["ioc"] == SecurityConfig(
        operators=("alice", "bob"), service_user="svc", hosts=("h9",)
    )
    assert seen["edge"] == SecurityConfig(operators=("carol",), hosts=("h1", "h2"))


def fake_op(account: str, peer: str):
    return SimpleNamespace(account=lambda: account, peer=lambda: peer, name=lambda: "P:edge:X")


def test_write_access_checks_user_and_host_address():
    access = WriteAccess(SecurityConfig(operators=("alice", "bob"), service_user="svc"))
    assert access.refusal(fake_op("bob", "10.1.2.3:4567")) is None  # any host
    assert access.refusal(fake_op("svc", "[::1]:4567")) is None
    refusal = access.refusal(fake_op("mallory", "127.0.0.1:4567"))
    assert "not permitted" in refusal and "'mallory' is not an operator" in refusal
    assert access.refused == 1

    local = WriteAccess(SecurityConfig(operators=("alice",), hosts=("localhost", ELSEWHERE)))
    assert local.refusal(fake_op("alice", "127.0.0.1:4567")) is None
    assert local.refusal(fake_op("alice", "[::ffff:127.0.0.1]:4567")) is None
    assert local.refusal(fake_op("alice", f"{ELSEWHERE}:1")) is None
    assert "host 10.1.2.3 is not one of localhost" in local.refusal(fake_op("alice", "10.1.2.3:1"))
    assert WriteAccess().refusal(fake_op(ME, "127.0.0.1:1")) is None  # default: who runs it
    assert peer_address("[fe80::1]:5075") == "fe80::1"
