"""The perception lifecycle node: cameras in; status and Locate/SaveMap/LoadMap/Reset out.

Threading (ARCHITECTURE.md): camera callbacks only convert and push into drop-oldest buffers; the
services run in their own reentrant callback group so a Locate call never waits behind image
conversion or inference; a MultiThreadedExecutor serves both.

Lifecycle: configure = parameters -> validated config, publishers and services; activate = camera
subscriptions (and, once the pipeline lands, backend load and warm-up); deactivate = subscriptions
gone; cleanup = everything released.
"""

from __future__ import annotations

# First: a SIGINT during the imports below must not be lost (ros2_sab3r/ros/signals.py).
from ros2_sab3r.ros import signals  # isort: split

from dataclasses import replace
import functools
import logging
import os
import pathlib
import sys
import threading
import time
import traceback

from geometry_msgs.msg import PoseArray
from lifecycle_msgs.msg import State as StateMsg
from nav_msgs.msg import Path
import numpy as np
from rcl_interfaces.msg import SetParametersResult
import rclpy
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.logging import LoggingSeverity
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Header
from std_srvs.srv import Trigger
from tf2_msgs.msg import TFMessage
from visualization_msgs.msg import MarkerArray

from ros2_sab3r.config import PerceptionConfig
from ros2_sab3r.frames import upright
from ros2_sab3r.frames.decode import (
    ConversionError,
    camera_info_to_K,
    compressed_to_rgb,
    image_to_rgb,
)
from ros2_sab3r.frames.scheduler import FrameCounts, FrameScheduler, FrameWorker, Throttle
from ros2_sab3r.geometry.tf_buffer import TransformBuffer, TransformLookupError
from ros2_sab3r.geometry.transforms import transform_located
from ros2_sab3r.inference.base import Backend
from ros2_sab3r.inference.factory import BackendUnavailable, load_model
from ros2_sab3r.mapping.snapshot import MapSnapshot
from ros2_sab3r.msg import PerceptionStatus
from ros2_sab3r.pipeline import Pipeline
from ros2_sab3r.query.engine import BadLocateRequest, EmptyMapError, LocateError, validate_query
from ros2_sab3r.ros import messages, qos
from ros2_sab3r.ros.params import (
    CONFIG_NAMES,
    check_parameter_update,
    declare_parameters,
    live_changes,
    read_config,
)
from ros2_sab3r.srv import LoadMap, Locate, SaveMap
from ros2_sab3r.types import CameraFrame, LocateStatus, StepLatency, StepStatus

NODE_NAME = 'perception_node'
NO_MODEL = 'none'  # model.backend value: the node runs without a network, on purpose
_THROTTLE_S = 5.0
_STATE_NAMES = {
    StateMsg.PRIMARY_STATE_UNCONFIGURED: 'unconfigured',
    StateMsg.PRIMARY_STATE_INACTIVE: 'inactive',
    StateMsg.PRIMARY_STATE_ACTIVE: 'active',
    StateMsg.PRIMARY_STATE_FINALIZED: 'finalized',
}


def model_refusal(cfg: PerceptionConfig) -> str | None:
    """Why configure refuses `cfg.model` before anything is loaded, or None. A built-in backend
    without weights would otherwise run a node that never builds a map."""
    model = cfg.model
    if model.backend in ('torch', 'onnxruntime', 'tensorrt') and not model.checkpoint.strip():
        return (f'model.checkpoint is empty, so model.backend={model.backend!r} has no weights; '
                'give a SAB3R/MASt3R checkpoint file or Hugging Face repo (torch) or an '
                "sab3r-export directory (onnxruntime, tensorrt), or set model.backend: 'none' to "
                'run the node without a network (no map; tests and wiring checks)')
    local = pathlib.Path(model.checkpoint.strip()).expanduser()
    if model.checkpoint.strip() and local.exists():
        # A FIFO or device would block the loader for ever (activation never returns).
        if not (local.is_file() or local.is_dir()):
            return (f'model.checkpoint={model.checkpoint!r} is not a regular file or directory; '
                    'give the weights file or the export directory')
        if not os.access(local, os.R_OK | (os.X_OK if local.is_dir() else 0)):
            return (f'model.checkpoint={model.checkpoint!r} is not readable by this process '
                    f'(uid {os.getuid()}); fix its permissions')
    return None


def _service_guard(method):
    """Last resort of a service callback: an unexpected error is logged with its traceback and
    answered as a failure, instead of reaching the executor (which would end the process)."""
    @functools.wraps(method)
    def guarded(self, request, response):
        try:
            return method(self, request, response)
        except Exception as err:  # noqa: BLE001  nothing a caller sends may end the process
            self._log_internal_error(method.__name__, err)
            response.success = False
            response.message = (f'internal error ({type(err).__name__}: {err}); the node keeps '
                                'running with its state unchanged, see its log')
            return response
    return guarded


def _callback_guard(counts_as_dropped: bool):
    """Last resort of a topic or timer callback: log the traceback (throttled), count a dropped
    frame where the callback received one, and return to the executor normally."""
    def wrap(method):
        @functools.wraps(method)
        def guarded(self, *args):
            try:
                return method(self, *args)
            except Exception as err:  # noqa: BLE001  nothing a publisher sends may end the process
                scheduler = self._scheduler
                if counts_as_dropped and scheduler is not None:
                    scheduler.reject(args[0], f'unexpected {type(err).__name__}')
                self._log_internal_error(method.__name__, err)
        return guarded
    return wrap


