"""A front/back camera rig for the node's real-process tests: two cameras on one robot body,
views not overlapping (the back one turned 180 deg about its y axis, 0.3 m behind), rendered
from the synthetic scene named by model.standin_scene, and the stand-in backend that answers
for both cameras' frames (``model.backend: 'tests.ros.rig:FrontBackRigStandIn'``)."""

from __future__ import annotations

import numpy as np

from ros2_sab3r.sim.groundtruth_backend import GroundTruthBackend
from ros2_sab3r.sim.standin import HashTextEncoderStandIn, SceneSpec
from ros2_sab3r.sim.synthetic import intrinsics, make_scene

# Back camera in the front camera's frame (camera axes: x right, y down, z forward).
T_FRONT_BACK = np.diag([-1.0, 1.0, -1.0, 1.0])
T_FRONT_BACK[2, 3] = -0.3
BACK_DELAY_NS = 1_000_000  # the back frame of a step is stamped 1 ms after the front one


def render_rig(spec: SceneSpec):
    """(scene, front frames, back frames) along a level robot path; the pose of the body is
    the front camera's."""
    scene = make_scene(seed=spec.seed)
    K = intrinsics(spec.width, spec.height)
    front, back = [], []
    for i, T_WF in enumerate(scene.trajectory(spec.frames, kind='robot', turns=0.4)):
        stamp = int(1e9 + i * 1e9 / spec.fps)
        front.append(scene.render(T_WF, K, spec.width, spec.height, stamp_ns=stamp))
        back.append(scene.render(T_WF @ T_FRONT_BACK, K, spec.width, spec.height,
                                 stamp_ns=stamp + BACK_DELAY_NS))
    return scene, front, back


class FrontBackRigStandIn(GroundTruthBackend):
    """GroundTruthBackend over both cameras of the rig; metric pointmaps (no per-pair scale
    jitter), as extrinsics are in metres."""

    @classmethod
    def from_config(cls, model) -> FrontBackRigStandIn:
        scene, front, back = render_rig(SceneSpec.parse(model.standin_scene))
        return cls(front + back, HashTextEncoderStandIn(), scale_jitter=0.0,
                   scene_center=np.array(scene.room_size) / 2)
