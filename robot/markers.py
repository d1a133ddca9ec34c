"""Where things are on a real table, from a camera: ArUco marker poses, an HSV colour blob, reward helpers.

Real tasks need rewards without a simulator's ground truth. A printed ArUco marker on an object gives its
position and heading (OpenCV's detector, then `solvePnP` with the square-marker IPPE solver); a brightly
coloured target gives a pixel centroid (the DayDreamer recipe: threshold in HSV, take the blob).

Frames: the camera frame is OpenCV's (x right, y down, z along the optical axis, metres). A marker's own
frame has x to the right of the printed image, y up it, z out of the paper. Given `table_from_camera`
(a 4x4 homogeneous transform taking camera-frame points to table-frame points, z up from the table),
positions are reported in the table frame and the heading is the angle of the marker's x axis about the
table's z axis. Without it, positions are in the camera frame and the heading is about the optical axis
(the right thing for a camera looking straight down).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MarkerPose:
    """One marker seen in one image."""

    id: int
    position: np.ndarray  # (3,) metres, camera frame, or table frame when a table transform is given
    heading: float  # rad, rotation of the marker's x axis about the table normal (or the optical axis)
    corners: np.ndarray  # (4, 2) pixel corners: top-left, top-right, bottom-right, bottom-left of the print
    time: float
    rotation: np.ndarray | None = None  # (3, 3) the marker's axes as columns, in the frame of `position`


@dataclass(frozen=True)
class CameraModel:
    """Pinhole intrinsics with OpenCV's 5-term distortion (k1, k2, p1, p2, k3); pixel centres at integers."""

    fx: float
    fy: float
    cx: float
    cy: float
    distortion: np.ndarray = field(default_factory=lambda: np.zeros(5))

    def __post_init__(self) -> None:
        for name in ("fx", "fy"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"camera model: {name} must be a positive focal length in pixels, got {value!r}")
        for name in ("cx", "cy"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"camera model: {name} must be finite, got {getattr(self, name)!r}")
        dist = np.asarray(self.distortion, dtype=np.float64).reshape(-1)
        if dist.shape != (5,) or not np.all(np.isfinite(dist)):
            raise ValueError(f"camera model: distortion must be 5 finite numbers (k1, k2, p1, p2, k3), got {dist}")
        object.__setattr__(self, "distortion", dist)

    @classmethod
    def from_fov(cls, width: int, height: int, fov_deg: float) -> CameraModel:
        """An ideal camera from a vertical field of view (as PyBullet and `CameraConfig.fov_deg` use)."""
        if width <= 0 or height <= 0:
            raise ValueError(f"camera model: image size must be positive, got {width}x{height}")
        if not 0 < fov_deg < 180:
            raise ValueError(f"camera model: fov_deg must be in (0, 180), got {fov_deg}")
        f = (height / 2) / math.tan(math.radians(fov_deg) / 2)
        return cls(fx=f, fy=f, cx=(width - 1) / 2, cy=(height - 1) / 2)

    @classmethod
    def from_mapping(cls, values: Mapping[str, object], where: str = "camera") -> CameraModel:
        """From calibration output or a config block: keys fx, fy, cx, cy and optionally distortion."""
        unknown = set(values) - {"fx", "fy", "cx", "cy", "distortion"}
        if unknown:
            known = "fx, fy, cx, cy, distortion"
            raise ValueError(f"{where}: unknown intrinsics field(s) {sorted(unknown)}; expected {known}")
        missing = [k for k in ("fx", "fy", "cx", "cy") if k not in values]
        if missing:
            raise ValueError(f"{where}: missing intrinsics field(s) {missing}")
        numbers = {}
        for key in ("fx", "fy", "cx", "cy"):
            try:
                numbers[key] = float(values[key])  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise ValueError(f"{where}.{key}: expected a number, got {values[key]!r}") from None
        dist = values.get("distortion", [0.0] * 5)
        try:
            return cls(**numbers, distortion=np.asarray(dist, dtype=np.float64))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    @property
    def matrix(self) -> np.ndarray:
        """The 3x3 intrinsic matrix K."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])


def aruco_dictionary(name: str) -> cv2.aruco.Dictionary:
    """OpenCV's predefined dictionary by name (e.g. "DICT_4X4_50"); a clear error lists the valid names."""
    value = getattr(cv2.aruco, name, None) if name.startswith("DICT_") else None
    if not isinstance(value, int):
        names = sorted(n for n in dir(cv2.aruco) if n.startswith("DICT_"))
        raise ValueError(f"unknown ArUco dictionary {name!r}; choose one of {names}")
    return cv2.aruco.getPredefinedDictionary(value)


