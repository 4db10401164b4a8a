"""rosbag2 files (sqlite3 or mcap) in and out of the evaluation, with the `rosbags` library.

No ROS installation is needed: messages are (de)serialised with rosbags' typestore for ROS 2
Kilted, and image fields are decoded by :mod:`ros2_sab3r.frames.decode` (as in the node).

Topics (defaults of :class:`BagTopics`; every one can be renamed on the command line):

- ``/camera/color/image_raw``: sensor_msgs/Image (rgb8, bgr8, ...) or CompressedImage;
- ``/camera/color/camera_info``: sensor_msgs/CameraInfo, intrinsics (optional);
- ``/camera/depth/image``: sensor_msgs/Image, 32FC1 metres or 16UC1 millimetres, ground-truth
  depth registered to the colour image;
- ``/camera/semantic``: sensor_msgs/Image mono16, class id per pixel (see the label map);
- ``/camera/instance``: sensor_msgs/Image mono16, instance id per pixel;
- ``/gt/pose``: geometry_msgs/PoseStamped, T_WC of the camera's optical frame in the world frame;
- ``/gt/label_map``: std_msgs/String, one JSON message
  ``{"labels": {"1": "wall", ...}, "source": ..., "synthetic_scene": ...}``;
- ``/tf``, ``/tf_static``: tf2_msgs/TFMessage, for posed mode (``frames.pose_source: tf``).

Ground-truth images are matched to camera images by header stamp (within a tolerance) and must
have the camera image's size. Class id 0 means void/unlabelled.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
import io
import json
import logging
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from ros2_sab3r.frames.decode import (
    ConversionError,
    camera_info_to_K,
    depth_to_metres,
    image_to_rgb,
    image_to_scalar,
    rgb_to_image_fields,
    scalar_to_image_fields,
)
from ros2_sab3r.geometry.tf_buffer import TransformBuffer, TransformLookupError
from ros2_sab3r.types import CameraFrame

log = logging.getLogger(__name__)

STORAGES = ('sqlite3', 'mcap')


class BagError(ValueError):
    """A bag that cannot be read as asked; the message names the bag, the topic and the fix."""


@dataclass(frozen=True)
class BagTopics:
    """Topic names read from / written to a bag (module docstring)."""

    image: str = '/camera/color/image_raw'
    camera_info: str = '/camera/color/camera_info'
    depth: str = '/camera/depth/image'
    semantic: str = '/camera/semantic'
    instance: str = '/camera/instance'
    pose: str = '/gt/pose'
    label_map: str = '/gt/label_map'
    tf: str = '/tf'
    tf_static: str = '/tf_static'


@dataclass(frozen=True)
class GroundTruth:
    """What a bag knows about one frame beyond the image; each part may be missing (None)."""

    depth: np.ndarray | None = None  # (H, W) float32 camera z, metres, NaN = no measurement
    semantic: np.ndarray | None = None  # (H, W) int32 class id (label map), 0 = void
    instance: np.ndarray | None = None  # (H, W) int32 instance id, 0 = none
    T_WC: np.ndarray | None = None  # (4, 4) float64 camera pose in the ground-truth world


@dataclass(frozen=True)
class BagFrame:
    camera: CameraFrame  # the image as the node would receive it (K from CameraInfo if any)
    truth: GroundTruth


@dataclass
class BagData:
    """Everything read from a bag, frames sorted by stamp."""

    path: Path
    storage: str
    frames: list[BagFrame]
    label_map: dict[int, str] = field(default_factory=dict)  # class id -> name
    info: dict = field(default_factory=dict)  # the rest of the label-map JSON (source, scene)
    topics: dict[str, str] = field(default_factory=dict)  # every topic in the bag -> type
    notes: list[str] = field(default_factory=list)  # data problems worked around, for the report
    tf: TransformBuffer | None = None

    def has(self, part: str) -> bool:
        """True when every frame has ground truth `part` ('depth', 'semantic', 'T_WC', ...)."""
        return bool(self.frames) and all(getattr(f.truth, part) is not None for f in self.frames)


def _typestore():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


def _ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def pose_to_matrix(position, orientation) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = Rotation.from_quat([orientation.x, orientation.y, orientation.z,
                                    orientation.w]).as_matrix()
    T[:3, 3] = (position.x, position.y, position.z)
    return T


# ----------------------------------------------------------------------------------- reading
def read_bag(path: str | Path, topics: BagTopics = BagTopics(), stride: int = 1,
             max_frames: int = 0, sync_tolerance_ns: int = 20_000_000,
             tf_map_frame: str = '', progress: bool = True) -> BagData:
    """Read camera frames and whatever ground truth the bag has.

    `stride` keeps every n-th image, `max_frames` (0: all) caps how many are kept. With
    `tf_map_frame` each frame gets ``T_WC`` from the bag's TF (map <- image frame_id) for posed
    mode. Raises BagError for unreadable bags and a missing image topic.
    """
    from rosbags.rosbag2 import Reader, ReaderError

    path = Path(path)
    if stride < 1:
        raise BagError(f'stride={stride} must be at least 1')
    if not path.exists():
        raise BagError(f'bag {path} does not exist')
    if path.is_file() and path.suffix in ('.db3', '.mcap'):
        path = path.parent  # a bag is the folder with metadata.yaml; accept its storage file too
    if not (path / 'metadata.yaml').is_file():
        raise BagError(f'{path} is not a rosbag2 folder (no metadata.yaml); give the folder that '
                       '`ros2 bag record` or `sab3r-convert` wrote')
    ts = _typestore()
    try:
        reader = Reader(path)
        reader.open()
    except (ReaderError, OSError, ValueError, KeyError) as err:
        raise BagError(f'bag {path} cannot be opened: {err}; the bag is corrupt or incomplete '
                       '(re-record it, or `ros2 bag reindex` a bag whose recording was cut)'
                       ) from err
    try:
        return _read(reader, path, ts, topics, stride, max_frames, sync_tolerance_ns,
                     tf_map_frame, progress)
    finally:
        reader.close()


def _read(reader, path: Path, ts, topics: BagTopics, stride: int, max_frames: int,
          tol: int, tf_map_frame: str, progress: bool) -> BagData:
    from rosbags.rosbag2 import ReaderError

    available = {c.topic: c.msgtype for c in reader.connections}
    storage = 'mcap' if any(p.suffix == '.mcap' for p in path.iterdir()) else 'sqlite3'
    if topics.image not in available:
        listing = ', '.join(f'{t} ({m})' for t, m in sorted(available.items())) or 'none'
        raise BagError(f'bag {path} has no image topic {topics.image!r}; its topics: {listing}. '
                       'Pass the camera topic with --image-topic')
    image_type = available[topics.image]
    if image_type not in ('sensor_msgs/msg/Image', 'sensor_msgs/msg/CompressedImage'):
        raise BagError(f'{topics.image} in {path} is {image_type}, not sensor_msgs/Image or '
                       'CompressedImage')
    wanted = {getattr(topics, k): k for k in BagTopics.__dataclass_fields__
              if getattr(topics, k) in available}
    notes: list[str] = []
    raw: dict[str, list[tuple[int, bytes]]] = {k: [] for k in wanted.values()}
    label_json: dict = {}
    tf = TransformBuffer(cache_ns=10**18, tolerance_ns=tol) if tf_map_frame else None
    conns = [c for c in reader.connections if c.topic in wanted]
    bar = tqdm(total=sum(c.msgcount for c in conns), desc=f'reading {path.name}', unit='msg',
               disable=not progress, leave=False)
    index = 0
    try:
        for conn, _t, data in reader.messages(connections=conns):
            index += 1
            bar.update()
            kind = wanted[conn.topic]
            try:
                if kind in ('image', 'camera_info', 'depth', 'semantic', 'instance', 'pose'):
                    # decode the header only later for images; stamps are needed now
                    msg = ts.deserialize_cdr(data, conn.msgtype)
                    raw[kind].append((_ns(msg.header.stamp), msg))
                elif kind == 'label_map':
                    label_json = json.loads(ts.deserialize_cdr(data, conn.msgtype).data)
                elif tf is not None:
                    for t in ts.deserialize_cdr(data, conn.msgtype).transforms:
                        tr = t.transform
                        tf.set_transform(t.header.frame_id, t.child_frame_id, _ns(t.header.stamp),
                                         pose_to_matrix(tr.translation, tr.rotation),
                                         static=kind == 'tf_static')
            except (ValueError, AssertionError, IndexError, KeyError, TypeError) as err:
                raise BagError(f'message {index} on {conn.topic} in {path} cannot be decoded '
                               f'({type(err).__name__}: {err}); the bag is corrupt or was '
                               'written with another definition of that message type') from err
    except ReaderError as err:
        raise BagError(f'bag {path} is corrupt: {err}') from err
    finally:
        bar.close()

    images = raw['image']
    if not images:
        raise BagError(f'{topics.image} in {path} has no messages')
    stamps = np.array([s for s, _ in images], dtype=np.int64)
    if np.any(np.diff(stamps) < 0):
        notes.append(f'{int(np.sum(np.diff(stamps) < 0))} image(s) on {topics.image} arrived '
                     'with stamps older than the previous one; frames were sorted by stamp')
        images = sorted(images, key=lambda item: item[0])
    unique: list[tuple[int, object]] = []
    for s, m in images:
        if unique and unique[-1][0] == s:
            continue
        unique.append((s, m))
    if len(unique) < len(images):
        notes.append(f'{len(images) - len(unique)} image(s) with a duplicate stamp were dropped')
    selected = unique[::stride]
    if max_frames > 0:
        selected = selected[:max_frames]

    labels = {int(k): str(v) for k, v in label_json.get('labels', {}).items()}
    info = {k: v for k, v in label_json.items() if k != 'labels'}
    by_kind = {k: _StampIndex(v) for k, v in raw.items() if k != 'image'}
    for kind in ('depth', 'semantic', 'instance', 'pose'):
        if not raw.get(kind):
            topic = getattr(topics, 'pose' if kind == 'pose' else kind)
            notes.append(f'no ground-truth {kind} ({topic} is not in the bag)')
    frames = []
    missing: dict[str, int] = {}
    for stamp, msg in tqdm(selected, desc='decoding frames', unit='frame', disable=not progress,
                           leave=False):
        frames.append(_frame(stamp, msg, image_type, by_kind, tol, tf, tf_map_frame, missing,
                             path, topics))
    for kind, count in missing.items():
        notes.append(f'{count} of {len(frames)} frames have no {kind} within '
                     f'{tol / 1e6:.0f} ms of their stamp; that ground truth is not used for them')
    return BagData(path=path, storage=storage, frames=frames, label_map=labels, info=info,
                   topics=available, notes=notes, tf=tf)


class _StampIndex:
    """Messages of one topic, looked up by the nearest header stamp."""

    def __init__(self, items: list[tuple[int, object]]) -> None:
        items = sorted(items, key=lambda item: item[0])
        self.stamps = np.array([s for s, _ in items], dtype=np.int64)
        self.msgs = [m for _, m in items]

    def nearest(self, stamp: int, tol: int):
        if not len(self.stamps):
            return None
        i = int(np.searchsorted(self.stamps, stamp))
        best = min((j for j in (i - 1, i) if 0 <= j < len(self.stamps)),
                   key=lambda j: abs(int(self.stamps[j]) - stamp))
        return self.msgs[best] if abs(int(self.stamps[best]) - stamp) <= tol else None


def _decode_image(msg, image_type: str) -> np.ndarray:
    if image_type.endswith('CompressedImage'):
        from PIL import Image as PILImage

        try:
            with PILImage.open(io.BytesIO(bytes(msg.data))) as im:
                return np.asarray(im.convert('RGB'))
        except OSError as err:
            raise ConversionError(f'compressed image ({msg.format}) cannot be decoded: {err}'
                                  ) from err
    return image_to_rgb(msg.encoding, msg.height, msg.width, msg.step, msg.data.tobytes(),
                        msg.is_bigendian)


def _frame(stamp: int, msg, image_type: str, index: dict, tol: int, tf, tf_map_frame: str,
           missing: dict, path: Path, topics: BagTopics) -> BagFrame:
    try:
        rgb = _decode_image(msg, image_type)
    except ConversionError as err:
        raise BagError(f'image at {stamp / 1e9:.3f} s on {topics.image} in {path}: {err}'
                       ) from err
    H, W = rgb.shape[:2]
    K = None
    info = index['camera_info'].nearest(stamp, tol) if 'camera_info' in index else None
    if info is not None:
        try:
            K = camera_info_to_K(info.k, info.width, info.height, (H, W))
        except ConversionError as err:
            raise BagError(f'CameraInfo at {stamp / 1e9:.3f} s on {topics.camera_info}: {err}'
                           ) from err

    def scalar(kind: str) -> np.ndarray | None:
        m = index[kind].nearest(stamp, tol) if kind in index else None
        if m is None:
            if kind in index:
                missing[kind] = missing.get(kind, 0) + 1
            return None
        try:
            arr = image_to_scalar(m.encoding, m.height, m.width, m.step, m.data.tobytes(),
                                  m.is_bigendian)
        except ConversionError as err:
            raise BagError(f'{kind} image at {stamp / 1e9:.3f} s: {err}') from err
        if arr.shape != (H, W):
            raise BagError(f'{kind} image at {stamp / 1e9:.3f} s is {arr.shape[1]}x{arr.shape[0]} '
                           f'but the camera image is {W}x{H}; record {kind} registered to the '
                           'colour camera (sab3r-convert does this)')
        return depth_to_metres(m.encoding, arr) if kind == 'depth' else arr.astype(np.int32)

    pose = index['pose'].nearest(stamp, tol) if 'pose' in index else None
    if pose is None and 'pose' in index:
        missing['pose'] = missing.get('pose', 0) + 1
    T_gt = None if pose is None else pose_to_matrix(pose.pose.position, pose.pose.orientation)
    T_tf = None
    if tf is not None:
        try:
            T_tf = tf.lookup(tf_map_frame, msg.header.frame_id, stamp)
        except TransformLookupError:
            missing['TF pose'] = missing.get('TF pose', 0) + 1
    camera = CameraFrame(stamp_ns=stamp, frame_id=msg.header.frame_id or 'camera_optical_frame',
                         image=rgb, K=K, T_WC=T_tf)
    return BagFrame(camera, GroundTruth(depth=scalar('depth'), semantic=scalar('semantic'),
                                        instance=scalar('instance'), T_WC=T_gt))


# ----------------------------------------------------------------------------------- writing
class GroundTruthBagWriter:
    """Writes camera frames with ground truth in the layout :func:`read_bag` expects.

    Use as a context manager; the bag folder must not exist yet.
    """

    def __init__(self, path: str | Path, storage: str = 'sqlite3',
                 topics: BagTopics = BagTopics(), world_frame: str = 'map',
                 camera_frame: str = 'camera_optical_frame') -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer

        if storage not in STORAGES:
            raise BagError(f'storage {storage!r} is not one of {", ".join(STORAGES)}')
        self.path = Path(path)
        if self.path.exists():
            raise BagError(f'{self.path} already exists; remove it or choose another output')
        self._ts = _typestore()
        plugin = StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3
        self._writer = Writer(self.path, version=9, storage_plugin=plugin)
        self.topics, self.world_frame, self.camera_frame = topics, world_frame, camera_frame
        self._conns: dict[str, object] = {}
        self.frames_written = 0

    def __enter__(self) -> GroundTruthBagWriter:
        self._writer.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._writer.close()

    def _write(self, topic: str, msgtype: str, stamp_ns: int, msg) -> None:
        conn = self._conns.get(topic)
        if conn is None:
            conn = self._conns[topic] = self._writer.add_connection(topic, msgtype,
                                                                    typestore=self._ts)
        self._writer.write(conn, stamp_ns, self._ts.serialize_cdr(msg, msgtype))

    def _header(self, stamp_ns: int, frame_id: str):
        T = self._ts.types
        return T['std_msgs/msg/Header'](
            stamp=T['builtin_interfaces/msg/Time'](sec=stamp_ns // 1_000_000_000,
                                                   nanosec=stamp_ns % 1_000_000_000),
            frame_id=frame_id)

    def _image(self, stamp_ns: int, encoding: str, fields: tuple[int, int, int, bytes]):
        h, w, step, data = fields
        return self._ts.types['sensor_msgs/msg/Image'](
            header=self._header(stamp_ns, self.camera_frame), height=h, width=w,
            encoding=encoding, is_bigendian=0, step=step,
            data=np.frombuffer(data, dtype=np.uint8))

    def write_label_map(self, labels: dict[int, str], stamp_ns: int = 0, **info) -> None:
        """The label map (class id -> name) and provenance as one JSON std_msgs/String."""
        text = json.dumps({'labels': {str(k): v for k, v in sorted(labels.items())}, **info})
        self._write(self.topics.label_map, 'std_msgs/msg/String', stamp_ns,
                    self._ts.types['std_msgs/msg/String'](data=text))

    def write_frame(self, stamp_ns: int, rgb: np.ndarray, K: np.ndarray | None = None,
                    depth: np.ndarray | None = None, semantic: np.ndarray | None = None,
                    instance: np.ndarray | None = None, T_WC: np.ndarray | None = None,
                    log_time_ns: int | None = None) -> None:
        """One camera image and its ground truth, all stamped `stamp_ns` (header stamps).

        `log_time_ns` is when the bag received the image (default: its stamp).
        """
        T = self._ts.types
        self._write(self.topics.image, 'sensor_msgs/msg/Image',
                    stamp_ns if log_time_ns is None else log_time_ns,
                    self._image(stamp_ns, 'rgb8', rgb_to_image_fields(rgb)))
        H, W = rgb.shape[:2]
        if K is not None:
            P = np.zeros((3, 4))
            P[:, :3] = K
            info = T['sensor_msgs/msg/CameraInfo'](
                header=self._header(stamp_ns, self.camera_frame), height=H, width=W,
                distortion_model='plumb_bob', d=np.zeros(5), k=np.asarray(K, float).ravel(),
                r=np.eye(3).ravel(), p=P.ravel(), binning_x=0, binning_y=0,
                roi=T['sensor_msgs/msg/RegionOfInterest'](x_offset=0, y_offset=0, height=0,
                                                         width=0, do_rectify=False))
            self._write(self.topics.camera_info, 'sensor_msgs/msg/CameraInfo', stamp_ns, info)
        if depth is not None:
            d = np.where(np.isfinite(depth), depth, 0.0).astype(np.float32)
            self._write(self.topics.depth, 'sensor_msgs/msg/Image', stamp_ns,
                        self._image(stamp_ns, '32FC1', scalar_to_image_fields(d, '32FC1')))
        for topic, ids in ((self.topics.semantic, semantic), (self.topics.instance, instance)):
            if ids is None:
                continue
            if ids.min() < 0 or ids.max() > 65535:
                raise BagError(f'ids for {topic} must fit mono16 (0..65535)')
            self._write(topic, 'sensor_msgs/msg/Image', stamp_ns,
                        self._image(stamp_ns, 'mono16',
                                    scalar_to_image_fields(ids.astype(np.uint16), 'mono16')))
        if T_WC is not None:
            self._write_pose(stamp_ns, np.asarray(T_WC, dtype=np.float64))
        self.frames_written += 1

    def _write_pose(self, stamp_ns: int, T_WC: np.ndarray) -> None:
        T = self._ts.types
        q = Rotation.from_matrix(T_WC[:3, :3]).as_quat()
        x, y, z = (float(v) for v in T_WC[:3, 3])
        pose = T['geometry_msgs/msg/Pose'](
            position=T['geometry_msgs/msg/Point'](x=x, y=y, z=z),
            orientation=T['geometry_msgs/msg/Quaternion'](x=q[0], y=q[1], z=q[2], w=q[3]))
        self._write(self.topics.pose, 'geometry_msgs/msg/PoseStamped', stamp_ns,
                    T['geometry_msgs/msg/PoseStamped'](
                        header=self._header(stamp_ns, self.world_frame), pose=pose))
        # the same pose on /tf, so that posed mode (frames.pose_source: tf) can use the bag
        tf = T['geometry_msgs/msg/TransformStamped'](
            header=self._header(stamp_ns, self.world_frame), child_frame_id=self.camera_frame,
            transform=T['geometry_msgs/msg/Transform'](
                translation=T['geometry_msgs/msg/Vector3'](x=x, y=y, z=z),
                rotation=pose.orientation))
        self._write(self.topics.tf, 'tf2_msgs/msg/TFMessage', stamp_ns,
                    T['tf2_msgs/msg/TFMessage'](transforms=[tf]))


def raw_messages(path: str | Path, topic_names: Sequence[str]) -> Iterable[tuple[str, str, int,
                                                                                 bytes]]:
    """(topic, msgtype, log time ns, CDR bytes) of the given topics in log-time order.

    For players that publish the recorded bytes unchanged (``ros/replay.py``).
    """
    from rosbags.rosbag2 import Reader, ReaderError

    try:
        with Reader(Path(path)) as reader:
            conns = [c for c in reader.connections if c.topic in set(topic_names)]
            for conn, t, data in reader.messages(connections=conns):
                yield conn.topic, conn.msgtype, int(t), bytes(data)
    except (ReaderError, OSError) as err:
        raise BagError(f'bag {path} cannot be read: {err}') from err
