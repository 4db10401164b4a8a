"""The perception lifecycle node: cameras in; status and Locate/SaveMap/LoadMap/Reset out.

Threading (ARCHITECTURE.md): camera callbacks only convert and push into drop-oldest buffers; the
services run in their own reentrant callback group so a Locate call never waits behind image
conversion or inference; a MultiThreadedExecutor serves both.

Lifecycle: configure = parameters -> validated config, publishers and services; activate = camera
subscriptions (and, once the pipeline lands, backend load and warm-up); deactivate = subscriptions
gone; cleanup = everything released.
"""

from __future__ import annotations

from collections import deque
import math
import os
import threading
import time

from lifecycle_msgs.msg import State as StateMsg
import numpy as np
from rcl_interfaces.msg import SetParametersResult
import rclpy
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_srvs.srv import Trigger

from ros2_sab3r.config import PerceptionConfig
from ros2_sab3r.msg import PerceptionStatus
from ros2_sab3r.ros import qos
from ros2_sab3r.ros.conversions import ConversionError, camera_info_to_K, image_to_rgb
from ros2_sab3r.ros.params import check_parameter_update, declare_parameters, read_config
from ros2_sab3r.srv import LoadMap, Locate, SaveMap
from ros2_sab3r.types import CameraFrame

NODE_NAME = 'perception_node'
_THROTTLE_S = 5.0
_STATE_NAMES = {
    StateMsg.PRIMARY_STATE_UNCONFIGURED: 'unconfigured',
    StateMsg.PRIMARY_STATE_INACTIVE: 'inactive',
    StateMsg.PRIMARY_STATE_ACTIVE: 'active',
    StateMsg.PRIMARY_STATE_FINALIZED: 'finalized',
}


def check_locate_request(queries: list[str], negatives: list[str], top_k: int,
                         min_score: float, max_queries: int) -> str | None:
    """Why a Locate request cannot be answered as asked, or None when it is well-formed."""
    if not queries:
        return 'queries is empty: give at least one text query, e.g. ["dresser"]'
    if len(queries) > max_queries:
        return (f'{len(queries)} queries in one request; at most {max_queries} '
                '(parameter query.max_queries)')
    blank = [i for i, q in enumerate(queries) if not q.strip()]
    if blank:
        return f'queries {blank} are blank; every query needs some text'
    if any(not n.strip() for n in negatives):
        return 'negatives contains a blank phrase'
    if top_k < 0:
        return f'top_k={top_k} is negative; use 0 for the node default'
    if not np.isfinite(min_score) or not 0.0 <= min_score <= 1.0:
        return f'min_score={min_score} must be in [0, 1]; use 0 for the node default'
    return None


class _CameraInput:
    """Per-camera state: latest intrinsics and a drop-oldest frame buffer."""

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.frames: deque[CameraFrame] = deque(maxlen=capacity)
        self.K: np.ndarray | None = None
        self.info_size: tuple[int, int] = (0, 0)  # (width, height) of the CameraInfo