def generate_marker(id: int, pixels: int, dictionary: str = "DICT_4X4_50", margin_px: int = 0) -> np.ndarray:
    """A printable marker: uint8 grey image, the black square `pixels` wide inside a white margin.

    Print it with a white quiet zone around it (at least one cell wide; `margin_px` adds one) and measure the
    black square's side: that is the tracker's `marker_size_m`.
    """
    vocab = aruco_dictionary(dictionary)
    count = vocab.bytesList.shape[0]
    if not 0 <= id < count:
        raise ValueError(f"marker id {id} is not in {dictionary}, which has ids 0..{count - 1}")
    cells = vocab.markerSize + 2
    if pixels < cells:
        raise ValueError(f"marker of {dictionary} needs at least {cells} pixels across, got {pixels}")
    if margin_px < 0:
        raise ValueError(f"margin_px must be >= 0, got {margin_px}")
    image = cv2.aruco.generateImageMarker(vocab, id, pixels)
    return cv2.copyMakeBorder(image, *[margin_px] * 4, cv2.BORDER_CONSTANT, value=255)


def _rgb(image: np.ndarray, what: str) -> np.ndarray:
    """Checks an image is HxWx3 uint8: a BGR/grey/float mix-up must fail loudly, not detect nothing."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{what}: expected an RGB uint8 image of shape (H, W, 3), got {got}")
    return image


def _check_transform(matrix: np.ndarray | None) -> np.ndarray | None:
    if matrix is None:
        return None
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"table_from_camera must be a 4x4 homogeneous transform, got shape {m.shape}")
    rot = m[:3, :3]
    if not np.allclose(rot @ rot.T, np.eye(3), atol=1e-6) or not np.isclose(np.linalg.det(rot), 1.0, atol=1e-6):
        raise ValueError("table_from_camera: the upper-left 3x3 block must be a rotation (orthonormal, det +1)")
    if not np.allclose(m[3], [0, 0, 0, 1]):
        raise ValueError(f"table_from_camera: the last row must be [0, 0, 0, 1], got {m[3]}")
    return m


class MarkerTracker:
    """Finds ArUco markers of one size and dictionary in RGB images and returns their poses."""

    def __init__(
        self,
        camera: CameraModel,
        marker_size_m: float,
        dictionary: str = "DICT_4X4_50",
        table_from_camera: np.ndarray | None = None,
    ) -> None:
        if not (math.isfinite(marker_size_m) and marker_size_m > 0):
            raise ValueError(f"marker_size_m must be a positive side length in metres, got {marker_size_m!r}")
        self.camera = camera
        self.marker_size_m = marker_size_m
        self.table_from_camera = _check_transform(table_from_camera)
        self._detector = cv2.aruco.ArucoDetector(aruco_dictionary(dictionary), cv2.aruco.DetectorParameters())
        self._detector_params_refine()
        h = marker_size_m / 2  # corner order of IPPE_SQUARE: top-left, top-right, bottom-right, bottom-left
        self._object = np.array([[-h, h, 0], [h, h, 0], [h, -h, 0], [-h, -h, 0]], dtype=np.float64)

    def _detector_params_refine(self) -> None:
        """Sub-pixel corner refinement: the default (none) costs millimetres of position at half a metre."""
        params = self._detector.getDetectorParameters()
        params.cornerRefinementMethod = cv2.aruco.CORNER_REFINE_SUBPIX
        self._detector.setDetectorParameters(params)

    def detect(
        self, image_rgb: np.ndarray, time: float = 0.0, facing: np.ndarray | None = None
    ) -> dict[int, MarkerPose]:
        """Poses of the markers fully in view, by id. Ids seen twice are ambiguous and left out.

        A flat square seen from afar has two poses that fit its corners almost equally well (mirror images
        about the line of sight); the wrong one tilts the marker by tens of degrees and shifts its position
        by centimetres. `facing`, a camera-frame direction the markers' normals are known to be near (the
        table's up axis, for markers lying or mounted facing up), picks the solution nearest to it.

        A marker cut by the image edge is not decoded: ArUco rejects candidates closer than
        `minDistanceToBorder` (3 px) to it, so a half-seen marker never yields a skewed pose.
        """
        image = _rgb(image_rgb, "MarkerTracker.detect")
        corners, ids, _ = self._detector.detectMarkers(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))
        if ids is None:
            return {}
        found: dict[int, list[np.ndarray]] = {}
        for marker_id, quad in zip(ids.reshape(-1).tolist(), corners, strict=True):
            found.setdefault(int(marker_id), []).append(quad.reshape(4, 2).astype(np.float64))
        poses = {}
        for marker_id, quads in found.items():
            if len(quads) > 1:
                log.warning("marker %d seen %d times in one image: not reported", marker_id, len(quads))
                continue
            pose = self._pose(marker_id, quads[0], time, facing)
            if pose is not None:
                poses[marker_id] = pose
        return poses

    def _pose(self, marker_id: int, quad: np.ndarray, time: float, facing: np.ndarray | None) -> MarkerPose | None:
        count, rvecs, tvecs, _ = cv2.solvePnPGeneric(
            self._object, quad, self.camera.matrix, self.camera.distortion, flags=cv2.SOLVEPNP_IPPE_SQUARE
        )
        if not count:
            return None
        solutions = [(cv2.Rodrigues(r)[0], t) for r, t in zip(rvecs, tvecs)]  # best reprojection first
        if facing is not None:
            solutions.sort(key=lambda sol: -float(sol[0][:, 2] @ facing))
        rot, tvec = solutions[0]
        position = tvec.reshape(3)
        if self.table_from_camera is not None:
            position = self.table_from_camera[:3, :3] @ position + self.table_from_camera[:3, 3]
            rot = self.table_from_camera[:3, :3] @ rot
        heading = math.atan2(rot[1, 0], rot[0, 0])
        return MarkerPose(id=marker_id, position=position, heading=heading, corners=quad, time=time, rotation=rot)


class ColorDetector:
    """The largest blob within an HSV box (OpenCV ranges: H 0..179, S and V 0..255).

    A hue range with low > high wraps around 180, as red needs: (170, 120, 80)..(10, 255, 255).
    """

    def __init__(self, hsv_low: tuple[int, int, int], hsv_high: tuple[int, int, int], min_area_px: int = 20) -> None:
        self.hsv_low = _hsv("hsv_low", hsv_low)
        self.hsv_high = _hsv("hsv_high", hsv_high)
        for i, name in ((1, "saturation"), (2, "value")):
            if self.hsv_low[i] > self.hsv_high[i]:
                raise ValueError(f"ColorDetector: {name} low {self.hsv_low[i]} is above high {self.hsv_high[i]}")
        if min_area_px < 1:
            raise ValueError(f"ColorDetector: min_area_px must be >= 1, got {min_area_px}")
        self.min_area_px = min_area_px

    def mask(self, image_rgb: np.ndarray) -> np.ndarray:
        """uint8 mask (255 inside the HSV box), for debugging thresholds on real footage."""
        hsv = cv2.cvtColor(_rgb(image_rgb, "ColorDetector"), cv2.COLOR_RGB2HSV)
        low, high = self.hsv_low, self.hsv_high
        if low[0] <= high[0]:
            return cv2.inRange(hsv, np.array(low), np.array(high))
        upper = cv2.inRange(hsv, np.array(low), np.array((179, high[1], high[2])))
        lower = cv2.inRange(hsv, np.array((0, low[1], low[2])), np.array(high))
        return cv2.bitwise_or(upper, lower)

    def detect(self, image_rgb: np.ndarray) -> tuple[float, float, int] | None:
        """Centroid x, y (pixels) and area of the largest matching blob, or None if none is big enough."""
        count, _, stats, centroids = cv2.connectedComponentsWithStats(self.mask(image_rgb), connectivity=8)
        if count <= 1:
            return None
        best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        area = int(stats[best, cv2.CC_STAT_AREA])
        if area < self.min_area_px:
            return None
        return float(centroids[best, 0]), float(centroids[best, 1]), area


def _hsv(name: str, value: Sequence[int]) -> tuple[int, int, int]:
    values = tuple(int(v) for v in value)
    limits = (179, 255, 255)
    if len(values) != 3 or any(not 0 <= v <= top for v, top in zip(values, limits, strict=False)):
        raise ValueError(f"ColorDetector: {name} must be (H 0..179, S 0..255, V 0..255), got {tuple(value)}")
    return values  # type: ignore[return-value]


def _vector(name: str, value: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64).reshape(-1)
    if array.size == 0 or not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be a non-empty vector of finite numbers, got {value!r}")
    return array


def _same_length(**vectors: np.ndarray) -> None:
    sizes = {k: v.size for k, v in vectors.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"vectors differ in length: {sizes}")


def distance_reward(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Minus the Euclidean distance: highest (0) when `a` reaches `b`, dense everywhere (reach tasks)."""
    va, vb = _vector("a", a), _vector("b", b)
    _same_length(a=va, b=vb)
    return -float(np.linalg.norm(va - vb))


