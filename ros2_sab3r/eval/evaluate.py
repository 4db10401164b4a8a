"""Offline evaluation of recorded data: frames from a bag through the node's Pipeline.

What is run (deterministically, as fast as the backend allows):

1. **Sequence**: every frame (after stride) through one ``Pipeline``, exactly as the node would,
   with the configured pose source. Gives stage latencies, the keyframe rate, memory, poses for
   the pose metrics, the final map for Locate and a map-level semantic score.
2. **View groups** (SAB3R §4, Map and Locate): groups of 2, 3 and 4 overlapping views, each
   mapped by a fresh Pipeline from the images alone (no intrinsics, no poses; every view made a
   keyframe), scored against the group's ground truth after the one-view alignment.
3. **Depth**: the backend's own pointmap of single frames (the frame paired with itself), with
   the scale protocol of :func:`metrics.depth_errors`.

Predicted points are the map's voxels (centre of the fused points), each labelled by the class
whose text embedding is closest (cosine) to the voxel's CLIP feature; voxels without a feature
are unlabelled and count as wrong. The map's frame is put onto the ground truth with one
ground-truth image (the first keyframe): its pose and the ratio of its ground-truth depth to the
backend's predicted depth (scale only in unposed mode; posed maps are metric).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
import logging
import resource
import sys
import time

import numpy as np
from tqdm import tqdm

from ros2_sab3r.config import PerceptionConfig, iter_params
from ros2_sab3r.eval import metrics
from ros2_sab3r.eval.bag import BagData, BagFrame
from ros2_sab3r.geometry.boxes import fit_box
from ros2_sab3r.inference.factory import LoadedModel
from ros2_sab3r.model.preprocess import resample_to_network
from ros2_sab3r.pipeline import Pipeline
from ros2_sab3r.types import LocateQuery, LocateStatus, StepLatency, StepResult, StepStatus

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class EvalOptions:
    """How the evaluation samples the data (the pipeline's own knobs are PerceptionConfig)."""

    group_sizes: tuple[int, ...] = (2, 3, 4)  # views per Map-and-Locate group, as in the paper
    groups_per_size: int = 2  # the paper builds 2 groups per size and scene
    group_gap: int = 3  # frames between consecutive views of a group (shrunk until they overlap)
    min_group_overlap: float = 0.2  # share of a view's pixels another group view must see
    gt_pixel_stride: int = 2  # ground-truth points from every n-th pixel row and column
    max_gt_frames: int = 60  # frames whose ground truth forms the sequence-level reference
    depth_frames: int = 20  # frames (evenly spread) evaluated for depth
    depth_scale: str = 'median'  # 'median' (per image) or 'none' (metric predictions)
    max_pose_pairs: int = 5000
    locate_radius_m: float = 0.5
    absent_queries: int = 3  # classes of the label map absent from the scene, asked for too
    locate_exclude: tuple[str, ...] = ('unlabelled', 'wall', 'floor', 'ceiling',
                                       'otherstructure', 'otherfurniture', 'otherprop')
    gt_voxel_m: float = 0.05  # voxel size of ground-truth instance surfaces
    min_instance_pixels: int = 200  # an instance seen by fewer pixels is not a Locate target
    gt_gravity: tuple[float, float, float] = (0.0, 0.0, -1.0)  # in the ground-truth world
    progress: bool = True

    def validate(self) -> EvalOptions:
        if not self.group_sizes or min(self.group_sizes) < 2:
            raise ValueError(f'group sizes {self.group_sizes} must be 2 or more views')
        if self.depth_scale not in ('median', 'none'):
            raise ValueError(f"depth scale {self.depth_scale!r} must be 'median' or 'none'")
        if self.group_gap < 1 or self.gt_pixel_stride < 1 or self.locate_radius_m <= 0:
            raise ValueError('group gap and pixel stride must be >= 1, the locate radius > 0')
        return self


@dataclass
class EvalOutcome:
    """`results` is JSON-ready (every figure and the configuration); `plots` holds arrays."""

    results: dict
    plots: dict = field(default_factory=dict)


class Evaluator:
    """Runs the protocol of the module docstring on one bag."""

    def __init__(self, cfg: PerceptionConfig, model: LoadedModel,
                 options: EvalOptions = EvalOptions()) -> None:
        self.cfg = cfg.validate()
        self.model = model
        self.opt = options.validate()
        self._self_depth: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------------------------ entry
    def evaluate(self, bag: BagData) -> EvalOutcome:
        t0 = time.perf_counter()
        skipped: dict[str, str] = {}
        out: dict = {'notes': list(bag.notes)}
        plots: dict = {}
        names = self._class_names(bag)
        has_pose, has_depth = bag.has('T_WC'), bag.has('depth')
        has_sem = bag.has('semantic')
        posed = self.cfg.frames.pose_source == 'tf'
        if posed and not all(f.camera.T_WC is not None for f in bag.frames):
            missing = sum(f.camera.T_WC is None for f in bag.frames)
            out['notes'].append(f'posed mode: {missing} frames have no TF pose '
                                f'{self.cfg.frames.map_frame} <- camera; they are skipped')

        pipeline, steps, wall = self._run_sequence(bag.frames, posed)
        out['sequence'] = self._sequence_stats(bag, steps, wall, pipeline)
        plots['latency_total_ms'] = [s.latency.total for s in steps]

        if has_pose:
            out['pose'] = self._pose(bag.frames, steps, plots)
        else:
            skipped['pose'] = 'the bag has no ground-truth camera poses (/gt/pose)'
        if has_depth:
            out['depth'] = self._depth(bag.frames)
        else:
            skipped['depth'] = 'the bag has no ground-truth depth'

        map_ok = has_pose and has_depth and has_sem and bool(names)
        if not map_ok:
            why = ('Map and Locate needs ground-truth depth, poses, semantic labels and a label '
                   'map; missing: ' + ', '.join(
                       n for n, ok in (('depth', has_depth), ('poses', has_pose),
                                       ('semantic labels', has_sem), ('label map', bool(names)))
                       if not ok))
            skipped['map_and_locate_groups'] = why
            skipped['sequence_map'] = why
            skipped['locate'] = why
        else:
            try:
                align = self._align_sequence(bag.frames, steps, posed)
            except ValueError as err:  # e.g. a barely trained model predicting no valid depth
                align = None
                skipped['sequence_map'] = f'the map could not be aligned to the world: {err}'
            else:
                if align is None:
                    skipped['sequence_map'] = 'no keyframe was made: nothing to align and score'
            if align is None:
                skipped['locate'] = skipped['sequence_map']
            else:
                out['alignment'] = {'scale': align.s, 'view_stamp_ns': self._align_stamp,
                                    'protocol': 'one ground-truth image (first keyframe): its '
                                    'pose' + (' and depth' if not posed else '')}
                out['sequence_map'], plots['map'] = self._map_metrics(
                    pipeline, align, self._gt_frames(bag.frames), names)
                if has_pose:
                    self._trajectory_plot(bag.frames, steps, align, plots)
                inst_ok = bag.has('instance')
                if inst_ok:
                    out['locate'] = self._locate(bag, pipeline, align, names)
                else:
                    skipped['locate'] = 'the bag has no ground-truth instance images'
            out['map_and_locate_groups'] = self._groups(bag.frames, names, out['notes'])
        out['skipped'] = skipped
        out['eval_seconds'] = time.perf_counter() - t0
        out['configuration'] = self._configuration(bag)
        return EvalOutcome(out, plots)

    # ------------------------------------------------------------------------- sequence
    def _new_pipeline(self, cfg: PerceptionConfig) -> Pipeline:
        return Pipeline(cfg, self.model.backend, self.model.text_encoder)

    def _run_sequence(self, frames: list[BagFrame], posed: bool
                      ) -> tuple[Pipeline, list[StepResult], float]:
        pipeline = self._new_pipeline(self.cfg)
        steps = []
        t = time.perf_counter()
        for f in tqdm(frames, desc='pipeline', unit='frame', disable=not self.opt.progress):
            cam = f.camera if posed else replace(f.camera, T_WC=None)
            steps.append(pipeline.step(cam))
        return pipeline, steps, time.perf_counter() - t

    def _sequence_stats(self, bag: BagData, steps: list[StepResult], wall: float,
                        pipeline: Pipeline) -> dict:
        n = len(steps)
        kf = sum(s.is_keyframe for s in steps)
        skipped = [s for s in steps if s.status == StepStatus.SKIPPED]
        span_s = (bag.frames[-1].camera.stamp_ns - bag.frames[0].camera.stamp_ns) / 1e9
        lat = {}
        ran = [s.latency.ran() for s in steps]
        for stage in StepLatency.stages():
            vals = np.array([r[stage] for r in ran if stage in r])
            if len(vals):
                lat[stage] = {'mean': float(vals.mean()), 'median': float(np.median(vals)),
                              'p95': float(np.percentile(vals, 95)), 'max': float(vals.max()),
                              'frames': int(len(vals))}
        kf_lat = np.array([s.latency.total for s in steps if s.is_keyframe])
        snap = pipeline.snapshot()
        feature_bytes = snap.n_voxels * (snap.clip_dim + snap.dino_dim) * 2  # fp16 features
        mem = {'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
               'map_voxels': int(snap.n_voxels),
               'map_feature_mib': feature_bytes / 2**20}
        torch = sys.modules.get('torch')
        if torch is not None and self.cfg.model.device == 'cuda' and torch.cuda.is_available():
            mem['cuda_peak_mib'] = torch.cuda.max_memory_allocated() / 2**20
        return {
            'frames': n, 'keyframes': kf,
            'tracked': sum(s.status == StepStatus.TRACKED for s in steps),
            'skipped': len(skipped),
            'skip_reasons': sorted({s.reason.split(';')[0][:120] for s in skipped}),
            'keyframe_rate': kf / n if n else 0.0,
            'keyframes_per_second_of_data': kf / span_s if span_s > 0 else None,
            'wall_seconds': wall, 'frames_per_second': n / wall if wall > 0 else None,
            'latency_ms': lat,
            'keyframe_total_latency_ms': ({'mean': float(kf_lat.mean()),
                                           'p95': float(np.percentile(kf_lat, 95))}
                                          if len(kf_lat) else None),
            'memory': mem,
            'memory_note': 'peak_rss_mib is the whole evaluation process (bag in memory too)',
        }

    # ----------------------------------------------------------------------------- pose
    def _pose(self, frames: list[BagFrame], steps: list[StepResult], plots: dict) -> dict:
        idx = [i for i, s in enumerate(steps) if s.T_WC is not None]
        res: dict = {'frames_with_pose': len(idx), 'frames': len(steps),
                     'protocol': 'all pairs of frames the pipeline placed (tracked and '
                     'keyframes); relative pose of each pair; translation angle is scale-free'}
        if len(idx) < 2:
            res['error'] = 'fewer than two frames were placed; no pair to score'
            return res
        e_rot, e_tr = metrics.relative_pose_errors(
            [steps[i].T_WC for i in idx], [frames[i].truth.T_WC for i in idx],
            self.opt.max_pose_pairs)
        res.update(metrics.pose_accuracy(e_rot, e_tr))
        plots['pose_errors'] = (e_rot, e_tr)
        return res

    def _trajectory_plot(self, frames, steps, align: metrics.Similarity3, plots: dict) -> None:
        idx = [i for i, s in enumerate(steps) if s.T_WC is not None]
        P = np.array([align.pose(steps[i].T_WC)[:3, 3] for i in idx])
        G = np.array([f.truth.T_WC[:3, 3] for f in frames])
        plots['trajectory'] = {'pred': P, 'gt': G,
                               'keyframe': np.array([steps[i].is_keyframe for i in idx])}
        if len(idx) >= 3:
            try:
                plots['ate_m'] = metrics.trajectory_ate(P, G[idx])
            except ValueError:
                pass

    # ---------------------------------------------------------------------------- depth
    def _self_pair_depth(self, frame: BagFrame) -> np.ndarray:
        """(H, W) depth of the backend's pointmap of the frame paired with itself."""
        stamp = frame.camera.stamp_ns
        if stamp not in self._self_depth:
            b = self.model.backend
            tokens = b.encode(replace(frame.camera, T_WC=None))
            self._self_depth[stamp] = np.asarray(b.decode(tokens, tokens).view1.X[..., 2])
        return self._self_depth[stamp]

    def _gt_depth_at_network(self, frame: BagFrame, hw: tuple[int, int]) -> np.ndarray:
        return resample_to_network(frame.truth.depth, hw)

    def _depth(self, frames: list[BagFrame]) -> dict:
        pick = np.unique(np.linspace(0, len(frames) - 1, min(self.opt.depth_frames,
                                                             len(frames))).round().astype(int))
        per_image = []
        for i in tqdm(pick, desc='depth', unit='frame', disable=not self.opt.progress):
            try:
                pred = self._self_pair_depth(frames[i])
            except ValueError as err:
                log.warning('depth of frame %d not evaluated: %s', i, err)
                continue
            e = metrics.depth_errors(pred, self._gt_depth_at_network(frames[i], pred.shape),
                                     self.opt.depth_scale)
            if e is not None:
                per_image.append(e)
        if not per_image:
            return {'error': 'no frame had both a prediction and a valid ground-truth depth'}
        return {'AbsRel': float(np.mean([e['AbsRel'] for e in per_image])),
                'delta<1.25': float(np.mean([e['delta<1.25'] for e in per_image])),
                'images': len(per_image),
                'scale_protocol': ('per-image median scaling: prediction x median(gt) / '
                                   'median(pred) before the errors (scale-invariant)'
                                   if self.opt.depth_scale == 'median' else
                                   'none: predictions compared in metres as they are'),
                'protocol': "single frame, the backend's pointmap of the frame paired with "
                            'itself, at the network resolution (ground truth resampled to it); '
                            'metrics averaged over images'}

    # ------------------------------------------------------------------------ alignment
    def _align_sequence(self, frames, steps, posed: bool) -> metrics.Similarity3 | None:
        first = next((i for i, s in enumerate(steps) if s.is_keyframe), None)
        if first is None:
            return None
        self._align_stamp = frames[first].camera.stamp_ns
        return self._align(frames[first], steps[first].T_WC, with_scale=not posed)

    def _align(self, frame: BagFrame, T_MC: np.ndarray, with_scale: bool) -> metrics.Similarity3:
        pred = self._self_pair_depth(frame)
        gt = self._gt_depth_at_network(frame, pred.shape)
        return metrics.one_view_alignment(frame.truth.T_WC, T_MC, gt, pred, with_scale)

    # ------------------------------------------------------------------------ semantics
    def _class_names(self, bag: BagData) -> dict[int, str]:
        return {k: v for k, v in bag.label_map.items() if k != metrics.VOID}

    def _gt_frames(self, frames: list[BagFrame]) -> list[BagFrame]:
        if len(frames) <= self.opt.max_gt_frames:
            return frames
        pick = np.linspace(0, len(frames) - 1, self.opt.max_gt_frames).round().astype(int)
        return [frames[i] for i in np.unique(pick)]

    def _gt_points(self, frames: list[BagFrame], with_instance: bool = False):
        """World points, class ids (and instance ids) of labelled ground-truth pixels."""
        s = self.opt.gt_pixel_stride
        Xs, Ls, Is = [], [], []
        for f in frames:
            t = f.truth
            d = t.depth[::s, ::s]
            lab = t.semantic[::s, ::s]
            K = f.camera.K if f.camera.K is not None else None
            if K is None:
                raise ValueError('ground-truth points need the camera intrinsics; the bag has '
                                 'no CameraInfo')
            v, u = np.mgrid[0:t.depth.shape[0]:s, 0:t.depth.shape[1]:s]
            ok = np.isfinite(d) & (d > 0) & (lab != metrics.VOID)
            z = d[ok]
            Xc = np.stack([(u[ok] - K[0, 2]) / K[0, 0] * z, (v[ok] - K[1, 2]) / K[1, 1] * z, z],
                          -1)
            Xs.append(Xc @ t.T_WC[:3, :3].T + t.T_WC[:3, 3])
            Ls.append(lab[ok])
            if with_instance:
                Is.append(t.instance[::s, ::s][ok])
        X, L = np.concatenate(Xs), np.concatenate(Ls)
        return (X, L, np.concatenate(Is)) if with_instance else (X, L)

    def _voxel_labels(self, snap, names: dict[int, str], pipeline: Pipeline) -> np.ndarray:
        """(N,) class id of each voxel by cosine with the class embeddings, -1 without feature
        (the same labelling as the node's map cloud: Pipeline.label_map)."""
        ids = np.array(sorted(names))
        idx, _ = pipeline.label_map([names[i] for i in ids], snap)
        return np.where(idx >= 0, ids[np.maximum(idx, 0)], -1)

    def _map_metrics(self, pipeline: Pipeline, align: metrics.Similarity3,
                     frames: list[BagFrame], names: dict[int, str]) -> tuple[dict, dict]:
        snap = pipeline.snapshot()
        if snap.empty:
            return {'error': 'the map is empty'}, {}
        P = align.points(snap.positions)
        labels = self._voxel_labels(snap, names, pipeline)
        gt_X, gt_L = self._gt_points(frames)
        res = metrics.map_and_locate(P, labels, gt_X, gt_L, names)
        res['predicted_points'] = 'map voxels (aligned), labelled by nearest class embedding'
        return res, {'points': P, 'labels': labels, 'names': names}

    # --------------------------------------------------------------------------- groups
    def _overlap(self, a: BagFrame, b: BagFrame) -> float:
        """Share of b's valid ground-truth pixels (sampled) that camera a sees."""
        s = 8
        tb, ta = b.truth, a.truth
        d = tb.depth[::s, ::s]
        v, u = np.mgrid[0:tb.depth.shape[0]:s, 0:tb.depth.shape[1]:s]
        ok = np.isfinite(d) & (d > 0)
        if not ok.any() or a.camera.K is None or b.camera.K is None:
            return 0.0
        Kb, Ka = b.camera.K, a.camera.K
        z = d[ok]
        Xb = np.stack([(u[ok] - Kb[0, 2]) / Kb[0, 0] * z, (v[ok] - Kb[1, 2]) / Kb[1, 1] * z, z],
                      -1)
        T_ab = np.linalg.inv(ta.T_WC) @ tb.T_WC
        Xa = Xb @ T_ab[:3, :3].T + T_ab[:3, 3]
        za = Xa[:, 2]
        with np.errstate(divide='ignore', invalid='ignore'):
            ua = np.round(Ka[0, 0] * Xa[:, 0] / za + Ka[0, 2]).astype(np.int64)
            va = np.round(Ka[1, 1] * Xa[:, 1] / za + Ka[1, 2]).astype(np.int64)
        H, W = ta.depth.shape
        inside = (za > 0.05) & (ua >= 0) & (ua < W) & (va >= 0) & (va < H)
        da = ta.depth[np.clip(va, 0, H - 1), np.clip(ua, 0, W - 1)]
        seen = inside & np.isfinite(da) & (np.abs(da - za) < 0.05 * za + 0.02)
        return float(seen.mean())

    def _group_ok(self, group: list[BagFrame]) -> bool:
        return all(max(self._overlap(o, f) for o in group if o is not f)
                   >= self.opt.min_group_overlap for f in group)

    def _choose_groups(self, frames: list[BagFrame], n: int) -> list[list[int]]:
        groups = []
        N = len(frames)
        for g in range(self.opt.groups_per_size):
            for gap in range(self.opt.group_gap, 0, -1):
                span = (n - 1) * gap
                if span >= N:
                    continue
                starts = np.linspace(0, N - 1 - span, self.opt.groups_per_size).round()
                idx = [int(starts[g]) + k * gap for k in range(n)]
                if idx not in groups and self._group_ok([frames[i] for i in idx]):
                    groups.append(idx)
                    break
        return groups

    def _groups(self, frames: list[BagFrame], names: dict[int, str], notes: list[str]) -> dict:
        cfg = replace(self.cfg, frames=replace(self.cfg.frames, pose_source='none'),
                      keyframes=replace(self.cfg.keyframes, min_overlap=1.0, window_size=max(
                          self.cfg.keyframes.window_size, max(self.opt.group_sizes))))
        out: dict = {'protocol': 'SAB3R §4: groups of overlapping views mapped from images only '
                     '(no intrinsics or poses; every view forced to be a keyframe by '
                     "keyframes.min_overlap=1), aligned with the first view's ground-truth pose "
                     'and depth; Comp = distance from each predicted point to the nearest '
                     'ground-truth point of the same label (m, lower is better)'}
        for n in self.opt.group_sizes:
            groups = self._choose_groups(frames, n)
            if len(groups) < self.opt.groups_per_size:
                notes.append(f'{n}-view groups: only {len(groups)} of '
                             f'{self.opt.groups_per_size} could be formed from overlapping views')
            results = []
            for idx in tqdm(groups, desc=f'{n}-view groups', disable=not self.opt.progress):
                results.append(self._one_group(cfg, [frames[i] for i in idx], idx, names))
            scored = [r for r in results if 'mIoU' in r]
            summary: dict = {'groups': results}
            for key in ('mIoU', 'Acc', 'Comp', 'Median Comp', 'time_s'):
                vals = [r[key] for r in scored if r.get(key) is not None]
                summary[key] = float(np.mean(vals)) if vals else None
            out[f'{n}_views'] = summary
        return out

    def _one_group(self, cfg: PerceptionConfig, group: list[BagFrame], idx: list[int],
                   names: dict[int, str]) -> dict:
        pipeline = self._new_pipeline(cfg)
        t = time.perf_counter()
        steps = [pipeline.step(replace(f.camera, K=None, T_WC=None)) for f in group]
        elapsed = time.perf_counter() - t
        res: dict = {'frames': idx, 'stamps_ns': [f.camera.stamp_ns for f in group],
                     'views_mapped': sum(s.is_keyframe for s in steps), 'time_s': elapsed}
        first = next((i for i, s in enumerate(steps) if s.is_keyframe), None)
        if first is None:
            res['error'] = 'no view was mapped: ' + '; '.join(s.reason for s in steps)
            return res
        try:
            align = self._align(group[first], steps[first].T_WC, with_scale=True)
        except ValueError as err:
            res['error'] = str(err)
            return res
        m, _ = self._map_metrics(pipeline, align, group, names)
        res.update({k: v for k, v in m.items() if k != 'predicted_points'})
        return res

    # --------------------------------------------------------------------------- locate
    def _instances(self, frames: list[BagFrame], names: dict[int, str]
                   ) -> list[metrics.InstanceTruth]:
        X, L, inst = self._gt_points(self._gt_frames(frames), with_instance=True)
        out = []
        min_pts = self.opt.min_instance_pixels / self.opt.gt_pixel_stride ** 2
        v = self.opt.gt_voxel_m
        for iid in np.unique(inst):
            sel = inst == iid
            if iid == 0 or sel.sum() < min_pts:
                continue
            label = names.get(int(np.bincount(L[sel]).argmax()), '')
            if not label or label in self.opt.locate_exclude:
                continue
            P = X[sel]
            _, inv = np.unique(np.floor(P / v).astype(np.int64), axis=0, return_inverse=True)
            inv = inv.reshape(-1)
            cnt = np.bincount(inv)
            centres = np.stack([np.bincount(inv, P[:, k]) for k in range(3)], 1) / cnt[:, None]
            out.append(metrics.InstanceTruth(
                int(iid), label, centres, centres.mean(0),
                fit_box(centres, np.asarray(self.opt.gt_gravity, float), min_size=v)))
        return out

    def _locate(self, bag: BagData, pipeline: Pipeline, align: metrics.Similarity3,
                names: dict[int, str]) -> dict:
        instances = self._instances(bag.frames, names)
        present = sorted({g.label for g in instances})
        seen_ids = set()
        for f in bag.frames:
            seen_ids.update(np.unique(f.truth.semantic).tolist())
        absent = [names[i] for i in sorted(names) if i not in seen_ids
                  and names[i] not in self.opt.locate_exclude][:self.opt.absent_queries]
        queries = present + absent
        if not queries:
            return {'error': 'no object instance large enough to be a Locate target'}
        # All instances (top_k 100): the first answer of a query is its best; the FOUND ones are
        # matched to ground-truth instances for 'one FOUND instance per object'.
        result = pipeline.locate(LocateQuery(queries=tuple(queries), top_k=100))
        best: dict[str, object] = {}
        for obj in result.objects:
            best.setdefault(obj.query, obj)
        per_object = self._found_per_object(result.objects, instances, present, align)
        per_query = []
        for q in queries:
            obj = best.get(q)
            found = obj is not None and obj.status != LocateStatus.NOT_FOUND
            c = align.points(obj.centroid[None])[0] if found and obj.centroid is not None else None
            box = align.box(obj.box) if found and obj.box is not None else None
            r = metrics.locate_outcome(q, c, box, instances, self.opt.locate_radius_m)
            r['status'] = obj.status if obj is not None else 'NO_ANSWER'
            r['score'] = float(obj.score) if obj is not None else 0.0
            r['reason'] = getattr(obj, 'reason', '') if obj is not None else ''
            per_query.append(r)
        pres = [r for r in per_query if r['present']]
        abs_ = [r for r in per_query if not r['present']]
        return {
            'success_rate': 100.0 * float(np.mean([r['success'] for r in pres])) if pres else None,
            'mean_box_iou': float(np.mean([r['box_iou'] for r in pres])) if pres else None,
            'not_found_accuracy': (100.0 * float(np.mean([r['correct'] for r in abs_]))
                                   if abs_ else None),
            'one_found_per_object': per_object['rate'],
            'objects': per_object['objects'],
            'radius_m': self.opt.locate_radius_m, 'queries': per_query,
            'protocol': 'one query per object class seen in the ground truth (structural and '
                        'catch-all classes excluded) plus absent classes; top answer; success = '
                        'centroid within radius of a ground-truth instance of the class; box IoU '
                        "with that instance's upright box; absent classes must be NOT_FOUND; "
                        'one_found_per_object: % of ground-truth instances with exactly one '
                        'FOUND answer of their class nearest to them (within the radius), and '
                        'no FOUND answer of that class near nothing',
        }

    def _found_per_object(self, objects, instances: list[metrics.InstanceTruth],
                          present: list[str], align: metrics.Similarity3) -> dict:
        """Each FOUND answer goes to the nearest ground-truth instance of its class within
        the radius (else it is spurious); an object is right with exactly one answer and its
        class has no spurious one."""
        hits: dict[int, int] = {g.instance_id: 0 for g in instances}
        spurious: dict[str, int] = {q: 0 for q in present}
        for obj in objects:
            if obj.status != LocateStatus.FOUND or obj.query not in spurious:
                continue
            c = align.points(obj.centroid[None])[0]
            same = [g for g in instances if g.label == obj.query]
            d = [float(np.linalg.norm(g.centroid - c)) for g in same]
            if d and min(d) <= self.opt.locate_radius_m:
                hits[same[int(np.argmin(d))].instance_id] += 1
            else:
                spurious[obj.query] += 1
        rows = [{'instance_id': g.instance_id, 'label': g.label,
                 'found_answers': hits[g.instance_id], 'spurious_of_class': spurious[g.label]}
                for g in instances]
        ok = [r['found_answers'] == 1 and r['spurious_of_class'] == 0 for r in rows]
        return {'rate': 100.0 * float(np.mean(ok)) if ok else None, 'objects': rows}

    # ----------------------------------------------------------------------- provenance
    def _configuration(self, bag: BagData) -> dict:
        return {
            'parameters': {name: (list(v) if isinstance(v, tuple) else v)
                           for name, v, _ in iter_params(self.cfg)},
            'backend': self.model.description,
            'options': {k: (list(v) if isinstance(v, tuple) else v)
                        for k, v in asdict(self.opt).items()},
            'bag': {'path': str(bag.path), 'storage': bag.storage, 'frames': len(bag.frames),
                    'topics': bag.topics, 'info': bag.info,
                    'ground_truth': {p: bag.has(p) for p in ('depth', 'semantic', 'instance',
                                                             'T_WC')}},
        }
