"""Bad input never crashes the pipeline and never loses what was mapped."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ros2_sab3r.geometry.transforms import rotation_angle_deg
from ros2_sab3r.query.engine import LocateError
from ros2_sab3r.sim.synthetic import look_at
from ros2_sab3r.types import CameraFrame, LocateQuery, LocateStatus
from tests.doubles import CorruptingBackendDouble
from tests.pipeline.conftest import make_backend, make_pipeline

pytestmark = pytest.mark.slow


@pytest.mark.parametrize('mode', ['nan', 'zero_conf'])
def test_unusable_pointmaps_skip_the_frame(scene, frames, text_encoder, mode):
    short = frames[:12]
    bad = {short[5].stamp_ns}
    backend = CorruptingBackendDouble(make_backend(scene, short, text_encoder), bad, mode)
    pipeline = make_pipeline(backend, text_encoder, posed=False)
    results = [pipeline.step(f.camera_frame()) for f in short]
    assert results[5].status == 'skipped' and results[5].T_WC is None
    assert 'pointmap' in results[5].reason or 'confident' in results[5].reason
    assert all(r.status != 'skipped' for i, r in enumerate(results) if i != 5)
    assert results[-1].voxels > 0


def test_partly_nan_pointmap_still_registers(scene, frames, text_encoder):
    short = frames[:8]
    backend = CorruptingBackendDouble(make_backend(scene, short, text_encoder),
                                      {f.stamp_ns for f in short}, 'half_nan')
    pipeline = make_pipeline(backend, text_encoder, posed=False)
    results = [pipeline.step(f.camera_frame()) for f in short]
    assert all(r.status != 'skipped' for r in results), [r.reason for r in results]
    assert np.isfinite(pipeline.snapshot().positions).all()
    overlaps = [r.overlap for r in results if r.overlap is not None]
    assert overlaps and all(0.0 < o <= 1.0 for o in overlaps)  # NaN descriptors never match


def test_pair_without_overlap_is_skipped_and_tracking_resumes(scene, text_encoder):
    K_frames = scene.sequence(1, 256, 192)
    K = K_frames[0].K
    c = np.array([scene.room_size[0] / 2, scene.room_size[1] / 2, 1.4])
    a = scene.render(look_at(c, np.array([1.0, 0, -0.3])), K, 256, 192, stamp_ns=1)
    b = scene.render(look_at(c, np.array([-1.0, 0, -0.3])), K, 256, 192, stamp_ns=2)
    a2 = scene.render(look_at(c + [0.05, 0, 0], np.array([1.0, 0.1, -0.3])), K, 256, 192,
                      stamp_ns=3)
    pipeline = make_pipeline(make_backend(scene, [a, b, a2], text_encoder), text_encoder, False)
    r = [pipeline.step(f.camera_frame()) for f in (a, b, a2)]
    assert r[0].is_keyframe
    assert r[1].status == 'skipped' and 'overlap' in r[1].reason
    assert r[2].status in ('tracked', 'keyframe')
    assert r[2].voxels >= r[0].voxels > 0  # nothing lost


def test_pure_rotation_unposed_tracks_rotation(scene, text_encoder):
    frames = scene.sequence(16, 256, 192, kind='rotation', turns=0.25)
    pipeline = make_pipeline(make_backend(scene, frames, text_encoder), text_encoder, False)
    results = [pipeline.step(f.camera_frame()) for f in frames]
    assert all(r.status != 'skipped' for r in results), [r.reason for r in results]
    T0 = frames[0].T_WC
    for r, f in zip(results, frames):
        rel_est = r.T_WC
        rel_gt = np.linalg.inv(T0) @ f.T_WC
        assert rotation_angle_deg(rel_est[:3, :3].T @ rel_gt[:3, :3]) < 1.0
        assert np.linalg.norm(rel_est[:3, 3]) < 0.02  # turning on the spot


def test_pure_rotation_posed_waits_for_baseline(scene, text_encoder):
    frames = scene.sequence(16, 256, 192, kind='rotation', turns=0.25)
    pipeline = make_pipeline(make_backend(scene, frames, text_encoder), text_encoder, True)
    results = [pipeline.step(f.camera_frame(posed=True)) for f in frames]
    skipped = [r for r in results if r.status == 'skipped']
    assert skipped and all('baseline' in r.reason for r in skipped)
    assert pipeline.snapshot().empty  # no metric scale yet: nothing fused, nothing wrong fused
    with pytest.raises(LocateError, match='empty'):
        pipeline.locate(LocateQuery(queries=('chair',)))


def test_posed_mode_without_pose_or_with_bad_pose(scene, frames, text_encoder):
    pipeline = make_pipeline(make_backend(scene, frames[:2], text_encoder), text_encoder, True)
    r = pipeline.step(frames[0].camera_frame(posed=False))
    assert r.status == 'skipped' and 'pose' in r.reason
    bad = np.eye(4)
    bad[:3, :3] *= 2.0
    f = CameraFrame(stamp_ns=frames[0].stamp_ns, frame_id='cam', image=frames[0].rgb, T_WC=bad)
    assert pipeline.step(f).status == 'skipped'


def test_a_bug_is_not_a_skipped_frame(scene, frames, text_encoder, monkeypatch):
    """Only FrameRejected (bad data) skips a frame; any other ValueError is a bug and surfaces."""
    import ros2_sab3r.pipeline as pipeline_module

    pipeline = make_pipeline(make_backend(scene, frames[:2], text_encoder), text_encoder, False)
    assert pipeline.step(frames[0].camera_frame()).status == 'keyframe'

    def broken(*args):
        raise ValueError('operands could not be broadcast together')

    monkeypatch.setattr(pipeline_module, 'overlap_ratio', broken)
    with pytest.raises(ValueError, match='broadcast'):
        pipeline.step(frames[1].camera_frame())


def test_wrong_image_size_and_unknown_frame_are_skipped(scene, frames, text_encoder):
    pipeline = make_pipeline(make_backend(scene, frames[:2], text_encoder), text_encoder, False)
    small = CameraFrame(stamp_ns=frames[0].stamp_ns, frame_id='cam',
                        image=np.zeros((10, 10, 3), np.uint8))
    assert pipeline.step(small).status == 'skipped'
    unknown = CameraFrame(stamp_ns=123, frame_id='cam', image=frames[0].rgb)
    assert pipeline.step(unknown).status == 'skipped'
    with pytest.raises(TypeError):
        pipeline.step('not a frame')


def test_queries_of_0_1_200_and_unicode(posed_run):
    pipeline, _ = posed_run
    with pytest.raises(LocateError, match='no queries'):
        pipeline.locate(LocateQuery(queries=()))
    one = pipeline.locate(LocateQuery(queries=('chair',), top_k=1))
    assert len(one.objects) == 1 and one.objects[0].status != LocateStatus.NOT_FOUND
    with pytest.raises(LocateError, match='max_queries'):
        pipeline.locate(LocateQuery(queries=tuple(f'thing {i}' for i in range(200))))
    uni = pipeline.locate(LocateQuery(queries=('椅子', 'chaise longue ☕', 'Stuhl')))
    assert len(uni.objects) == 3  # answered (NOT_FOUND with the hash double), no crash
    for bad in ((' ',), ('x' * 10_000,), ('\ud800',), (3,)):
        with pytest.raises(LocateError):
            pipeline.locate(LocateQuery(queries=bad))
    with pytest.raises(LocateError):
        pipeline.locate(LocateQuery(queries=('chair',), top_k=-1))
    with pytest.raises(LocateError):
        pipeline.locate(LocateQuery(queries=('chair',), min_score=float('nan')))
    # the caller's negatives can suppress a query: 'chair' against 'chair' itself as negative
    neg = pipeline.locate(LocateQuery(queries=('bed',), negatives=('bed',)))
    assert neg.objects[0].status != LocateStatus.NOT_FOUND  # a query is never its own negative


def test_locate_while_stepping(scene, frames, text_encoder):
    """Readers query snapshots while the writer integrates; no errors, monotone versions."""
    short = frames[:20]
    pipeline = make_pipeline(make_backend(scene, short, text_encoder), text_encoder, True)
    pipeline.step(short[0].camera_frame(posed=True))
    pipeline.step(short[6].camera_frame(posed=True))
    errors, versions = [], []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            snap = pipeline.snapshot()
            versions.append(snap.version)
            try:
                pipeline.locate(LocateQuery(queries=('chair', 'bed')))
            except LocateError as exc:  # empty map at the very start is a valid answer
                if 'empty' not in str(exc):
                    errors.append(exc)
            except Exception as exc:  # noqa: BLE001 - any other failure is the bug under test
                errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    for f in short[7:]:
        pipeline.step(f.camera_frame(posed=True))
    stop.set()
    t.join()
    assert not errors
    assert versions == sorted(versions)