def progress_along(
    axis: Sequence[float] | np.ndarray, start: Sequence[float] | np.ndarray, now: Sequence[float] | np.ndarray
) -> float:
    """Signed distance moved from `start` to `now` along `axis` (normalised): forward progress of a walker."""
    vaxis, vstart, vnow = _vector("axis", axis), _vector("start", start), _vector("now", now)
    _same_length(axis=vaxis, start=vstart, now=vnow)
    norm = float(np.linalg.norm(vaxis))
    if norm < 1e-12:
        raise ValueError(f"progress_along: axis must not be zero, got {axis!r}")
    return float(np.dot(vnow - vstart, vaxis) / norm)


def in_region(
    position: Sequence[float] | np.ndarray, low: Sequence[float] | np.ndarray, high: Sequence[float] | np.ndarray
) -> bool:
    """Whether `position` lies in the closed box [low, high] (place tasks: the object is on the target)."""
    vpos, vlow, vhigh = _vector("position", position), _vector("low", low), _vector("high", high)
    _same_length(position=vpos, low=vlow, high=vhigh)
    if np.any(vlow > vhigh):
        raise ValueError(f"in_region: low {vlow.tolist()} is above high {vhigh.tolist()} on some axis")
    return bool(np.all(vpos >= vlow) and np.all(vpos <= vhigh))
