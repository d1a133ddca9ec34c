"""Assets from the pybullet wheel's `pybullet_data`, and light render proxies of them.

The software renderer's cost follows triangle counts; the xArm6 as shipped draws ~26k triangles
in one link alone. A render proxy is the same URDF with each link's visual geometry replaced by its
collision geometry (convex hulls or primitives, a few hundred triangles), written once to a cache.
Physics is unchanged: collision geometry, inertias and joints are identical.
"""

from __future__ import annotations

import copy
import hashlib
import os
import tempfile
import xml.etree.ElementTree as ET
from functools import cache
from pathlib import Path

import pybullet_data

DATA = Path(pybullet_data.getDataPath())


def asset(relative: str) -> str:
    """Absolute path of a file inside pybullet_data; a clear error if this wheel lacks it."""
    path = DATA / relative
    if not path.is_file():
        raise FileNotFoundError(f"pybullet_data has no {relative!r} (looked in {DATA})")
    return str(path)


def _cache_dir() -> Path:
    root = Path(os.environ.get("REVERIE_CACHE", Path(tempfile.gettempdir()) / f"reverie-cache-{os.getuid()}"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _absolute_mesh(filename: str, urdf_dir: Path) -> str:
    if filename.startswith("package://"):
        return str(urdf_dir / filename.removeprefix("package://"))
    return filename if os.path.isabs(filename) else str(urdf_dir / filename)


def make_render_proxy(urdf_text: str, urdf_dir: Path) -> str:
    """Return URDF text whose visuals use the collision geometry of the same link."""
    root = ET.fromstring(urdf_text)
    for link in root.iter("link"):
        collision = link.find("collision")
        visual = link.find("visual")
        if collision is None or visual is None or collision.find("geometry") is None:
            continue
        for tag in ("origin", "geometry"):
            old = visual.find(tag)
            if old is not None:
                visual.remove(old)
            new = collision.find(tag)
            if new is not None:
                visual.insert(0, copy.deepcopy(new))
    for mesh in root.iter("mesh"):
        mesh.set("filename", _absolute_mesh(mesh.get("filename", ""), urdf_dir))
    return ET.tostring(root, encoding="unicode")


def _meshes_missing(urdf: Path) -> bool:
    """True when a cached proxy cannot be loaded as is: unreadable, or a mesh it names is gone."""
    try:
        root = ET.parse(urdf).getroot()
    except (OSError, ET.ParseError):
        return True
    return any(not os.path.isfile(m.get("filename", "")) for m in root.iter("mesh"))


@cache
def render_proxy(relative: str) -> str:
    """Path of the (cached) render proxy of a pybullet_data URDF.

    A proxy holds the absolute mesh paths of the pybullet_data that made it, and the cache outlives
    that install (it sits in the temp dir, shared by every clone and venv of this user). So the key
    includes where this pybullet_data lives, and a cached file whose meshes are gone is written again.
    """
    source = Path(asset(relative))
    text = source.read_text()
    digest = hashlib.sha1("\0".join((str(DATA.resolve()), relative, text)).encode()).hexdigest()[:12]
    target = _cache_dir() / f"{source.stem}-proxy-{digest}.urdf"
    if not target.exists() or _meshes_missing(target):
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(make_render_proxy(text, source.parent))
        os.replace(tmp, target)  # atomic: parallel test workers may race here
    return str(target)


def robot_urdf(relative: str, proxy: bool) -> str:
    return render_proxy(relative) if proxy else asset(relative)
