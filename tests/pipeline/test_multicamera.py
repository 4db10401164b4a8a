"""Several cameras in unposed mode: a front and a back camera on one body, views not overlapping.

The back camera is placed through its static extrinsics T_BC; without them its frames are
skipped, counted per camera and explained, never silently dropped.
"""

from __future__ import annotations

import numpy as np
import pytest

from ros2_sab3r.geometry.transforms import rotation_angle_deg
from ros2_sab3r.pipeline import Pipeline
from ros2_sab3r.sim.synthetic import intrinsics, observed_centroids
from ros2_sab3r.types import LocateQuery, LocateStatus
from tests.pipeline.conftest import HEIGHT, STRIDE, WIDTH, make_pipeline

pytestmark = pytest.mark.slow

# Back camera: turned 180 deg about the camera's y (down) axis, 0.3 m behind the front one. The
# body frame is the front camera's.
T_B_BACK = np.diag([-1.0, 1.0, -1.0, 1.0])
T_B_BACK[2, 3] = -0.3
N_FRAMES = 16


@pytest.fixture(scope='module')
def rig(scene, text_encoder):
    """(front frames, back frames, backend): the back frame of step i is rendered 1 ms after
    the front one from the same body pose."""
    from ros2_sab3r.sim.groundtruth_backend import GroundTruthBackend

    K = intrinsics(WIDTH, HEIGHT)
    poses = scene.trajectory(N_FRAMES, kind='robot', turns=0.4)
    front, back = [], []
    for i, T_WB in enumerate(poses):
        stamp = int(1e9 + i * 1e8)
        front.append(scene.render(T_WB, K, WIDTH, HEIGHT, stamp_ns=stamp))
        back.append(scene.render(T_WB @ T_B_BACK, K, WIDTH, HEIGHT, stamp_ns=stamp + 1_000_000))
    # metric pointmaps (no per-pair scale jitter): extrinsics are in metres
    backend = GroundTruthBackend(front + back, text_encoder, feature_stride=STRIDE,
                                 scale_jitter=0.0, scene_center=np.array(scene.room_size) / 2)
    return front, back, backend


def _run(pipeline: Pipeline, front, back):
    out = []
    for f, b in zip(front, back):
        out.append(('front', f, pipeline.step(f.camera_frame(frame_id='front'))))
        out.append(('back', b, pipeline.step(b.camera_frame(frame_id='back'))))
    return out


def test_overlap_of_front_and_back_is_nil(rig):
    front, back, _ = rig
    # the premise: nothing the back camera sees projects into the front camera's image
    f, b = front[0], back[0]
    X = b.points_world().reshape(-1, 3)
    T_CW = np.linalg.inv(f.T_WC)
    z = X @ T_CW[2, :3] + T_CW[2, 3]
    assert (z > 0.05).mean() < 0.01


@pytest.fixture(scope='module')
def placed_run(rig, text_encoder):
    """The rig's sequence through a pipeline that knows both cameras' extrinsics."""
    front, back, backend = rig
    pipeline = make_pipeline(backend, text_encoder, posed=False)
    pipeline.set_extrinsics('front', np.eye(4))
    pipeline.set_extrinsics('back', T_B_BACK)
    return pipeline, _run(pipeline, front, back)


def test_back_camera_placed_by_extrinsics(rig, placed_run):
    front, back, _ = rig
    pipeline, steps = placed_run
    assert all(r.status != 'skipped' for _, _, r in steps), [r.reason for _, _, r in steps]
    assert pipeline.frames_unplaced == {}
    assert 'placed by its extrinsics' in steps[1][2].reason
    # the map frame is the first front camera's: ground truth moved into it
    T_MW = np.linalg.inv(front[0].T_WC)
    for cam, truth, r in steps:
        T_gt = T_MW @ truth.T_WC
        assert np.linalg.norm(r.T_WC[:3, 3] - T_gt[:3, 3]) < 0.05, (cam, truth.stamp_ns)
        assert rotation_angle_deg(r.T_WC[:3, :3].T @ T_gt[:3, :3]) < 2.0, (cam, truth.stamp_ns)
    # what only the back camera saw is in the map, where it is
    back_kf = [r for cam, _, r in steps if cam == 'back' and r.is_keyframe]
    assert back_kf
    snap = pipeline.snapshot()
    P = snap.positions @ np.linalg.inv(T_MW)[:3, :3].T + np.linalg.inv(T_MW)[:3, 3]
    seen_back = np.concatenate([b.points_world()[::8, ::8].reshape(-1, 3) for b in back])
    d = np.min(np.linalg.norm(seen_back[::7, None, :] - P[None, ::5, :], axis=-1), axis=1)
    assert np.median(d) < 0.05


