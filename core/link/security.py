"""CURVE encryption and authentication for the link, on by default whenever an address is not loopback.

Whoever can reach the learner's port could otherwise feed it experience or feed a robot weights that
drive its motors. Loopback is the only place a plain link is allowed, and even then it is logged.
Key files are zmq.auth certificates (`NAME.key` public, `NAME.key_secret` secret) made by
`reverie-keys create`. Both functions must be called before bind/connect.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from core.atomic import atomic_write_bytes
from core.config.link import robot_id_problem

_Z85_KEY_LEN = 40
BINDINGS_FILE = "robot_keys.json"  # in the learner's run directory: robot id -> the CURVE key that owns it
_FIX = (
    "create keys with `reverie-keys create learner` and `reverie-keys create <robot id>`, then set "
    "link.server_secret and link.allow_dir on the learner, link.client_secret and link.server_public on each robot"
)


class LinkSecurityError(RuntimeError):
    """The link cannot be secured as configured (missing keys, unreadable key files, refused plain link)."""


@dataclass(frozen=True)
class ServerKeys:
    """The learner's own keypair (secret file) and the directory of allowed robot public keys (*.key)."""

    secret_file: Path
    allow_dir: Path


@dataclass(frozen=True)
class ClientKeys:
    """A robot's own keypair (secret file) and the learner's public key file."""

    secret_file: Path
    server_public_file: Path


def _host_is_loopback(host: str) -> bool:
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # "*", interface names and other host names: not provably loopback
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def is_loopback(address: str) -> bool:
    """True only when traffic on `address` provably never leaves this machine (tcp to 127/8, ::1, localhost;
    ipc; inproc). Wildcards, other hosts and unknown transports are treated as reachable from outside."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        return False
    scheme = scheme.lower()
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    # "tcp://source;endpoint" (connect from a source address, its port optional): every host must be loopback.
    parts = rest.split(";")
    for i, part in enumerate(parts):
        if part.startswith("["):
            host, close, _ = part.partition("]")
            if not close:
                return False
            host = host + "]"
        else:
            host, colon, _ = part.rpartition(":")
            if not colon:
                if i == len(parts) - 1:
                    return False  # the endpoint itself needs a port
                host = part
        if not _host_is_loopback(host):
            return False
    return True


def _plain(address: str, keys: object, log: logging.Logger, role: str) -> bool:
    """Policy without keys: loopback is allowed with a warning, anything else is refused."""
    if keys is not None:
        return False
    if not is_loopback(address):
        raise LinkSecurityError(
            f"refusing an unencrypted, unauthenticated link on {address}: it is not loopback, so anyone who can reach "
            f"it could send experience or weights; {_FIX}"
        )
    log.warning("%s: unencrypted, unauthenticated link on loopback (%s); fine for one machine only", role, address)
    return True


def load_key(
    path: Path, need_secret: bool, what: str, log: logging.Logger | None = None
) -> tuple[bytes, bytes | None]:
    """(public, secret) Z85 keys of a zmq key file, with errors naming the file and what it was for."""
    path = Path(path)
    if not path.is_file():
        raise LinkSecurityError(f"{what} {path} does not exist or is not a file; {_FIX}")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise LinkSecurityError(f"{what} {path} cannot be read as a zmq key file: {exc}") from None
    if len(public) != _Z85_KEY_LEN:
        raise LinkSecurityError(f"{what} {path}: public key is not a {_Z85_KEY_LEN}-character Z85 key")
    if need_secret:
        if secret is None or len(secret) != _Z85_KEY_LEN:
            raise LinkSecurityError(f"{what} {path} holds no secret key; give the *.key_secret file, not the *.key")
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            (log or logging.getLogger(__name__)).warning("%s %s is readable by other users; chmod 600 it", what, path)
    return public, secret


def _allowed_keys(allow_dir: Path) -> list[Path]:
    allow_dir = Path(allow_dir)
    if not allow_dir.is_dir():
        raise LinkSecurityError(f"allow_dir {allow_dir} is not a directory of robot public keys (*.key); {_FIX}")
    files = sorted(allow_dir.glob("*.key"))
    if not files:
        raise LinkSecurityError(
            f"allow_dir {allow_dir} holds no robot public keys (*.key), so no robot could connect; copy each "
            "robot's NAME.key there"
        )
    for file in files:
        load_key(file, need_secret=False, what="allowed robot key")
    return files


class KeyBindings:
    """Which CURVE public key owns each robot id in a run: the first key that said hello with it.

    CURVE proves a peer holds one of the allowed keys, not that it is the robot it names; without this any
    allowed key could speak for another robot and make the learner acknowledge (so the robot delete) chunks it
    never stored. Kept in the run directory (written before the hello is answered), so a restart keeps it;
    an operator who moves a robot to a new key removes its line.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._owners: dict[str, str] = self._load()

    def _load(self) -> dict[str, str]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LinkSecurityError(f"{self.path}: unreadable robot key bindings ({exc}); fix or remove it") from None
        ok = isinstance(data, dict) and all(
            isinstance(k, str) and robot_id_problem(k) is None and isinstance(v, str) and len(v) == _Z85_KEY_LEN
            for k, v in data.items()
        )
        if not ok:
            raise LinkSecurityError(
                f"{self.path}: robot key bindings must map robot ids to {_Z85_KEY_LEN}-character Z85 public keys; "
                "fix or remove it"
            )
        return dict(data)

    def owner(self, robot: str) -> str | None:
        """The key that owns `robot`, None while no key has used it."""
        return self._owners.get(robot)

    def claim(self, robot: str, key: str) -> str | None:
        """None if `key` may speak for `robot` (binding it now if the id is new), else why not."""
        if not key:
            return "no CURVE key on this connection"
        owner = self._owners.get(robot)
        if owner == key:
            return None
        if owner is not None:
            return (f"robot id {robot!r} belongs to another CURVE key in this run ({owner[:8]}...; this connection "
                    f"has {key[:8]}...); if that robot really has a new key, remove its line from {self.path}")
        self._owners[robot] = key
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, json.dumps(self._owners, indent=1, sort_keys=True).encode())
        except OSError as exc:
            del self._owners[robot]
            return f"the learner cannot record which key owns robot id {robot!r} ({exc.strerror or exc})"
        return None


