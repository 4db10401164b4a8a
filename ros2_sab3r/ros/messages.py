"""Pipeline values <-> ROS messages: clouds, Locate requests and answers, markers, poses.

sensor_msgs_py (the usual PointCloud2 helper) is not published as a wheel, so clouds are packed
with numpy structured arrays here (tests unpack them with tests/ros/clouds.py).
"""

from __future__ import annotations

from builtin_interfaces.msg import Time
from geometry_msgs.msg import Point, Pose, PoseArray, PoseStamped, TransformStamped, Vector3
from nav_msgs.msg import Path
import numpy as np
from scipy.spatial.transform import Rotation
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

from ros2_sab3r import types
from ros2_sab3r.msg import LocatedObject

_STATUS = {
    types.LocateStatus.FOUND: LocatedObject.STATUS_FOUND,
    types.LocateStatus.NOT_FOUND: LocatedObject.STATUS_NOT_FOUND,
    types.LocateStatus.AMBIGUOUS: LocatedObject.STATUS_AMBIGUOUS,
}


def stamp_from_ns(ns: int) -> Time:
    return Time(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


def ns_from_stamp(stamp: Time) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def pack_rgb(colors: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 -> (N,) float32 whose bits are 0x00RRGGBB (the PCL/RViz 'rgb' field)."""
    c = np.asarray(colors, np.uint32)
    packed = (c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]
    return packed.astype(np.uint32).view(np.float32)


def arrays_to_cloud(header: Header, X: np.ndarray, colors: np.ndarray | None = None,
                    extra: dict[str, np.ndarray] | None = None) -> PointCloud2:
    """Pack (N, 3) points, optional (N, 3) uint8 colours and extra float32 fields."""
    X = np.asarray(X, np.float32).reshape(-1, 3)
    n = len(X)
    names = ['x', 'y', 'z'] + (['rgb'] if colors is not None else []) + list(extra or {})
    dtype = np.dtype({'names': names, 'formats': [np.float32] * len(names),
                      'offsets': [4 * i for i in range(len(names))], 'itemsize': 4 * len(names)})
    data = np.empty(n, dtype)
    data['x'], data['y'], data['z'] = X[:, 0], X[:, 1], X[:, 2]
    if colors is not None:
        data['rgb'] = pack_rgb(np.asarray(colors).reshape(-1, 3))
    for name, values in (extra or {}).items():
        values = np.asarray(values, np.float32).reshape(-1)
        if len(values) != n:
            raise ValueError(f'field {name!r} has {len(values)} values for {n} points')
        data[name] = values
    msg = PointCloud2()
    msg.header = header
    msg.height, msg.width = 1, n
    msg.fields = [PointField(name=name, offset=4 * i, datatype=PointField.FLOAT32, count=1)
                  for i, name in enumerate(names)]
    msg.is_bigendian = False
    msg.point_step = 4 * len(names)
    msg.row_step = msg.point_step * n
    msg.is_dense = bool(np.isfinite(X).all())
    msg.data = data.tobytes()
    return msg


def _pose(position: np.ndarray, quat_xyzw: np.ndarray) -> Pose:
    pose = Pose()
    pose.position = Point(x=float(position[0]), y=float(position[1]), z=float(position[2]))
    x, y, z, w = (float(v) for v in quat_xyzw)
    pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w = x, y, z, w
    return pose


def pose_from_matrix(T: np.ndarray) -> Pose:
    T = np.asarray(T, np.float64)
    return _pose(T[:3, 3], Rotation.from_matrix(T[:3, :3]).as_quat())


def matrix_from_transform(tf: TransformStamped) -> np.ndarray:
    """(4, 4) T_PC of a TransformStamped (parent = header.frame_id, child = child_frame_id)."""
    t, q = tf.transform.translation, tf.transform.rotation
    T = np.eye(4)
    T[:3, :3] = Rotation.from_quat([q.x, q.y, q.z, q.w]).as_matrix()
    T[:3, 3] = (t.x, t.y, t.z)
    return T


def transform_from_matrix(header: Header, child: str, T: np.ndarray) -> TransformStamped:
    pose = pose_from_matrix(T)
    tf = TransformStamped()
    tf.header, tf.child_frame_id = header, child
    tf.transform.translation = Vector3(x=pose.position.x, y=pose.position.y, z=pose.position.z)
    tf.transform.rotation = pose.orientation
    return tf


def locate_query_from_request(request) -> types.LocateQuery:
    """A Locate.Request as a plain LocateQuery, not yet validated (see query.engine)."""
    return types.LocateQuery(
        queries=tuple(request.queries), negatives=tuple(request.negatives),
        top_k=int(request.top_k), min_score=float(request.min_score),
        relevancy_mode=str(request.relevancy_mode))


def located_to_msg(obj: types.LocatedObject, header: Header, include_points: bool = False
                   ) -> LocatedObject:
    """One answer as a message; its voxel centres only with `include_points` (Locate's
    request flag: they are most of a reply's bytes)."""
    msg = LocatedObject()
    msg.header = header
    msg.query, msg.label, msg.score = obj.query, obj.label, float(obj.score)
    msg.status = _STATUS[obj.status]
    if obj.centroid is not None:
        c = obj.centroid
        msg.centroid = Point(x=float(c[0]), y=float(c[1]), z=float(c[2]))
    if obj.box is not None:
        msg.box_center = _pose(obj.box.center, obj.box.quat_xyzw)
        s = obj.box.size
        msg.box_size = Vector3(x=float(s[0]), y=float(s[1]), z=float(s[2]))
    msg.point_count = obj.point_count
    msg.last_seen = stamp_from_ns(obj.last_seen_ns)
    if include_points and obj.points is not None:
        msg.points = arrays_to_cloud(header, obj.points, obj.colors)
    return msg


def _colour(index: int, alpha: float = 0.8) -> ColorRGBA:
    # a fixed qualitative palette so the same query keeps its colour between calls
    palette = [(0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16),
               (0.58, 0.4, 0.74), (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.5, 0.5, 0.5)]
    r, g, b = palette[index % len(palette)]
    return ColorRGBA(r=r, g=g, b=b, a=alpha)


def located_markers(objects: list[LocatedObject]) -> MarkerArray:
    """RViz markers for Locate answers: a box and a text label per found instance."""
    out = MarkerArray()
    clear = Marker(action=Marker.DELETEALL)
    out.markers.append(clear)
    queries = sorted({o.query for o in objects})
    for i, obj in enumerate(objects):
        if obj.status == LocatedObject.STATUS_NOT_FOUND:
            continue
        colour = _colour(queries.index(obj.query))
        box = Marker(header=obj.header, ns='located_boxes', id=i, type=Marker.CUBE,
                     action=Marker.ADD, pose=obj.box_center, scale=obj.box_size,
                     color=ColorRGBA(r=colour.r, g=colour.g, b=colour.b, a=0.35))
        text = Marker(header=obj.header, ns='located_labels', id=i, type=Marker.TEXT_VIEW_FACING,
                      action=Marker.ADD, color=colour)
        text.pose.position = Point(x=obj.box_center.position.x, y=obj.box_center.position.y,
                                   z=obj.box_center.position.z + obj.box_size.z / 2 + 0.1)
        text.pose.orientation.w = 1.0
        text.scale.z = 0.12
        text.text = f'{obj.label} {obj.score:.2f}'
        out.markers.extend([box, text])
    return out


def poses_to_msgs(header: Header, T_WCs: list[np.ndarray]) -> tuple[PoseArray, Path]:
    poses = [pose_from_matrix(T) for T in T_WCs]
    path = Path(header=header, poses=[PoseStamped(header=header, pose=p) for p in poses])
    return PoseArray(header=header, poses=poses), path


def relevancy_colors(relevancy: np.ndarray) -> np.ndarray:
    """(N,) relevancy in [0, 1] -> (N, 3) uint8 colours of matplotlib's 'turbo' map (blue: not
    relevant, red: most relevant)."""
    from matplotlib import colormaps  # imported on the first Locate, not at node start

    rgba = colormaps['turbo'](np.clip(np.nan_to_num(relevancy), 0.0, 1.0))
    return (rgba[:, :3] * 255.0 + 0.5).astype(np.uint8)