def test_back_camera_without_extrinsics_is_counted_not_dropped(rig, text_encoder):
    front, back, backend = rig
    pipeline = make_pipeline(backend, text_encoder, posed=False)
    steps = _run(pipeline, front, back)
    back_steps = [r for cam, _, r in steps if cam == 'back']
    assert all(r.status == 'skipped' for r in back_steps)
    assert pipeline.frames_unplaced == {'back': N_FRAMES}
    assert "camera 'back' cannot be placed: it has no extrinsics" in back_steps[0].reason
    assert all(r.status != 'skipped' for cam, _, r in steps if cam == 'front')
    # extrinsics for the back camera alone do not help: no body pose to place it from
    pipeline.reset()
    pipeline.set_extrinsics('back', T_B_BACK)
    steps = _run(pipeline, front[:3], back[:3])
    assert pipeline.frames_unplaced == {'back': 3}
    assert 'no camera with extrinsics was placed yet' in steps[1][2].reason


def test_overlapping_second_camera_is_registered(rig, scene, text_encoder):
    """Without extrinsics a second camera whose view overlaps is registered to the map."""
    front, _, backend = rig
    pipeline = make_pipeline(backend, text_encoder, posed=False)
    pipeline.step(front[0].camera_frame(frame_id='front'))
    r = pipeline.step(front[1].camera_frame(frame_id='side'))
    assert r.status == 'tracked', r.reason  # against the front camera's keyframe
    T_gt = np.linalg.inv(front[0].T_WC) @ front[1].T_WC
    assert np.linalg.norm(r.T_WC[:3, 3] - T_gt[:3, 3]) < 0.05
    assert pipeline.frames_unplaced == {}


@pytest.mark.unit
def test_extrinsics_are_checked(rig, text_encoder):
    _, _, backend = rig
    pipeline = make_pipeline(backend, text_encoder, posed=False)
    with pytest.raises(ValueError, match="camera 'back'"):
        pipeline.set_extrinsics('back', np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match='frame_id'):
        pipeline.set_extrinsics('', np.eye(4))
    pipeline.set_extrinsics('back', np.eye(4))
    pipeline.set_extrinsics('back', None)


def test_locate_finds_what_the_back_camera_saw_where_it_is(rig, placed_run, scene):
    front, back, _ = rig
    pipeline, _ = placed_run
    seen = _instances_seen(back)
    assert seen
    T_MW = np.linalg.inv(front[0].T_WC)
    label = {o.instance_id: o.label for o in scene.objects}
    observed = observed_centroids(front + back, pipeline.config.mapping.voxel_size_m)
    result = pipeline.locate(LocateQuery(queries=tuple(sorted({label[i] for i in seen})),
                                         top_k=10))
    for iid in seen:
        c = T_MW[:3, :3] @ observed[iid] + T_MW[:3, 3]
        found = [a for a in result.objects
                 if a.query == label[iid] and a.status == LocateStatus.FOUND]
        # the reference takes every frame's pixels, the map only keyframes'
        assert min(np.linalg.norm(a.centroid - c) for a in found) < 0.3, label[iid]


def _instances_seen(frames) -> set[int]:
    """Furniture instances covering at least 2000 pixels of these frames in all."""
    counts: dict[int, int] = {}
    for f in frames:
        ids, n = np.unique(f.instance, return_counts=True)
        for i, c in zip(ids.tolist(), n.tolist()):
            counts[i] = counts.get(i, 0) + c
    return {i for i, c in counts.items() if c >= 2000 and i > 6}  # 1-6: walls, floor, ceiling
