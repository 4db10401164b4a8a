"""Pipeline benchmark for issue 4 (a script printing a table, not a timed test).

    python benchmarks/pipeline.py                        # quick: memory run of 2000 frames
    python benchmarks/pipeline.py --memory-frames 10000  # the issue's memory target

Figures and targets (512x384, 512-d CLIP features at stride 8, this 2-core machine):

- overhead per keyframe excluding the network: everything `Pipeline.step` does on a keyframe but
  the backend's encode/decode (sanitising outputs, matching, registration, refinement, keyframe
  bookkeeping); map integration is reported on its own line and rate, since fusing 196k points
  at the 2 M points/s target takes ~100 ms by itself, so the 20 ms target can only be meant
  without it;
- map integration: keyframes recorded from the posed run replayed into a fresh map, points fed
  per second (every pixel of each keyframe, with its features);
- Locate on a 500k-voxel map, each repetition a query not asked before (no result caching), with
  query.threads 1 and 2 (worker threads). Reading the 0.5 GB of bf16 CLIP features bounds it:
  one core of this machine reads ~9 GB/s (a plain copy of the features takes ~55 ms), so one
  thread cannot reach 50 ms;
- memory over N frames: a cheap stand-in backend (a textured wall in front of a camera driving
  down an endless corridor) so that 10 000 frames take minutes; the map keeps growing into new
  space, so eviction at mapping.max_voxels and the keyframe window run all the time. RSS is
  sampled and its slope after warm-up is printed. It runs first, in a clean process: the Locate
  map would stay in the allocator and hide growth.

numpy's OpenBLAS and torch both keep a thread pool per process; on a 2-core machine with another
busy process their products wait for the busy core (a 768 x 768 x 24 matmul: 0.2 ms alone, ~15 ms
then), so the per-keyframe code keeps its small products out of BLAS.

The machine is shared: figures depend on the load average printed with them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import torch

from ros2_sab3r.config import MappingConfig, config_from_flat
from ros2_sab3r.geometry.transforms import apply, invert
from ros2_sab3r.mapping.semantic_map import SemanticVoxelMap
from ros2_sab3r.pipeline import Pipeline
from ros2_sab3r.query.engine import QueryEngine
from ros2_sab3r.sim.groundtruth_backend import GroundTruthBackend
from ros2_sab3r.sim.standin import HashTextEncoderStandIn as HashText  # named stand-in text tower
from ros2_sab3r.sim.synthetic import make_scene
from ros2_sab3r.types import (
    CameraFrame,
    LocateQuery,
    PairPrediction,
    StepStatus,
    ViewPrediction,
)


def rss_mb() -> float:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20


def load() -> str:
    return '/'.join(f'{x:.1f}' for x in os.getloadavg())


# ------------------------------------------------------------------------------- keyframe path
def keyframe_run(width: int, height: int, n: int, posed: bool):
    """Run the stand-in backend on the synthetic scene; per-keyframe stage times (ms) and the
    integrate() calls made (for the integration replay)."""
    scene = make_scene(0)
    frames = scene.sequence(n, width, height)
    text = HashText()
    backend = GroundTruthBackend(frames, text, feature_stride=8,
                                 scene_center=np.array(scene.room_size) / 2)
    pipeline = Pipeline(config_from_flat({'frames.pose_source': 'tf' if posed else 'none'}),
                        backend, text)
    calls = []
    integrate = SemanticVoxelMap.integrate

    def recording(self, *args):
        calls.append(args)
        return integrate(self, *args)

    with mock.patch.object(SemanticVoxelMap, 'integrate', recording):
        results = [pipeline.step(f.camera_frame(posed=posed)) for f in frames]
    # the first keyframe decodes a self-pair and, posed, waits for motion: not a typical one
    kf = [r.latency.ran() for r in results[1:] if r.is_keyframe]
    if not kf or len(calls) < 2:
        raise SystemExit(f'benchmarks/pipeline.py: {n} frames gave {len(kf)} keyframe(s) after '
                         f'the first ({"posed" if posed else "unposed"}); the figures need at '
                         'least one, and two integrations: raise --frames (default 30)')
    net = np.array([x.get('encode', 0) + x.get('decode', 0) for x in kf])
    integ = np.array([x.get('integrate', 0) for x in kf])
    total = np.array([x['total'] for x in kf])
    tracked = [r.latency.total - (r.latency.encode or 0) - (r.latency.decode or 0)
               for r in results if r.status == StepStatus.TRACKED]
    stages = {k: float(np.median([x.get(k, 0) for x in kf])) for k in ('match', 'pose', 'refine')}
    return {'overhead_ms': float(np.median(total - net - integ)),
            'integrate_ms': float(np.median(integ)),
            'with_integration_ms': float(np.median(total - net)),
            'tracked_ms': float(np.median(tracked)) if tracked else 0.0,
            'keyframes': len(kf), 'stages': stages, 'calls': calls}


def integration_rate(calls) -> tuple[float, int]:
    """Replay recorded keyframe integrations into a fresh map: (points/s, points per keyframe)."""
    m = SemanticVoxelMap(MappingConfig(), clip_dim=HashText().dim)
    times = []
    for args in calls:
        t = time.perf_counter()
        m.integrate(*args)
        times.append(time.perf_counter() - t)
    n = len(calls[0][0])
    return n / float(np.median(times[1:])), n


# ---------------------------------------------------------------------------------- Locate
LABELS = ('chair', 'table', 'sofa', 'wall', 'floor', 'bed', 'lamp', 'door')


def surface_batch(rng, n_points: int, cells: int, origin):
    """Points on a random 3 m x 3 m plane, each tagged with one of `cells` feature cells."""
    normal = rng.normal(size=3)
    normal /= np.linalg.norm(normal)
    u = np.cross(normal, [0, 0, 1.0])
    u /= np.linalg.norm(u)
    v = np.cross(normal, u)
    ab = rng.uniform(0, 3, (n_points, 2))
    X = origin + ab[:, :1] * u + ab[:, 1:] * v
    patch = (ab[:, 0] // 0.6).astype(np.int64) * 5 + (ab[:, 1] // 0.6).astype(np.int64)
    cell = patch % cells  # 0.6 m patches of one class each
    return (X.astype(np.float32), np.full(n_points, 3.0, np.float32),
            rng.integers(0, 255, (n_points, 3)).astype(np.uint8), cell)


def build_map(n_voxels: int) -> SemanticVoxelMap:
    """A map of n_voxels voxels on random planes, 0.6 m patches of the LABELS' features."""
    rng = np.random.default_rng(1)
    E = HashText().encode(LABELS)
    m = SemanticVoxelMap(MappingConfig(voxel_size_m=0.05, max_voxels=n_voxels), clip_dim=512)
    i = 0
    while m.n_voxels < n_voxels:
        X, C, rgb, cell = surface_batch(rng, 200_000, len(LABELS), rng.uniform(-20, 20, 3))
        S = E + 0.5 / np.sqrt(512) * rng.normal(size=E.shape).astype(np.float32)
        m.integrate(X, C, rgb, i, cell, S)
        i += 1
    return m


