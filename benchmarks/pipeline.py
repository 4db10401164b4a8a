"""Pipeline benchmark on synthetic scenes with the stand-in backend (not a timed test).

    python benchmarks/pipeline.py                 # quick: 60-frame run, 1000-frame memory run
    python benchmarks/pipeline.py --memory-frames 10000

Prints each figure next to its target from issue 4. The stand-in backend's own time (encode and
decode) is excluded from "pipeline overhead", as the network's would be.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import time

import numpy as np

from ros2_sab3r.config import MappingConfig, config_from_flat
from ros2_sab3r.eval.groundtruth_backend import GroundTruthBackend
from ros2_sab3r.eval.synthetic import make_scene
from ros2_sab3r.mapping.semantic_map import SemanticVoxelMap
from ros2_sab3r.pipeline import Pipeline
from ros2_sab3r.query.engine import QueryEngine
from ros2_sab3r.types import LocateQuery


class HashText:
    """Deterministic unit vector per string (a benchmark stand-in for the text tower)."""

    dim = 512

    def encode(self, texts):
        out = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], 'little')
            v = np.random.default_rng(seed).standard_normal(self.dim)
            out.append(v / np.linalg.norm(v))
        return np.array(out, np.float32)


def rss_mb() -> float:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20


def overhead(width: int, height: int, n: int, posed: bool):
    scene = make_scene(0)
    frames = scene.sequence(n, width, height)
    text = HashText()
    backend = GroundTruthBackend(frames, text, feature_stride=8,
                                 scene_center=np.array(scene.room_size) / 2)
    pipeline = Pipeline(config_from_flat({'frames.pose_source': 'tf' if posed else 'none'}),
                        backend, text)
    results = [pipeline.step(f.camera_frame(posed=posed)) for f in frames]
    kf = [r for r in results[1:] if r.is_keyframe]
    net = [r.latency_ms.get('encode', 0) + r.latency_ms.get('decode', 0) for r in kf]
    over = [r.latency_ms['total'] - x for r, x in zip(kf, net)]
    integ = [r.latency_ms.get('integrate', 0) for r in kf]
    tracked = [r.latency_ms['total'] - r.latency_ms.get('encode', 0) - r.latency_ms.get(
        'decode', 0) for r in results if r.status == 'tracked']
    return {'overhead_ms': float(np.median(over)), 'integrate_ms': float(np.median(integ)),
            'tracked_ms': float(np.median(tracked)) if tracked else 0.0, 'keyframes': len(kf),
            'points_per_kf': width * height, 'stages': {
                k: float(np.median([r.latency_ms.get(k, 0) for r in kf]))
                for k in ('match', 'pose', 'refine', 'integrate')}}


def surface_batch(rng, n_points: int, cells: int, dim: int, origin):
    """Points on a few random planes (like a keyframe's view), with semantic features."""
    normal = rng.normal(size=3)
    normal /= np.linalg.norm(normal)
    u = np.cross(normal, [0, 0, 1.0])
    u /= np.linalg.norm(u)
    v = np.cross(normal, u)
    ab = rng.uniform(0, 3, (n_points, 2))
    X = origin + ab[:, :1] * u + ab[:, 1:] * v
    S = rng.normal(size=(cells, dim)).astype(np.float32)
    order = np.argsort(ab[:, 0] // 0.1 * 1000 + ab[:, 1] // 0.1)
    cell = (np.arange(n_points) * cells // n_points)[np.argsort(order)]
    return X.astype(np.float32), np.full(n_points, 3.0, np.float32), rng.integers(
        0, 255, (n_points, 3)).astype(np.uint8), cell, S


def integration_rate(n_batches: int = 8):
    rng = np.random.default_rng(0)
    m = SemanticVoxelMap(MappingConfig(max_voxels=500_000), clip_dim=512)
    n = 512 * 384
    times = []
    for i in range(n_batches):
        X, C, rgb, cell, S = surface_batch(rng, n, 64 * 48, 512, rng.uniform(-5, 5, 3))
        t = time.perf_counter()
        m.integrate(X, C, rgb, i, cell, S)
        times.append(time.perf_counter() - t)
    return n / float(np.median(times))


def locate_time(n_voxels: int = 500_000, repeats: int = 5):
    rng = np.random.default_rng(1)
    text = HashText()
    m = SemanticVoxelMap(MappingConfig(voxel_size_m=0.05, max_voxels=n_voxels), clip_dim=512)
    labels = ['chair', 'table', 'sofa', 'wall', 'floor', 'bed', 'lamp', 'door']
    E = text.encode(labels)
    i = 0
    while m.n_voxels < n_voxels:
        X, C, rgb, cell, _ = surface_batch(rng, 200_000, len(labels), 512,
                                           rng.uniform(-20, 20, 3))
        S = E + 0.5 / np.sqrt(512) * rng.normal(size=E.shape).astype(np.float32)
        m.integrate(X, C, rgb, i, cell, S)
        i += 1
    engine = QueryEngine(config_from_flat({}).query, text)
    snap = m.snapshot()
    engine.locate(snap, LocateQuery(queries=('chair',)))  # warm the embedding cache
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        engine.locate(snap, LocateQuery(queries=('chair',)))
        times.append(time.perf_counter() - t)
    return snap.n_voxels, 1e3 * float(np.median(times))


def memory_run(n_frames: int, width: int = 256, height: int = 192):
    """Posed run over n_frames, cycling a 120-frame loop with fresh stamps; RSS samples."""
    scene = make_scene(0)
    base = scene.sequence(120, width, height)
    text = HashText()
    backend = GroundTruthBackend(base, text, feature_stride=4,
                                 scene_center=np.array(scene.room_size) / 2)
    cfg = config_from_flat({'frames.pose_source': 'tf', 'mapping.max_voxels': 20_000})
    pipeline = Pipeline(cfg, backend, text)
    samples = []
    for i in range(n_frames):
        src = base[i % len(base)]
        frame = dataclasses.replace(src.camera_frame(posed=True))
        pipeline.step(frame)
        if i % max(n_frames // 10, 1) == 0 or i == n_frames - 1:
            samples.append((i, rss_mb(), pipeline.map.n_voxels))
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--frames', type=int, default=60, help='frames of the overhead run')
    ap.add_argument('--memory-frames', type=int, default=1000,
                    help='frames of the memory run (issue target: 10000)')
    args = ap.parse_args()
    rows = []
    for posed in (False, True):
        o = overhead(512, 384, args.frames, posed)
        mode = 'posed' if posed else 'unposed'
        rows.append((f'overhead per keyframe, {mode}, 512x384 (excl. network)',
                     f'{o["overhead_ms"]:.1f} ms', '<= 20 ms'))
        rows.append((f'  of which map integration ({o["points_per_kf"]} points)',
                     f'{o["integrate_ms"]:.1f} ms', ''))
        rows.append((f'  stages {mode}', ', '.join(f'{k} {v:.1f}' for k, v in o['stages'].items()),
                     ''))
        if not posed:
            rows.append(('overhead per tracked frame, unposed', f'{o["tracked_ms"]:.1f} ms', ''))
    rows.append(('map integration, 512x384 batches with 512-d features',
                 f'{integration_rate() / 1e6:.2f} M points/s', '>= 2 M points/s'))
    n, ms = locate_time()
    rows.append((f'Locate, 1 query + 4 negatives, {n} voxels x 512-d fp16', f'{ms:.0f} ms',
                 '<= 50 ms'))
    samples = memory_run(args.memory_frames)
    first, last = samples[1] if len(samples) > 1 else samples[0], samples[-1]
    rows.append((f'memory over {args.memory_frames} frames (posed, 256x192, max 20k voxels)',
                 f'RSS {first[1]:.0f} MB @ {first[0]} -> {last[1]:.0f} MB @ {last[0]}',
                 'flat'))
    width = max(len(r[0]) for r in rows)
    print(f'{"measure":<{width}} | {"value":<40} | target')
    print('-' * (width + 60))
    for name, value, target in rows:
        print(f'{name:<{width}} | {value:<40} | {target}')
    print('\nRSS samples (frame, MB, voxels):', [(i, round(r), v) for i, r, v in samples])


if __name__ == '__main__':
    main()