def secure_server(
    ctx: zmq.Context, sock: zmq.Socket, address: str, keys: ServerKeys | None, log: logging.Logger
) -> ThreadAuthenticator | None:
    """Make `sock` a CURVE server that admits only robots whose public key is in keys.allow_dir.

    Returns the running authenticator (the caller stops it on close), or None for a plain loopback link.
    Call before bind. Robots with unknown keys are dropped by ZAP: their messages never arrive.
    """
    if _plain(address, keys, log, "learner"):
        return None
    assert keys is not None
    public, secret = load_key(keys.secret_file, need_secret=True, what="learner secret key file", log=log)
    files = _allowed_keys(keys.allow_dir)
    auth = ThreadAuthenticator(ctx, log=log.getChild("zap"))
    try:
        auth.start()
    except zmq.ZMQError as exc:
        raise LinkSecurityError(
            f"cannot start the ZAP authenticator (one already runs on this context?): {exc}"
        ) from None
    try:
        auth.configure_curve(domain="*", location=str(keys.allow_dir))
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True
    except BaseException:
        auth.stop()
        raise
    log.info("learner: CURVE on %s, %d allowed robot key(s) from %s", address, len(files), keys.allow_dir)
    return auth


def secure_client(sock: zmq.Socket, address: str, keys: ClientKeys | None, log: logging.Logger) -> None:
    """Make `sock` a CURVE client with the robot's own keypair, trusting only the learner's public key.

    Call before connect. A learner that does not know this robot's key silently drops the connection.
    """
    if _plain(address, keys, log, "robot"):
        return
    assert keys is not None
    public, secret = load_key(keys.secret_file, need_secret=True, what="robot secret key file", log=log)
    server_public, _ = load_key(keys.server_public_file, need_secret=False, what="learner public key file")
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public
    log.info("robot: CURVE to %s", address)


def create_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key (public, to share) and NAME.key_secret (mode 600, stays on its machine) into `directory`.

    Returns (public_file, secret_file). Refuses to overwrite: replacing a key locks out every peer that
    trusted the old one.
    """
    if expected := robot_id_problem(name):  # a robot's key is named by its robot id
        raise LinkSecurityError(f"key name {name!r} must be {expected}")
    directory = Path(directory)
    public_file, secret_file = directory / f"{name}.key", directory / f"{name}.key_secret"
    for file in (public_file, secret_file):
        if file.exists():
            raise LinkSecurityError(f"{file} already exists; refusing to overwrite a key (remove it first if intended)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        old_umask = os.umask(0o077)  # the secret file is never readable by others, not even briefly
        try:
            zmq.auth.create_certificates(directory, name)
        finally:
            os.umask(old_umask)
        public_file.chmod(0o644)
    except OSError as exc:
        raise LinkSecurityError(f"cannot write keys into {directory}: {exc}") from None
    return public_file, secret_file