def locate_times(m: SemanticVoxelMap, threads: int) -> list[float]:
    """ms per Locate (1 query + 4 canonical negatives) with query.threads=threads, each query
    new to this run."""
    torch.set_num_threads(os.cpu_count() or 1)  # torch's default; used by query.threads 0
    engine = QueryEngine(config_from_flat({'query.threads': threads}).query, HashText())
    snap = m.snapshot()
    engine.locate(snap, LocateQuery(queries=('warm-up',)))  # snapshot's cached arrays, threads
    times = []
    for label in LABELS:
        query = LocateQuery(queries=(f'{label} #{threads}',))  # fresh text, fresh similarities
        engine.embed(query.queries)  # the text encoder is a network: not Locate's own time
        t = time.perf_counter()
        engine.locate(snap, query)
        times.append(1e3 * (time.perf_counter() - t))
    return times


# ---------------------------------------------------------------------------------- memory
class CorridorStandInBackend:
    """Benchmark stand-in backend: every view sees the same bumpy, striped wall 2.5 m ahead.

    Its pair predictions are geometrically consistent with the camera poses (view 2's points
    are view 1's canonical points moved by the true relative pose, pair scale 1), so the posed
    pipeline fuses them as it would real ones, at a cost of a few ms. Nothing it produces says
    anything about model quality.
    """

    name = 'corridor (benchmark stand-in)'
    device = 'cpu'

    def __init__(self, width: int, height: int, text: HashText, stride: int = 8) -> None:
        self.input_size = (height, width)
        f = 0.8 * width
        self.K = np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1.0]])
        v, u = np.mgrid[0:height, 0:width].astype(np.float32)
        z = 2.5 + 0.2 * np.sin(u / 23.0) * np.cos(v / 17.0)
        self.X0 = np.stack([(u - width / 2) / f * z, (v - height / 2) / f * z, z], -1)
        self.C = np.full((height, width), 5.0, np.float32)
        rng = np.random.default_rng(0)
        D = rng.standard_normal((height, width, 24)).astype(np.float32)
        self.D = D / np.linalg.norm(D, axis=-1, keepdims=True)
        E = text.encode(LABELS)  # (8, 512)
        h, w = height // stride, width // stride
        stripe = (np.arange(w) * len(LABELS) // w)[None, :].repeat(h, 0)
        self.S = E[stripe].astype(np.float32)  # (h, w, 512) vertical stripes of classes
        self.image = rng.integers(0, 255, (height, width, 3)).astype(np.uint8)

    def encode(self, frame: CameraFrame) -> np.ndarray:
        return np.asarray(frame.T_WC, dtype=np.float64)  # the pose is all a view needs here

    def decode(self, a: np.ndarray, b: np.ndarray) -> PairPrediction:
        X_ab = apply(invert(a) @ b, self.X0)  # b's points in a's frame
        view1 = ViewPrediction(X=self.X0, C=self.C, D=self.D, D_conf=self.C, S_clip=self.S)
        view2 = ViewPrediction(X=X_ab, C=self.C, D=self.D, D_conf=self.C, S_clip=self.S)
        return PairPrediction(view1=view1, view2=view2, image_size=self.input_size)


def memory_run(n_frames: int, width: int = 256, height: int = 192, max_voxels: int = 100_000,
               samples: int = 20):
    """Posed run down the corridor (5 cm per frame); [(frame, RSS MB, voxels, keyframes)]."""
    text = HashText()
    backend = CorridorStandInBackend(width, height, text)
    cfg = config_from_flat({'frames.pose_source': 'tf', 'mapping.max_voxels': max_voxels})
    pipeline = Pipeline(cfg, backend, text)
    out = []
    every = max(n_frames // samples, 1)
    for i in range(n_frames):
        T = np.eye(4)
        T[0, 3] = 0.05 * i
        pipeline.step(CameraFrame(stamp_ns=(i + 1) * 10 ** 8, frame_id='cam',
                                  image=backend.image, K=backend.K, T_WC=T))
        if i % every == 0 or i == n_frames - 1:
            out.append((i, rss_mb(), pipeline.snapshot().n_voxels,
                        len(pipeline.keyframe_poses())))
    return out, pipeline


# ------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--frames', type=int, default=30, help='frames of each keyframe-path run')
    ap.add_argument('--memory-frames', type=int, default=2000,
                    help='frames of the memory run (issue target: 10000)')
    ap.add_argument('--locate-voxels', type=int, default=500_000)
    args = ap.parse_args()
    if args.frames < 2 or args.memory_frames < 4:
        ap.error('--frames must be at least 2 and --memory-frames at least 4 (the figures need '
                 'keyframes after the first and a second half of the memory run)')
    rows = []  # (figure, measured, target, pass)

    def row(name, value, target='', ok=None):
        rows.append((name, value, target, '' if ok is None else ('pass' if ok else 'FAIL')))
        print(f'  {name}: {value} (load {load()})', flush=True)

    # first: the Locate map (0.5 GB) would stay in the allocator and hide growth in RSS
    samples, pipeline = memory_run(args.memory_frames)
    late = [s for s in samples if s[0] >= samples[-1][0] / 2]  # after the map is full
    slope = np.polyfit([s[0] for s in late], [s[1] for s in late], 1)[0] * 1000
    cap = pipeline.config.mapping.max_voxels
    bounded = all(s[2] <= cap for s in samples)
    row(f'memory over {args.memory_frames} frames (posed, 256x192, max_voxels {cap})',
        f'RSS {samples[1][1]:.0f} -> {samples[-1][1]:.0f} MB, slope {slope:+.2f} MB/1000 '
        f'frames (2nd half); map <= cap: {bounded}', 'flat (|slope| < 1 MB/1000)',
        abs(slope) < 1.0 and bounded)
    print('  RSS samples (frame, MB, voxels, window):',
          [(i, round(r), v, w) for i, r, v, w in samples])
    del pipeline

    replay = None
    for posed in (False, True):
        mode = 'posed' if posed else 'unposed'
        o = keyframe_run(512, 384, args.frames, posed)
        row(f'overhead/keyframe, {mode} (excl. network, integration)',
            f'{o["overhead_ms"]:.1f} ms', '<= 20 ms', o['overhead_ms'] <= 20)
        row(f'  stages {mode} (median ms)',
            ', '.join(f'{k} {v:.1f}' for k, v in o['stages'].items()))
        row(f'  integration/keyframe {mode}', f'{o["integrate_ms"]:.1f} ms')
        row(f'  overhead/keyframe incl. integration {mode}',
            f'{o["with_integration_ms"]:.1f} ms')
        if not posed:
            row('  overhead/tracked frame unposed', f'{o["tracked_ms"]:.1f} ms')
        else:
            replay = o['calls']
    rate, n = integration_rate(replay)
    row(f'map integration ({n} px keyframes, 512-d features)', f'{rate / 1e6:.2f} M points/s',
        '>= 2 M points/s', rate >= 2e6)

    m = build_map(args.locate_voxels)
    for threads in (1, 2):
        t = locate_times(m, threads)
        row(f'Locate {m.n_voxels} voxels x 512-d, query.threads {threads}, median (max)',
            f'{np.median(t):.0f} ms ({max(t):.0f})', '<= 50 ms', float(np.median(t)) <= 50)
    # the same with one core held by another process (the network, another node)
    hog = subprocess.Popen([sys.executable, '-c', 'while True: pass'])
    try:
        time.sleep(0.5)
        for threads, what in ((2, 'query.threads 2'), (0, "query.threads 0 (torch's 2 threads)")):
            t = locate_times(m, threads)
            row(f'  Locate, {what}, one core busy, median (max)',
                f'{np.median(t):.0f} ms ({max(t):.0f})')
    finally:
        hog.kill()
        hog.wait()
    del m

    print(f'\nload average (1/5/15 min) at the end: {load()} on {os.cpu_count()} cores; '
          f'torch {torch.__version__}')
    widths = [max(len(r[k]) for r in rows) for k in range(3)]
    head = ('figure', 'measured', 'target')
    print(' | '.join(h.ljust(w) for h, w in zip(head, widths)) + ' | result')
    print('-' * (sum(widths) + 15))
    for r in rows:
        print(' | '.join(c.ljust(w) for c, w in zip(r[:3], widths)) + f' | {r[3]}')


if __name__ == '__main__':
    main()
