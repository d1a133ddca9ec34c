"""CURVE on the link: loopback detection, allow-listed robots get through, unknown keys do not, and the key CLI."""

from __future__ import annotations

import logging
import shutil
import stat
from pathlib import Path

import pytest
import zmq
import zmq.auth

from core.link.keys_cli import main as keys_main
from core.link.protocol import Message, decode, encode
from core.link.security import (
    ClientKeys,
    LinkSecurityError,
    ServerKeys,
    create_keypair,
    is_loopback,
    secure_client,
    secure_server,
)

LOG = logging.getLogger("test.link.security")


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.0.0.1:*", True),
        ("tcp://127.4.5.6:80", True),
        ("tcp://localhost:5555", True),
        ("TCP://LocalHost:5555", True),
        ("tcp://[::1]:5555", True),
        ("tcp://[::ffff:127.0.0.1]:5555", True),
        ("ipc:///tmp/h1_link.sock", True),
        ("inproc://link", True),
        ("tcp://127.0.0.1;127.0.0.1:5555", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://[::]:5555", False),
        ("tcp://192.168.1.20:5555", False),
        ("tcp://learner.lab:5555", False),
        ("tcp://localhost.evil.com:5555", False),
        ("tcp://128.0.0.1:5555", False),
        ("tcp://eth0;127.0.0.1:5555", False),
        ("tcp://127.0.0.1", False),
        ("ws://127.0.0.1:5555", False),
        ("127.0.0.1:5555", False),
    ],
)
def test_is_loopback(address: str, expected: bool) -> None:
    assert is_loopback(address) is expected


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """A learner keypair, an allowed robot r1, an unknown robot r2, and an allow dir holding r1's public key only."""
    learner_pub, learner_sec = create_keypair(tmp_path / "learner", "learner")
    r1_pub, r1_sec = create_keypair(tmp_path / "r1", "r1")
    _, r2_sec = create_keypair(tmp_path / "r2", "r2")
    allow = tmp_path / "allow"
    allow.mkdir()
    shutil.copy(r1_pub, allow / "r1.key")
    return {"learner_pub": learner_pub, "learner_sec": learner_sec, "r1_sec": r1_sec, "r2_sec": r2_sec,
            "allow": allow}


def _socket(ctx: zmq.Context, kind: int) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    return sock


def _client(ctx: zmq.Context, address: str, keys: ClientKeys | None) -> zmq.Socket:
    sock = _socket(ctx, zmq.DEALER)
    secure_client(sock, address, keys, LOG)
    sock.connect(address)
    return sock


def test_curve_admits_allowed_robot_and_drops_unknown_keys(keys: dict[str, Path]) -> None:
    ctx = zmq.Context()
    auth = None
    sockets: list[zmq.Socket] = []
    try:
        server = _socket(ctx, zmq.ROUTER)
        sockets.append(server)
        auth = secure_server(ctx, server, "tcp://127.0.0.1:*", ServerKeys(keys["learner_sec"], keys["allow"]), LOG)
        assert auth is not None
        server.bind("tcp://127.0.0.1:*")
        address = server.getsockopt(zmq.LAST_ENDPOINT).decode()

        robot = _client(ctx, address, ClientKeys(keys["r1_sec"], keys["learner_pub"]))
        sockets.append(robot)
        robot.send_multipart(encode(Message("heartbeat", robot="r1", meta={"n": 1})), copy=False)
        assert server.poll(5000), "the allowed robot's message never arrived"
        identity, *frames = server.recv_multipart(copy=False)
        assert decode(frames).meta == {"n": 1}
        server.send_multipart([identity, *encode(Message("ack", seq=1))], copy=False)
        assert robot.poll(5000), "the learner's reply never reached the robot"
        assert decode(robot.recv_multipart(copy=False)).kind == "ack"

        stranger = _client(ctx, address, ClientKeys(keys["r2_sec"], keys["learner_pub"]))
        plain = _client(ctx, address, None)  # loopback without keys: allowed to try, must still be refused
        sockets += [stranger, plain]
        for sock, name in ((stranger, "r2"), (plain, "r3")):
            sock.send_multipart(encode(Message("heartbeat", robot=name)), copy=False)
        assert not server.poll(1500), "a robot whose key is not allow-listed got a message through"

        robot.send_multipart(encode(Message("heartbeat", robot="r1", meta={"n": 2})), copy=False)
        assert server.poll(5000), "the allowed robot stopped getting through"
        _, *frames = server.recv_multipart(copy=False)
        assert decode(frames).robot == "r1"
    finally:
        for sock in sockets:
            sock.close(0)
        if auth is not None:
            auth.stop()
        ctx.term()