class PerceptionNode(LifecycleNode):
    """SAB3R perception as a ROS 2 lifecycle node."""

    def __init__(self, **kwargs) -> None:
        super().__init__(NODE_NAME, **kwargs)
        declare_parameters(self)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._cfg: PerceptionConfig | None = None
        self._lock = threading.Lock()  # guards the counters and camera buffers
        self._cameras: list[_CameraInput] = []
        self._subscriptions_active: list = []
        self._status_pub = None
        self._status_timer = None
        self._sab3r_services: list = []
        # The map does not exist until the mapping pipeline integrates a keyframe pair; this
        # version of the node has no pipeline yet, so Locate/SaveMap answer that truthfully.
        self._pipeline = None
        self._backend_name = ''
        self._received = 0
        self._processed = 0
        self._dropped = 0
        self._latency_convert_ms = 0.0
        self._last_logged: dict[str, float] = {}
        # Services read map snapshots concurrently with each other: reentrant. Cameras only
        # convert and enqueue, serialised among themselves so the counters stay cheap.
        self._service_group = ReentrantCallbackGroup()
        self._camera_group = MutuallyExclusiveCallbackGroup()
        self._timer_group = MutuallyExclusiveCallbackGroup()

    # ---- parameters -------------------------------------------------------------------------
    def _on_set_parameters(self, params) -> SetParametersResult:
        reason = check_parameter_update(self, params)
        return SetParametersResult(successful=reason is None, reason=reason or '')

    # ---- lifecycle --------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._cfg = read_config(self)
        except ValueError as err:
            self.get_logger().error(f'invalid configuration: {err}')
            return TransitionCallbackReturn.FAILURE
        cfg = self._cfg
        self._status_pub = self.create_publisher(PerceptionStatus, '~/status', qos.STATUS)
        self._status_timer = self.create_timer(
            1.0 / cfg.publish.status_rate_hz, self._publish_status,
            callback_group=self._timer_group)
        self._sab3r_services = [
            self.create_service(Locate, '~/locate', self._on_locate,
                                callback_group=self._service_group),
            self.create_service(SaveMap, '~/save_map', self._on_save_map,
                                callback_group=self._service_group),
            self.create_service(LoadMap, '~/load_map', self._on_load_map,
                                callback_group=self._service_group),
            self.create_service(Trigger, '~/reset', self._on_reset,
                                callback_group=self._service_group),
        ]
        self.get_logger().info(
            f'configured: {len(cfg.camera.image_topics)} camera(s) '
            f'{list(cfg.camera.image_topics)}, backend {cfg.model.backend!r}, '
            f'map frame {cfg.frames.map_frame!r}')
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        cfg = self._cfg
        assert cfg is not None
        if cfg.model.checkpoint:
            # The inference backends arrive with their own issue; refuse rather than pretend.
            self.get_logger().warning(
                f'model.checkpoint={cfg.model.checkpoint!r} is set, but this build has no '
                'inference pipeline yet: frames are received and validated, no map is built')
        self._cameras = [_CameraInput(t, cfg.camera.queue_size) for t in cfg.camera.image_topics]
        cam_qos = qos.camera_qos(cfg.camera.queue_size)
        subs = []
        for idx, topic in enumerate(cfg.camera.image_topics):
            if cfg.camera.compressed:
                subs.append(self.create_subscription(
                    CompressedImage, topic.rstrip('/') + '/compressed',
                    lambda msg, i=idx: self._on_compressed(i, msg), cam_qos,
                    callback_group=self._camera_group))
            else:
                subs.append(self.create_subscription(
                    Image, topic, lambda msg, i=idx: self._on_image(i, msg), cam_qos,
                    callback_group=self._camera_group))
        for idx, topic in enumerate(cfg.camera.camera_info_topics):
            if topic:
                subs.append(self.create_subscription(
                    CameraInfo, topic, lambda msg, i=idx: self._on_camera_info(i, msg),
                    cam_qos, callback_group=self._camera_group))
        self._subscriptions_active = subs
        self.get_logger().info('active: listening on ' + ', '.join(s.topic_name for s in subs))
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._drop_subscriptions()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _drop_subscriptions(self) -> None:
        for sub in self._subscriptions_active:
            self.destroy_subscription(sub)
        self._subscriptions_active = []
        with self._lock:
            self._cameras = []

    def _release(self) -> None:
        self._drop_subscriptions()
        for srv in self._sab3r_services:
            self.destroy_service(srv)
        self._sab3r_services = []
        if self._status_timer is not None:
            self.destroy_timer(self._status_timer)
            self._status_timer = None
        if self._status_pub is not None:
            self.destroy_publisher(self._status_pub)
            self._status_pub = None
        self._pipeline = None
        self._cfg = None

    # ---- cameras ----------------------------------------------------------------------------
    def _on_image(self, idx: int, msg: Image) -> None:
        t0 = time.perf_counter()
        with self._lock:
            self._received += 1
        try:
            rgb = image_to_rgb(msg.encoding, msg.height, msg.width, msg.step, msg.data,
                               msg.is_bigendian)
        except ConversionError as err:
            self._drop_bad_frame(idx, err)
            return
        self._enqueue(idx, msg.header, rgb, t0)

    def _on_compressed(self, idx: int, msg: CompressedImage) -> None:
        t0 = time.perf_counter()
        with self._lock:
            self._received += 1
        try:
            rgb = _decode_compressed(bytes(msg.data))
        except ConversionError as err:
            self._drop_bad_frame(idx, err)
            return
        self._enqueue(idx, msg.header, rgb, t0)

    def _drop_bad_frame(self, idx: int, err: Exception) -> None:
        with self._lock:
            self._dropped += 1
        topic = self._cfg.camera.image_topics[idx] if self._cfg else f'camera {idx}'
        self._error_throttled(f'frame on {topic} dropped: {err}')

    def _error_throttled(self, text: str) -> None:
        """Log each distinct problem at most once per _THROTTLE_S (a bad stream repeats it at
        frame rate; rclpy's own throttle is per call site and would hide a second problem)."""
        now = time.monotonic()
        with self._lock:
            if now - self._last_logged.get(text, -math.inf) < _THROTTLE_S:
                return
            if len(self._last_logged) > 256:
                self._last_logged.clear()
            self._last_logged[text] = now
        self.get_logger().error(text)

    def _enqueue(self, idx: int, header, rgb: np.ndarray, t0: float) -> None:
        with self._lock:
            if idx >= len(self._cameras):
                return  # deactivated meanwhile
            cam = self._cameras[idx]
            K = cam.K
            if K is not None and cam.info_size != (rgb.shape[1], rgb.shape[0]):
                K = None  # CameraInfo for another resolution: estimate instead of mis-project
            frame = CameraFrame(
                stamp_ns=header.stamp.sec * 1_000_000_000 + header.stamp.nanosec,
                frame_id=header.frame_id, image=rgb, camera=cam.name, K=K)
            if len(cam.frames) == cam.frames.maxlen:
                self._dropped += 1  # drop-oldest: the deque discards the head on append
            cam.frames.append(frame)
            self._latency_convert_ms = (time.perf_counter() - t0) * 1e3

    def _on_camera_info(self, idx: int, msg: CameraInfo) -> None:
        try:
            K = camera_info_to_K(msg.k, msg.width, msg.height)
        except ConversionError as err:
            topic = self._cfg.camera.camera_info_topics[idx] if self._cfg else str(idx)
            self._error_throttled(f'CameraInfo on {topic} ignored: {err}')
            K = None
        with self._lock:
            if idx < len(self._cameras):
                self._cameras[idx].K = K
                self._cameras[idx].info_size = (msg.width, msg.height)

    # ---- services ---------------------------------------------------------------------------
    def _no_map_reason(self) -> str:
        if self._pipeline is None:
            return ('no map yet: no keyframe has been integrated (this build receives and '
                    'validates frames but has no mapping pipeline yet)')
        return 'no map yet: no keyframe has been integrated'

    def _on_locate(self, request: Locate.Request, response: Locate.Response
                   ) -> Locate.Response:
        cfg = self._cfg
        assert cfg is not None
        problem = check_locate_request(list(request.queries), list(request.negatives),
                                       request.top_k, request.min_score, cfg.query.max_queries)
        if problem is not None:
            response.success = False
            response.message = f'bad request: {problem}'
            return response
        response.success = False
        response.message = self._no_map_reason()
        return response

    def _on_save_map(self, request: SaveMap.Request, response: SaveMap.Response
                     ) -> SaveMap.Response:
        response.bytes = 0
        response.success = False
        if not request.path:
            response.message = 'path is empty: give a file path on the node machine'
        else:
            response.message = f'nothing saved to {request.path}: {self._no_map_reason()}'
        return response

    def _on_load_map(self, request: LoadMap.Request, response: LoadMap.Response
                     ) -> LoadMap.Response:
        response.bytes = 0
        response.success = False
        if not request.path:
            response.message = 'path is empty: give the file written by save_map'
        elif not os.path.isfile(request.path):
            response.message = f'{request.path} does not exist or is not a file'
        else:
            response.message = (f'{request.path} not loaded: this build has no mapping '
                                'pipeline to load a map into; the current state is unchanged')
        return response

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response
                  ) -> Trigger.Response:
        with self._lock:
            for cam in self._cameras:
                cam.frames.clear()
        response.success = True
        response.message = 'frame buffers cleared; the map is empty'
        return response

    # ---- status -----------------------------------------------------------------------------
    def _publish_status(self) -> None:
        if self._status_pub is None or self._cfg is None:
            return
        msg = PerceptionStatus()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = self._cfg.frames.map_frame
        msg.backend = self._backend_name
        msg.state = _STATE_NAMES.get(self._state_machine.current_state[0], 'unknown')
        msg.map_ready = False
        with self._lock:
            msg.latency_convert_ms = float(self._latency_convert_ms)
            msg.frames_received = self._received
            msg.frames_processed = self._processed
            msg.frames_dropped = self._dropped
        self._status_pub.publish(msg)


def _decode_compressed(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> (H, W, 3) uint8 RGB via Pillow."""
    import io

    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        with PILImage.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert('RGB'))
    except (UnidentifiedImageError, OSError) as err:
        raise ConversionError(f'compressed image could not be decoded: {err}') from err


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args)
    node = PerceptionNode()
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    try:
        if node.get_parameter('node.autostart').value:
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().error('configure failed; staying unconfigured')
            elif node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().error('activate failed; staying inactive')
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