class _CameraInput:
    """Per-camera intrinsics (the frames themselves wait in the FrameScheduler)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.K: np.ndarray | None = None
        self.info_size: tuple[int, int] = (0, 0)  # (width, height) of the CameraInfo


class PerceptionNode(LifecycleNode):
    """SAB3R perception as a ROS 2 lifecycle node."""

    def __init__(self, **kwargs) -> None:
        super().__init__(NODE_NAME, **kwargs)
        # name -> problem of a start-up value; cleared when the parameter is set anew
        self._parameter_problems = declare_parameters(self)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.add_post_set_parameters_callback(self._after_set_parameters)
        self._cfg: PerceptionConfig | None = None
        self._lock = threading.Lock()  # guards the cameras' intrinsics and the step results
        self._cameras: list[_CameraInput] = []
        # Frame scheduling, per-camera clocks and the worker loop: ros2_sab3r/frames/scheduler.py
        self._scheduler: FrameScheduler | None = None
        self._worker: FrameWorker | None = None
        self._throttle = Throttle(_THROTTLE_S)
        self._subscriptions_active: list = []
        self._status_pub = None
        self._status_timer = None
        self._map_timer = None
        self._pubs: dict[str, object] = {}
        self._sab3r_services: list = []
        # Created on activate from model.*; None while no model could be loaded, and the
        # services then say why instead of pretending there is a map.
        self._pipeline: Pipeline | None = None
        self._no_model_reason = 'the node is not active'
        self._backend_name = ''
        self._tf = TransformBuffer()
        # Unposed mode: gravity in the map frame from the robot's TF (odom is z-up), when it
        # gives the camera in odom; else the map's floor plane (see frames/upright.py).
        self._tf_down: np.ndarray | None = None
        # Unposed mode, frames.base_frame: cameras whose T_BC the pipeline has from TF
        self._extrinsics_known: set[str] = set()
        # Unposed mode: cameras whose first keyframe was logged (how it was placed), and the
        # per-camera counts of unplaced frames last logged (Pipeline.frames_unplaced)
        self._cameras_mapped: set[str] = set()
        self._unplaced_logged: dict[str, int] = {}
        self._latencies = StepLatency()
        self._keyframes_in_window = 0
        self._keyframes_total = 0
        self._published_map_version = -1
        self._latency_convert_ms = 0.0
        # Services read map snapshots concurrently with each other: reentrant. Cameras only
        # convert and enqueue, serialised among themselves so the counters stay cheap.
        self._service_group = ReentrantCallbackGroup()
        self._camera_group = MutuallyExclusiveCallbackGroup()
        self._timer_group = MutuallyExclusiveCallbackGroup()

    # ---- parameters -------------------------------------------------------------------------
    def _on_set_parameters(self, params) -> SetParametersResult:
        reason = check_parameter_update(self, params, configured=self._cfg is not None)
        return SetParametersResult(successful=reason is None, reason=reason or '')

    def _after_set_parameters(self, params) -> None:
        """Apply accepted values: unconfigured, configure reads them all (and a start-up
        problem they fix is forgotten); configured, only live ones can have changed, and they
        go to the node, the pipeline and its query engine now."""
        names = [p.name for p in params if p.name in CONFIG_NAMES]
        for name in names:
            self._parameter_problems.pop(name, None)
        old = self._cfg
        if old is None or not names:
            return
        try:
            new = read_config(self)
        except ValueError as err:  # checked in _on_set_parameters; a race must not kill us
            self.get_logger().error(f'parameters not applied: {err}')
            return
        self._cfg = new
        pipeline = self._pipeline
        if pipeline is not None:
            pipeline.apply_live_config(new)
        if new.publish.status_rate_hz != old.publish.status_rate_hz:
            self._start_status_timer(new)
        if new.publish.map_rate_hz != old.publish.map_rate_hz:
            self._start_map_timer(new)
        if new.publish.map_labels != old.publish.map_labels:
            self._published_map_version = -1  # the same map, labelled anew
        changed = live_changes(old, new)
        if changed:
            self.get_logger().info('applied live: ' + ', '.join(
                f'{name}={self.get_parameter(name).value!r}' for name in changed))

    def _start_status_timer(self, cfg: PerceptionConfig) -> None:
        if self._status_timer is not None:
            self.destroy_timer(self._status_timer)
        self._status_timer = self.create_timer(
            1.0 / cfg.publish.status_rate_hz, self._publish_status,
            callback_group=self._timer_group)

    def _start_map_timer(self, cfg: PerceptionConfig) -> None:
        if self._map_timer is not None:
            self.destroy_timer(self._map_timer)
            self._map_timer = None
        if cfg.publish.map_rate_hz > 0:
            self._map_timer = self.create_timer(
                1.0 / cfg.publish.map_rate_hz, self._publish_map,
                callback_group=self._timer_group)

    # ---- lifecycle --------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._transition('configure', self._configure, state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._transition('activate', self._activate, state)

    def _transition(self, name: str, body, state: LifecycleState) -> TransitionCallbackReturn:
        """Every failed transition says why: an exception becomes ERROR (on_error then frees
        everything and the node is unconfigured) with its traceback in the log."""
        try:
            return body(state)
        except Exception as err:  # noqa: BLE001  the reason must reach the log
            if not self.context.ok():  # SIGINT/SIGTERM mid-transition: not the node's fault
                self.get_logger().info(f'{name} interrupted: the process is shutting down')
                return TransitionCallbackReturn.ERROR
            self.get_logger().error(
                f'{name} failed: {type(err).__name__}: {err}\n'
                + ''.join(traceback.format_exception(err)).rstrip())
            return TransitionCallbackReturn.ERROR

    def _configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self._parameter_problems:
            self.get_logger().error(
                'invalid parameters (the defaults stand in until fixed; see config/'
                'perception.yaml for types and ranges; fix them with ros2 param set): '
                + '; '.join(self._parameter_problems.values()))
            return TransitionCallbackReturn.FAILURE
        try:
            self._cfg = read_config(self)
        except ValueError as err:
            self.get_logger().error(f'invalid configuration: {err}')
            return TransitionCallbackReturn.FAILURE
        cfg = self._cfg
        if not cfg.camera.image_topics or not all(t.strip() for t in cfg.camera.image_topics):
            self.get_logger().error(
                f'configure failed: camera.image_topics={list(cfg.camera.image_topics)!r} is '
                'empty or has an empty name; name at least one sensor_msgs/Image topic')
            self._cfg = None
            return TransitionCallbackReturn.FAILURE
        if refusal := model_refusal(cfg):
            self.get_logger().error(f'configure failed: {refusal}')
            self._cfg = None
            return TransitionCallbackReturn.FAILURE
        if cfg.frames.base_frame and cfg.frames.pose_source == 'tf':
            self.get_logger().warning(
                f'frames.base_frame={cfg.frames.base_frame!r} is not used: in posed mode '
                "(frames.pose_source 'tf') each camera's pose comes from TF itself")
        self._scheduler = FrameScheduler(list(cfg.camera.image_topics), cfg.camera.queue_size,
                                         notify=self._notify)
        self._status_pub = self.create_publisher(PerceptionStatus, '~/status', qos.STATUS)
        self._start_status_timer(cfg)
        self._pubs = {
            'map': self.create_publisher(PointCloud2, '~/semantic_map', qos.LATCHED),
            'poses': self.create_publisher(PoseArray, '~/keyframe_poses', qos.LATCHED),
            'path': self.create_publisher(Path, '~/trajectory', qos.LATCHED),
            'markers': self.create_publisher(MarkerArray, '~/located_objects', qos.LATCHED),
            'relevancy': self.create_publisher(PointCloud2, '~/relevancy', qos.LATCHED),
            'tf': self.create_publisher(TFMessage, '/tf', 10),
        }
        self._start_map_timer(cfg)
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

    def _activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        cfg = self._cfg
        assert cfg is not None
        if cfg.model.backend == NO_MODEL:
            self._no_model_reason = f'model.backend is {NO_MODEL!r} (no network, no map)'
            self.get_logger().warning(
                f'model.backend is {NO_MODEL!r}: frames are received, validated and counted; '
                'no map is built and Locate answers that there is none')
        elif self._pipeline is None:  # a deactivate -> activate cycle keeps the model and map
            try:
                loaded = load_model(cfg.model)
            except BackendUnavailable as err:
                # The model that was asked for (weights, an export, a 'module:Class' backend)
                # cannot be used: say why and go back to unconfigured (on_error) instead of
                # running without it.
                self.get_logger().error(
                    f'activate failed, the model cannot be loaded: {err}. The node returns to '
                    f'unconfigured; fix model.* and configure and activate again')
                return TransitionCallbackReturn.ERROR
            else:
                self._pipeline = Pipeline(cfg, loaded.backend, loaded.text_encoder)
                self._extrinsics_known = set()
                self._cameras_mapped = set()
                self._unplaced_logged = {}
                self._backend_name = loaded.description
                self.get_logger().info(f'backend: {loaded.description}')
                self._warm_up(loaded.backend)
        if self._pipeline is not None and self._scheduler is not None:
            self._worker = FrameWorker(self._scheduler, self._process_frame,
                                       self._reset_pipeline, self._log_internal_error)
            self._worker.start()
        with self._lock:
            self._cameras = [_CameraInput(t) for t in cfg.camera.image_topics]
        cam_qos = qos.camera_qos(cfg.camera.qos_reliability, cfg.camera.queue_size)
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
        # TF in both modes: posed mode reads camera poses; unposed mode needs odom -> camera to
        # publish map -> odom (REP-105), and Locate answers in any frame of the tree.
        subs.append(self.create_subscription(
            TFMessage, '/tf', lambda msg: self._on_tf(msg, False), 100,
            callback_group=self._camera_group))
        subs.append(self.create_subscription(
            TFMessage, '/tf_static', lambda msg: self._on_tf(msg, True), qos.LATCHED_TF,
            callback_group=self._camera_group))
        self._subscriptions_active = subs
        self.get_logger().info('active: listening on ' + ', '.join(s.topic_name for s in subs))
        return super().on_activate(state)

    def _warm_up(self, backend: Backend) -> None:
        """Built-in backends run one pair on a grey frame before the cameras are subscribed, so
        the first real frame does not pay for lazy initialisation (a stand-in's takes 0 ms)."""
        try:
            ms = backend.warm_up()
        except Exception as err:  # noqa: BLE001  a failed warm-up is reported, frames decide
            self.get_logger().warning(f'warm-up failed: {type(err).__name__}: {err}')
        else:
            self.get_logger().info(f'warm-up: one pair in {ms:.0f} ms')

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._drop_subscriptions()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        # A transition raised or returned ERROR: free everything; SUCCESS lands in unconfigured.
        self._release()
        self.get_logger().error(f'error during a transition from {state.label}; resources '
                                'released, the node is unconfigured')
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self.get_logger().info(f'shutdown from {state.label}: the process ends')
        # The transition's answer must leave before the context goes, so the end comes a moment
        # later from another thread; main() then returns 0.
        timer = threading.Timer(0.3, rclpy.try_shutdown, kwargs={'context': self.context})
        timer.daemon = True
        timer.start()
        return TransitionCallbackReturn.SUCCESS

    def _stop_worker(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None and not worker.stop(timeout=30.0):
            self.get_logger().error('pipeline worker did not stop within 30 s')

    def _drop_subscriptions(self) -> None:
        self._stop_worker()
        for sub in self._subscriptions_active:
            self.destroy_subscription(sub)
        self._subscriptions_active = []
        with self._lock:
            self._cameras = []
        if self._scheduler is not None:
            self._scheduler.clear(reset=False)  # counted as dropped: nobody will process them

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
        if self._map_timer is not None:
            self.destroy_timer(self._map_timer)
            self._map_timer = None
        for pub in self._pubs.values():
            self.destroy_publisher(pub)
        self._pubs = {}
        if self._pipeline is not None:
            self._pipeline.close()  # TensorRT: GPU buffers and engines, now rather than at GC
        self._pipeline = None  # frees the backend (and its GPU memory) with the last reference
        self._backend_name = ''
        self._no_model_reason = 'the node is not configured'
        self._tf.clear()
        self._tf_down = None
        self._scheduler = None
        self._cfg = None

    # ---- cameras ----------------------------------------------------------------------------
    @_callback_guard(counts_as_dropped=True)
    def _on_image(self, idx: int, msg: Image) -> None:
        t0 = time.perf_counter()
        try:
            rgb = image_to_rgb(msg.encoding, msg.height, msg.width, msg.step, msg.data,
                               msg.is_bigendian, self._max_image_pixels())
        except ConversionError as err:
            self._drop_bad_frame(idx, err)
            return
        self._enqueue(idx, msg.header, rgb, t0)

    @_callback_guard(counts_as_dropped=True)
    def _on_compressed(self, idx: int, msg: CompressedImage) -> None:
        t0 = time.perf_counter()
        try:
            rgb = compressed_to_rgb(bytes(msg.data), self._max_image_pixels())
        except ConversionError as err:
            self._drop_bad_frame(idx, err)
            return
        self._enqueue(idx, msg.header, rgb, t0)

    def _max_image_pixels(self) -> int:
        cfg = self._cfg
        return cfg.camera.max_image_pixels if cfg is not None else 0

    def _drop_bad_frame(self, idx: int, err: Exception) -> None:
        scheduler = self._scheduler
        if scheduler is not None:
            scheduler.reject(idx, str(err))

    def _notify(self, key: str, text: str) -> None:
        """The scheduler's notes, one line per kind per _THROTTLE_S: a rejected frame is an
        error, a time note (out of order, jumps, loops) a warning."""
        if self._throttle.allow(key):
            if key.startswith('reject:'):
                self.get_logger().error(text)
            else:
                self.get_logger().warning(text)

    def _log_internal_error(self, where: str, err: Exception) -> None:
        """An error no check foresaw: the traceback is what a bug report needs (throttled per
        distinct error, a bad stream repeats it at frame rate). A callback that fails because the
        process is shutting down (the context is gone under a timer) is not an error."""
        if not self.context.ok():
            return
        self._error_throttled(f'unexpected {type(err).__name__} in {where}: {err}\n'
                              + ''.join(traceback.format_exception(err)).rstrip())

    def _error_throttled(self, text: str) -> None:
        """Log each distinct problem at most once per _THROTTLE_S (a bad stream repeats it at
        frame rate; rclpy's own throttle is per call site and would hide a second problem)."""
        if self._throttle.allow(text):
            self.get_logger().error(text)

    def _enqueue(self, idx: int, header, rgb: np.ndarray, t0: float) -> None:
        scheduler = self._scheduler
        with self._lock:
            if scheduler is None or idx >= len(self._cameras):
                return  # deactivated meanwhile
            cam = self._cameras[idx]
            K = cam.K
            if K is not None and cam.info_size != (rgb.shape[1], rgb.shape[0]):
                K = None  # CameraInfo for another resolution: estimate instead of mis-project
        frame = CameraFrame(stamp_ns=messages.ns_from_stamp(header.stamp),
                            frame_id=header.frame_id, image=rgb, camera=cam.name, K=K)
        scheduler.push(idx, frame)
        with self._lock:
            self._latency_convert_ms = (time.perf_counter() - t0) * 1e3

    @_callback_guard(counts_as_dropped=False)
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

    @_callback_guard(counts_as_dropped=False)
    def _on_tf(self, msg: TFMessage, static: bool) -> None:
        for tf in msg.transforms:
            try:
                self._tf.set_transform(tf.header.frame_id, tf.child_frame_id,
                                       messages.ns_from_stamp(tf.header.stamp),
                                       messages.matrix_from_transform(tf), static)
            except ValueError as err:
                self._error_throttled(f'TF {tf.header.frame_id} -> {tf.child_frame_id} '
                                      f'ignored: {err}')

    # ---- pipeline worker --------------------------------------------------------------------
    def _attach_pose(self, frame: CameraFrame) -> CameraFrame:
        cfg = self._cfg
        if cfg is None or cfg.frames.pose_source != 'tf':
            return frame
        # TF often arrives after the image it belongs to: wait up to frames.tf_timeout_s (this
        # is the worker thread; callbacks keep filling the buffer meanwhile).
        deadline = time.monotonic() + cfg.frames.tf_timeout_s
        while True:
            try:
                T_WC = self._tf.lookup(cfg.frames.map_frame, frame.frame_id, frame.stamp_ns)
            except TransformLookupError as err:
                worker = self._worker
                if time.monotonic() >= deadline or worker is None or worker.stopping:
                    self.get_logger().warning(
                        f'posed mode: {err} (waited frames.tf_timeout_s = '
                        f'{cfg.frames.tf_timeout_s} s); frame skipped',
                        throttle_duration_sec=_THROTTLE_S)
                    return frame
                time.sleep(min(0.005, cfg.frames.tf_timeout_s))
            else:
                return replace(frame, T_WC=T_WC)

    def _reset_pipeline(self) -> None:
        pipeline = self._pipeline
        self._tf_down = None  # the next map has another frame
        self._cameras_mapped, self._unplaced_logged = set(), {}
        if pipeline is not None:
            pipeline.reset()

    def _upright(self, snap: MapSnapshot) -> np.ndarray | None:
        """T_UW of frames/upright.py for what the node publishes in unposed mode (None: posed,
        the map frame is TF's; or no gravity known nor estimated yet)."""
        cfg, pipeline = self._cfg, self._pipeline
        if cfg is None or pipeline is None or cfg.frames.pose_source == 'tf':
            return None
        down = self._tf_down
        return upright.upright_transform(down if down is not None else pipeline.gravity(snap))

    def _process_frame(self, frame: CameraFrame) -> bool:
        """One frame in the worker thread (FrameWorker): the pipeline step, then its outputs.
        False: the frame was dropped (the step failed)."""
        pipeline = self._pipeline
        if pipeline is None:
            return False
        t0 = time.perf_counter()
        self._learn_extrinsics(pipeline, frame)
        try:
            result = pipeline.step(self._attach_pose(frame))
        except Exception as err:  # noqa: BLE001  a bad frame must not stop the worker
            self._error_throttled(f'pipeline failed on a frame: {type(err).__name__}: {err}')
            return False
        with self._lock:
            self._latencies = replace(result.latency, total=(time.perf_counter() - t0) * 1e3)
            self._keyframes_in_window = result.keyframes_in_window
            self._keyframes_total = result.keyframes_total
        if result.status == StepStatus.SKIPPED:
            self.get_logger().warning(f'frame {frame.stamp_ns / 1e9:.3f} s skipped: '
                                      f'{result.reason}', throttle_duration_sec=_THROTTLE_S)
        elif result.is_keyframe:
            if frame.frame_id not in self._cameras_mapped:
                self._cameras_mapped.add(frame.frame_id)
                self.get_logger().info(f'camera {frame.frame_id!r}, first keyframe: '
                                       f'{result.reason}')
            if self.context.ok():
                self._publish_poses(frame, result.T_WC)
        return True

    def _learn_extrinsics(self, pipeline: Pipeline, frame: CameraFrame) -> None:
        """Unposed mode with frames.base_frame: the camera's mount T_BC from TF (the latest
        transform: a static one) into the pipeline, once per camera; retried on later frames
        while TF does not have it."""
        cfg = self._cfg
        if (cfg is None or cfg.frames.pose_source == 'tf' or not cfg.frames.base_frame
                or not frame.frame_id or frame.frame_id in self._extrinsics_known):
            return
        try:
            T_BC = self._tf.lookup(cfg.frames.base_frame, frame.frame_id, None)
            pipeline.set_extrinsics(frame.frame_id, T_BC)
        except (TransformLookupError, ValueError) as err:
            if self._throttle.allow(f'extrinsics:{frame.frame_id}'):  # per camera
                self.get_logger().warning(
                    f'camera {frame.frame_id!r} has no extrinsics yet (frames.base_frame '
                    f'{cfg.frames.base_frame!r}): {err}')
            return
        self._extrinsics_known.add(frame.frame_id)
        self.get_logger().info(f'camera {frame.frame_id!r}: extrinsics from TF '
                               f'{cfg.frames.base_frame} -> {frame.frame_id}')

    def _report_unplaced(self) -> None:
        """Unposed mode: how many frames of each camera could be placed neither by extrinsics
        nor by registration (Pipeline.frames_unplaced), logged when the counts changed, at most
        once per _THROTTLE_S, with what would place them."""
        cfg, pipeline = self._cfg, self._pipeline
        if cfg is None or pipeline is None:
            return
        counts = dict(pipeline.frames_unplaced)  # written by the worker thread: a copy
        if not counts or counts == self._unplaced_logged or not self._throttle.allow('unplaced'):
            return
        self._unplaced_logged = counts
        per_camera = ', '.join(f'{cam!r} {n}' for cam, n in sorted(counts.items()))
        fix = (f'publish the static TF {cfg.frames.base_frame} -> camera' if cfg.frames.base_frame
               else 'set frames.base_frame and publish the static TF base_frame -> camera')
        self.get_logger().warning(
            f'unposed mode: frames unplaced so far: {per_camera} (no extrinsics and no overlap '
            f'with the map; {fix})')

    def _publish_poses(self, frame: CameraFrame, T_WC: np.ndarray | None) -> None:
        cfg, pipeline = self._cfg, self._pipeline
        if cfg is None or pipeline is None or not self._pubs:
            return
        header = Header(stamp=messages.stamp_from_ns(frame.stamp_ns),
                        frame_id=cfg.frames.map_frame)
        localize = T_WC is not None and cfg.frames.pose_source != 'tf' and bool(frame.frame_id)
        T_OC = self._odom_pose(frame) if localize else None
        if T_OC is not None:
            self._tf_down = upright.down_from_odom(T_WC, T_OC)
        T_UW = self._upright(pipeline.snapshot())
        poses = pipeline.keyframe_poses()
        if T_UW is not None:
            poses = [T_UW @ T for T in poses]
        pose_array, path = messages.poses_to_msgs(header, poses)
        self._pubs['poses'].publish(pose_array)
        self._pubs['path'].publish(path)
        if localize:
            self._publish_localization(header, T_WC if T_UW is None else T_UW @ T_WC, T_OC)

    def _odom_pose(self, frame: CameraFrame) -> np.ndarray | None:
        """T_OC of the frame's camera in frames.odom_frame at its stamp, None when TF has none."""
        try:
            return self._tf.lookup(self._cfg.frames.odom_frame, frame.frame_id, frame.stamp_ns)
        except TransformLookupError:
            return None

    def _publish_localization(self, header: Header, T_MC: np.ndarray, T_OC: np.ndarray | None
                              ) -> None:
        """Unposed mode, the REP-105 way: map -> odom when TF gives the camera in odom (at the
        image stamp), else map -> frames.estimate_frame; never map -> the camera's own frame,
        which would give it a second parent. `T_MC`: the camera in the published map frame."""
        cfg = self._cfg
        if T_OC is None:
            child, T = cfg.frames.estimate_frame, T_MC
        else:
            child, T = cfg.frames.odom_frame, T_MC @ np.linalg.inv(T_OC)  # T_MO
        # known at once to this node's own lookups (Locate in any frame of the tree)
        self._tf.set_transform(cfg.frames.map_frame, child, messages.ns_from_stamp(header.stamp),
                               T, False)
        self._pubs['tf'].publish(TFMessage(transforms=[
            messages.transform_from_matrix(header, child, T)]))

    @_callback_guard(counts_as_dropped=False)
    def _publish_map(self) -> None:
        pipeline, pub = self._pipeline, self._pubs.get('map')
        if pipeline is None or pub is None or pub.get_subscription_count() == 0:
            return
        snap = pipeline.snapshot()
        if snap.version == self._published_map_version:
            return
        self._published_map_version = snap.version
        header = Header(stamp=messages.stamp_from_ns(snap.stamp_ns), frame_id=snap.frame)
        extra = None
        labels = self._cfg.publish.map_labels if self._cfg else ()
        if labels:
            label, score = pipeline.label_map(labels, snap)
            extra = {'label': label, 'score': score}
        pub.publish(messages.arrays_to_cloud(header, self._published_positions(snap),
                                             snap.colors, extra))

    def _published_positions(self, snap: MapSnapshot) -> np.ndarray:
        T_UW = self._upright(snap)
        return snap.positions if T_UW is None else upright.apply(T_UW, snap.positions)

    # ---- services ---------------------------------------------------------------------------
    def _no_map_reason(self) -> str:
        if self._pipeline is None:
            return f'no map yet: {self._no_model_reason}'
        return 'no map yet: no keyframe has been integrated'

    @_service_guard
    def _on_locate(self, request: Locate.Request, response: Locate.Response
                   ) -> Locate.Response:
        cfg = self._cfg
        assert cfg is not None
        query = messages.locate_query_from_request(request)
        pipeline = self._pipeline  # one reference: cleanup may drop it meanwhile
        response.success = False
        try:
            if pipeline is None:  # no engine: a malformed request is still answered as such
                validate_query(query, cfg.query)
                response.message = self._no_map_reason()
                return response
            snapshot = pipeline.snapshot()
            result = pipeline.locate(query, snapshot)  # validates the request
        except BadLocateRequest as err:
            response.message = f'bad request: {err}'
            return response
        except EmptyMapError:
            response.message = self._no_map_reason()
            return response
        except LocateError as err:
            response.message = str(err)
            return response
        frame, objects, note = result.frame or cfg.frames.map_frame, list(result.objects), ''
        T_UW = self._upright(snapshot)
        if T_UW is not None:  # what the node publishes as the map frame (frames/upright.py)
            objects = [transform_located(o, T_UW) for o in objects]
        target = request.target_frame
        if target and target != frame:
            try:
                T_TM = self._tf.lookup(target, frame, None)
            except TransformLookupError as err:
                note = f'; answered in {frame!r}, not {target!r}: {err}'
            else:
                objects = [transform_located(o, T_TM) for o in objects]
                frame = target
        header = Header(stamp=messages.stamp_from_ns(result.map_stamp_ns), frame_id=frame)
        response.objects = [messages.located_to_msg(o, header, request.include_points)
                            for o in objects]
        response.reasons = [o.reason for o in objects]
        found = sum(o.status != LocateStatus.NOT_FOUND for o in objects)
        response.success = True
        response.message = (result.message or f'{found} object(s) for {len(query.queries)} '
                            f'query(ies)') + f' in frame {frame!r}{note}'
        if 'markers' in self._pubs:
            self._pubs['markers'].publish(messages.located_markers(list(response.objects)))
        self._publish_relevancy(snapshot, result)
        return response

    def _publish_relevancy(self, snapshot, result) -> None:
        """The queried map coloured by the answer's relevancy (map frame, the map's stamp)."""
        pub = self._pubs.get('relevancy')
        if pub is None or result.relevancy is None:
            return
        header = Header(stamp=messages.stamp_from_ns(snapshot.stamp_ns), frame_id=snapshot.frame)
        pub.publish(messages.arrays_to_cloud(
            header, self._published_positions(snapshot),
            messages.relevancy_colors(result.relevancy),
            extra={'relevancy': result.relevancy}))

    @_service_guard
    def _on_save_map(self, request: SaveMap.Request, response: SaveMap.Response
                     ) -> SaveMap.Response:
        response.bytes = 0
        response.success = False
        pipeline = self._pipeline  # one reference: cleanup may drop it meanwhile
        if not request.path:
            response.message = 'path is empty: give a file path on the node machine'
            return response
        try:
            path = self._map_path(request.path, for_saving=True)
        except (OSError, ValueError) as err:
            response.message = f'map not saved to {request.path}: {err}'
            return response
        if pipeline is None or pipeline.snapshot().empty:
            response.message = f'nothing saved to {path}: {self._no_map_reason()}'
        else:
            try:
                pipeline.save(path)
                response.bytes = os.path.getsize(path)
            except (OSError, ValueError) as err:
                response.message = f'map not saved to {path}: {err}'
            else:
                response.success = True
                response.message = f'map saved to {path}'
        return response

    def _map_path(self, text: str, for_saving: bool) -> str:
        """`text` as an absolute path: relative ones resolve against node.map_directory."""
        path = os.path.expanduser(text)
        if os.path.isabs(path):
            return path
        cfg = self._cfg
        base = cfg.node.map_directory if cfg is not None else ''
        if base and not os.path.isabs(os.path.expanduser(base)):
            raise ValueError(f'node.map_directory={base!r} is not absolute; set an absolute '
                             'directory or give an absolute path')
        if not base:
            ros_home = os.environ.get('ROS_HOME') or os.path.join(os.path.expanduser('~'),
                                                                  '.ros')
            base = os.path.join(ros_home, 'maps')
            if for_saving:
                os.makedirs(base, exist_ok=True)
        return os.path.join(os.path.expanduser(base), path)

    @_service_guard
    def _on_load_map(self, request: LoadMap.Request, response: LoadMap.Response
                     ) -> LoadMap.Response:
        response.bytes = 0
        response.success = False
        if not request.path:
            response.message = 'path is empty: give the file written by save_map'
            return response
        try:
            path = self._map_path(request.path, for_saving=False)
        except ValueError as err:
            response.message = f'{request.path} not loaded: {err}'
            return response
        pipeline = self._pipeline
        if not os.path.isfile(path):
            response.message = f'{path} does not exist or is not a regular file'
        elif pipeline is None:
            response.message = (f'{path} not loaded: {self._no_model_reason}; the '
                                'current state is unchanged')
        else:
            try:
                pipeline.load(path)
                self._tf_down = None  # gravity of the old map's frame
            except (OSError, ValueError) as err:
                response.message = f'{path} not loaded, current map kept: {err}'
            else:
                response.success = True
                response.bytes = os.path.getsize(path)
                response.message = f'map loaded from {path}'
        return response

    @_service_guard
    def _on_reset(self, request: Trigger.Request, response: Trigger.Response
                  ) -> Trigger.Response:
        scheduler = self._scheduler
        dropped = scheduler.clear(reset=True) if scheduler is not None else 0
        self._reset_pipeline()
        response.success = True
        response.message = (f'frame buffers ({dropped} queued frame(s) dropped and counted), '
                            'keyframe window and map cleared')
        return response

    # ---- status -----------------------------------------------------------------------------
    @_callback_guard(counts_as_dropped=False)
    def _publish_status(self) -> None:
        if self._status_pub is None or self._cfg is None:
            return
        msg = PerceptionStatus()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = self._cfg.frames.map_frame
        msg.backend = self._backend_name
        msg.state = _STATE_NAMES.get(self._state_machine.current_state[0], 'unknown')
        pipeline = self._pipeline
        if pipeline is not None:
            snap = pipeline.snapshot()
            msg.map_ready, msg.voxels = not snap.empty, snap.n_voxels
        with self._lock:
            lat = self._latencies
            msg.latency_convert_ms = float(self._latency_convert_ms)
            msg.latency_encode_ms = float(lat.encode or 0.0)
            msg.latency_decode_ms = float(lat.decode or 0.0)
            msg.latency_pose_ms = float((lat.pose or 0.0) + (lat.match or 0.0)
                                        + (lat.refine or 0.0))
            msg.latency_integrate_ms = float(lat.integrate or 0.0)
            msg.latency_total_ms = float(lat.total)
            msg.keyframes_in_window = self._keyframes_in_window
            msg.keyframes_total = self._keyframes_total
        scheduler = self._scheduler
        counts = scheduler.counts() if scheduler is not None else FrameCounts()
        msg.frames_received = counts.received
        msg.frames_processed = counts.processed
        msg.frames_dropped = counts.dropped
        msg.frames_queued = counts.queued
        msg.frames_out_of_order = counts.out_of_order
        msg.frames_dropped_by_reset = counts.dropped_by_reset
        msg.frames_missing = counts.missing
        pipeline = self._pipeline
        if pipeline is not None:
            msg.frames_unplaced = sum(dict(pipeline.frames_unplaced).values())
        self._status_pub.publish(msg)
        self._report_unplaced()


class RosLogHandler(logging.Handler):
    """Python logging of the library (pipeline, mapping, query, ...) into the node's logger, so
    its lines reach /rosout and the launch log like the node's own."""

    def __init__(self, node: PerceptionNode) -> None:
        super().__init__()
        self._logger = node.get_logger()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = f'{record.name}: {self.format(record)}'
            if record.levelno >= logging.ERROR:
                self._logger.error(text)
            elif record.levelno >= logging.WARNING:
                self._logger.warning(text)
            elif record.levelno >= logging.INFO:
                self._logger.info(text)
            else:
                self._logger.debug(text)
        except Exception:  # noqa: BLE001  logging must never raise into the caller
            self.handleError(record)


def main(args: list[str] | None = None) -> int:
    """Run the node until SIGINT/SIGTERM or its shutdown transition; 0 on a clean end.

    rclpy's signal handler shuts the context down from another thread, so a signal can land
    while the node is being built or a transition runs: whatever then fails on the shut-down
    context (RCLError 'context is invalid') is the signal's doing and ends the process cleanly,
    like a signal during spin (seen: exit 1 with a traceback from a SIGINT during start-up).
    """
    if signals.received():  # during the imports, where Python may have lost the interrupt
        print(f'[{NODE_NAME}] interrupted while starting; the process ends', file=sys.stderr,
              flush=True)
        return 0
    rclpy.init(args=args)
    node: PerceptionNode | None = None
    executor: MultiThreadedExecutor | None = None
    try:
        node = PerceptionNode()
        library_log = logging.getLogger('ros2_sab3r')
        library_log.addHandler(RosLogHandler(node))
        library_log.setLevel(logging.DEBUG if node.get_logger().is_enabled_for(
            LoggingSeverity.DEBUG) else logging.INFO)
        library_log.propagate = False  # printed once, by the ROS logger
        executor = MultiThreadedExecutor(num_threads=4)
        executor.add_node(node)
        if node.get_parameter('node.autostart').value:
            _autostart(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception as err:
        if rclpy.ok():
            raise  # a real failure: its traceback and exit status 1
        print(f'[{NODE_NAME}] interrupted while starting or stopping ({type(err).__name__}: '
              f'{err}); the process ends', file=sys.stderr, flush=True)
    finally:
        # The pipeline worker must finish its frame before the interpreter tears down: a daemon
        # thread still inside numpy/torch at exit can crash the process (seen: SIGSEGV on SIGINT
        # during a slow decode).
        if node is not None:
            node._stop_worker()
        if executor is not None:
            executor.shutdown()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


def _autostart(node: PerceptionNode) -> None:
    """node.autostart: configure and activate; a failure says where it left the node (nothing
    to say when a signal stopped the start)."""
    for name, trigger in (('configure', node.trigger_configure),
                          ('activate', node.trigger_activate)):
        if trigger() != TransitionCallbackReturn.SUCCESS:
            if node.context.ok():
                hint = ', fix the parameters and configure' if name == 'configure' else ''
                node.get_logger().error(
                    f'autostart: {name} failed (reason above); the node is '
                    f'{node._state_machine.current_state[1]}{hint}')
            return


if __name__ == '__main__':
    raise SystemExit(main())