@pytest.mark.parametrize("address", ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://192.168.1.20:5555"])
def test_non_loopback_without_keys_is_refused(address: str) -> None:
    ctx = zmq.Context()
    sock = _socket(ctx, zmq.ROUTER)
    try:
        with pytest.raises(LinkSecurityError, match="reverie-keys create") as info:
            secure_server(ctx, sock, address, None, LOG)
        assert address in str(info.value) and "link.allow_dir" in str(info.value)
        with pytest.raises(LinkSecurityError, match="link.server_public"):
            secure_client(sock, address, None, LOG)
    finally:
        sock.close(0)
        ctx.term()


def test_loopback_without_keys_warns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOG.name)
    ctx = zmq.Context()
    sock = _socket(ctx, zmq.ROUTER)
    try:
        assert secure_server(ctx, sock, "tcp://127.0.0.1:*", None, LOG) is None
        secure_client(sock, "tcp://localhost:5555", None, LOG)
    finally:
        sock.close(0)
        ctx.term()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == LOG.name]
    assert len(warnings) == 2
    assert all("unencrypted, unauthenticated link on loopback" in w for w in warnings)
    assert "tcp://127.0.0.1:*" in warnings[0] and "tcp://localhost:5555" in warnings[1]


def test_bad_key_files_are_named(keys: dict[str, Path], tmp_path: Path) -> None:
    ctx = zmq.Context()
    sock = _socket(ctx, zmq.ROUTER)
    missing = tmp_path / "nope.key_secret"
    empty_allow = tmp_path / "empty"
    empty_allow.mkdir()
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    cases = [
        (ServerKeys(missing, keys["allow"]), str(missing)),
        (ServerKeys(keys["learner_pub"], keys["allow"]), "holds no secret key"),
        (ServerKeys(keys["learner_sec"], tmp_path / "no_dir"), "no_dir"),
        (ServerKeys(keys["learner_sec"], empty_allow), "holds no robot public keys"),
        (ServerKeys(keys["learner_sec"], tmp_path), str(garbage)),
    ]
    try:
        for server_keys, words in cases:
            with pytest.raises(LinkSecurityError) as info:
                auth = secure_server(ctx, sock, "tcp://127.0.0.1:*", server_keys, LOG)
                auth.stop()  # only reached if the bad keys were accepted
            assert words in str(info.value)
        with pytest.raises(LinkSecurityError, match="nope.key"):
            secure_client(sock, "tcp://10.0.0.2:5555", ClientKeys(keys["r1_sec"], tmp_path / "nope.key"), LOG)
    finally:
        sock.close(0)
        ctx.term()


def test_create_keypair_protects_the_secret_and_refuses_to_overwrite(tmp_path: Path) -> None:
    public, secret = create_keypair(tmp_path / "k", "arm-1")
    assert (public.name, secret.name) == ("arm-1.key", "arm-1.key_secret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pub_key, sec_key = zmq.auth.load_certificate(secret)
    assert zmq.auth.load_certificate(public) == (pub_key, None) and sec_key is not None
    before = secret.read_bytes()
    with pytest.raises(LinkSecurityError, match="already exists"):
        create_keypair(tmp_path / "k", "arm-1")
    assert secret.read_bytes() == before
    with pytest.raises(LinkSecurityError, match="key name"):
        create_keypair(tmp_path / "k", "../escape")


def test_keys_cli_create_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "keys"
    assert keys_main(["create", "arm-1", "--dir", str(directory)]) == 0
    out = capsys.readouterr().out
    public = directory / "arm-1.key"
    assert str(public) in out and "allow_dir" in out and "link.client_secret" in out
    assert keys_main(["create", "learner", "--dir", str(directory)]) == 0
    assert "link.server_public" in capsys.readouterr().out

    assert keys_main(["show", str(public)]) == 0
    shown = capsys.readouterr().out.strip()
    assert shown == zmq.auth.load_certificate(public)[0].decode()
    assert keys_main(["show", str(directory / "arm-1.key_secret")]) == 0
    assert capsys.readouterr().out.strip() == shown  # never the secret

    for argv, words in [
        (["create", "arm-1", "--dir", str(directory)], "already exists"),
        (["show", str(tmp_path / "missing.key")], "missing.key"),
        ([], "required"),
        (["rotate", "x"], "invalid choice"),
    ]:
        assert keys_main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert len(captured.err.strip().splitlines()) == 1 and words in captured.err
