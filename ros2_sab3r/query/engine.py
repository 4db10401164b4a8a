"""Locate: open-vocabulary object queries against a map snapshot.

text -> embedding (the TextEncoder applies its prompting; results are cached here)
     -> cosine similarity of every voxel's fused CLIP feature with the query (both unit norm)
     -> relevancy in [0, 1], by the request's relevancy_mode (default query.relevancy_mode):
        'lerf': LERF-style, min over negatives of softmax([q, neg] / temperature)[q]; a voxel
                belongs to the query at min_score (query.default_min_score) and must also pass
                the membership cut of :meth:`QueryEngine._members`;
        'official': the SAB3R demo's scoring, see :func:`official_relevancy` (negatives unused);
                a voxel belongs to the query at max(p, min_score) (query.official_threshold)
     -> member voxels -> instances by voxel adjacency (26-neighbourhood), with edges between
        voxels of dissimilar DINO features cut when DINO features exist
     -> oriented boxes (upright when gravity is known, PCA otherwise) -> ranked objects.

"Not found" is an answer: a query with no instance of at least query.min_instance_voxels
connected member voxels returns one NOT_FOUND entry, never a best guess. In 'official' mode
min-max normalisation puts the map's most similar voxel at 1, so some voxels are members on any
map whose similarities are not all equal, even for an absent object: there NOT_FOUND rests on
those voxels not forming a group of query.min_instance_voxels (and a weak query whose best
voxels are scattered is more often found than in 'lerf' mode).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
import logging
import threading

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from ros2_sab3r.config import RELEVANCY_MODES, QueryConfig
from ros2_sab3r.geometry.boxes import fit_box
from ros2_sab3r.geometry.gravity import estimate_gravity
from ros2_sab3r.mapping.kernels import warm_up as warm_up_kernels
from ros2_sab3r.mapping.keys import key_offset
from ros2_sab3r.mapping.snapshot import BlockMaxCache, MapSnapshot
from ros2_sab3r.types import (
    LocatedObject,
    LocateQuery,
    LocateResult,
    LocateStatus,
    TextEncoder,
)

log = logging.getLogger(__name__)

# Half of the 26-neighbourhood: each undirected adjacency is found once.
_NEIGHBOUR_OFFSETS = np.array([
    key_offset(di, dj, dk) for di in (-1, 0, 1) for dj in (-1, 0, 1) for dk in (-1, 0, 1)
    if (di, dj, dk) > (0, 0, 0)], dtype=np.int64)


class LocateError(ValueError):
    """A Locate request that cannot be answered (bad input, empty map); the message says why."""


class BadLocateRequest(LocateError):
    """The request itself is malformed (empty text, a field out of range, ...)."""


class EmptyMapError(LocateError):
    """The map holds no voxel yet: nothing to answer from."""


def validate_query(query: LocateQuery, config: QueryConfig) -> LocateQuery:
    """Check a Locate request; returns it with whitespace-normalised strings.

    Raises BadLocateRequest naming the field and the fix. QueryEngine.locate validates every
    request it answers; the node calls this only when it has no engine to ask.
    """
    cfg = config

    def clean(values, what: str) -> tuple[str, ...]:
        if isinstance(values, str) or not isinstance(values, (list, tuple)):
            raise BadLocateRequest(
                f'{what} must be a list of strings, got {type(values).__name__}')
        out = []
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise BadLocateRequest(f'{what}[{i}] must be a string, got {type(v).__name__}')
            try:
                v.encode('utf-8')
            except UnicodeEncodeError as exc:
                raise BadLocateRequest(f'{what}[{i}] is not valid UTF-8 text: {exc}') from None
            v = ' '.join(v.split())
            if not v:
                raise BadLocateRequest(f'{what}[{i}] is empty; give a word or phrase')
            if len(v) > cfg.max_query_chars:
                raise BadLocateRequest(
                    f'{what}[{i}] has {len(v)} characters, more than query.max_query_chars='
                    f'{cfg.max_query_chars}')
            out.append(v)
        return tuple(out)

    queries = clean(query.queries, 'queries')
    if not queries:
        raise BadLocateRequest('no queries given; ask for at least one thing, e.g. ["chair"]')
    if len(queries) > cfg.max_queries:
        raise BadLocateRequest(f'{len(queries)} queries in one request, more than '
                                 f'query.max_queries={cfg.max_queries}; split the request')
    negatives = clean(query.negatives, 'negatives')
    if len(negatives) > cfg.max_queries:
        raise BadLocateRequest(f'{len(negatives)} negatives, more than query.max_queries='
                                 f'{cfg.max_queries}')
    if not isinstance(query.relevancy_mode, str):
        raise BadLocateRequest(f'relevancy_mode must be a string, got '
                                 f'{type(query.relevancy_mode).__name__}')
    mode = query.relevancy_mode.strip().lower()
    if mode and mode not in RELEVANCY_MODES:
        raise BadLocateRequest(
            f'relevancy_mode={query.relevancy_mode!r} is not one of '
            f'{", ".join(repr(m) for m in RELEVANCY_MODES)}; leave it empty for the node '
            f'default (query.relevancy_mode={cfg.relevancy_mode!r})')
    labels = tuple(query.labels)
    if labels and len(labels) != len(queries):
        raise BadLocateRequest(f'labels has {len(labels)} entries for {len(queries)} queries; '
                               'give one per query or none')
    if not isinstance(query.top_k, (int, np.integer)) or not 0 <= query.top_k <= 1000:
        raise BadLocateRequest(f'top_k={query.top_k!r} must be an integer in [0, 1000]')
    if not (np.isfinite(query.min_score) and 0.0 <= query.min_score <= 1.0):
        raise BadLocateRequest(f'min_score={query.min_score!r} must be in [0, 1] (0: default)')
    return LocateQuery(queries=queries, negatives=negatives, top_k=int(query.top_k),
                       min_score=float(query.min_score), labels=labels, relevancy_mode=mode)


# The demo's percentile of the raw cosines (its UI passes 0.9 to a 0-100 percentile function).
OFFICIAL_PERCENTILE = 0.9


def official_relevancy(s_q: np.ndarray, has_feature: np.ndarray, threshold: float
                       ) -> tuple[np.ndarray, float]:
    """The SAB3R demo's scoring of one query: (relevancy (N,) float32, cut).

    s_q (N,): cosine of each voxel's CLIP feature with the text vector (both L2-normalised).
    relevancy: s_q min-max normalised over the voxels that have a feature, (s - min) /
    (max - min) in [0, 1]; 0 for voxels without one, and everywhere when all similarities
    are equal (nothing to tell apart). cut: a voxel is selected at relevancy >= cut, with
    cut = max(p, threshold) and p the OFFICIAL_PERCENTILE-th percentile (0-100 scale) of the
    raw cosines, as the demo computes it (it compares that raw cosine with a normalised score;
    p is below the threshold unless nearly every voxel is very similar to the text).
    """
    relevancy = np.zeros(s_q.shape, np.float32)
    values = s_q[has_feature].astype(np.float64)
    if not len(values):
        return relevancy, float(threshold)
    lo, hi = float(values.min()), float(values.max())
    cut = max(float(np.percentile(values, OFFICIAL_PERCENTILE)), float(threshold))
    if hi - lo > 0.0:
        relevancy[has_feature] = ((values - lo) / (hi - lo)).astype(np.float32)
    return relevancy, cut


# Above this many voxels the map's typical similarity (_members) is the median of an evenly
# strided sample of at least half as many: at 1M voxels the exact median took 14 ms of a 20 ms
# Locate; the sample's median differs by ~1e-3 of the similarities' spread (its standard error,
# 1.25 / sqrt(n) of it). Smaller maps (every test scene) take the exact median.
EXACT_MEDIAN_VOXELS = 1 << 17


def _sample(s: np.ndarray) -> np.ndarray:
    """s; above EXACT_MEDIAN_VOXELS values an evenly strided sample of at least half as many."""
    if len(s) > EXACT_MEDIAN_VOXELS:
        s = s[::len(s) // (EXACT_MEDIAN_VOXELS // 2)]
    return s


def _typical(s: np.ndarray) -> float:
    """The median of s (of :func:`_sample` of it)."""
    return float(np.median(_sample(s)))


class QueryEngine:
    """Answers LocateQuery requests on MapSnapshots. Thread-safe; keeps a text-embedding cache."""

    def __init__(self, cfg: QueryConfig, text_encoder: TextEncoder) -> None:
        self.cfg = cfg
        self.text_encoder = text_encoder
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._negatives_cache = BlockMaxCache()  # the canonical negatives' per-block maxima
        warm_up_kernels()  # compiled (or loaded from numba's cache) now, not at the first query

    # --------------------------------------------------------------------------- embeddings
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(N, F) float32 unit embeddings, from the cache where possible (one encoder call)."""
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            E = np.asarray(self.text_encoder.encode(missing), dtype=np.float32)
            if E.shape != (len(missing), self.text_encoder.dim) or not np.isfinite(E).all():
                raise LocateError(
                    f'text encoder returned {E.shape} (finite: {bool(np.isfinite(E).all())}) for '
                    f'{len(missing)} texts; expected ({len(missing)}, {self.text_encoder.dim})')
            E /= np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12)
            with self._lock:
                for t, e in zip(missing, E):
                    self._cache[t] = e
                    self._cache.move_to_end(t)
                fresh = {t: e for t, e in zip(missing, E)}
                while len(self._cache) > self.cfg.embedding_cache_size:
                    self._cache.popitem(last=False)
        else:
            fresh = {}
        with self._lock:
            return np.stack([fresh[t] if t in fresh else self._cache[t] for t in texts])

    # ----------------------------------------------------------------------------- validate
    def validate(self, query: LocateQuery) -> LocateQuery:
        """Check a request against this engine's config (see :func:`validate_query`)."""
        return validate_query(query, self.cfg)

    # ------------------------------------------------------------------------------- locate
    def locate(self, snapshot: MapSnapshot, query: LocateQuery) -> LocateResult:
        """Answer a request on one snapshot (see the module docstring)."""
        q = self.validate(query)
        if snapshot.empty:
            raise EmptyMapError('the map is empty: no keyframe has been fused yet (or it was '
                                'reset); wait for the camera to move or load a map')
        if not snapshot.clip_dim:
            raise LocateError('the map has no semantic features: the backend provides no CLIP '
                              'features, so it cannot be queried by text')
        cfg = self.cfg
        mode = q.relevancy_mode or cfg.relevancy_mode
        if mode == 'calibrated':
            return self._locate_calibrated(snapshot, q)
        official = mode == 'official'
        top_k = q.top_k or cfg.default_top_k
        min_score = q.min_score or (cfg.official_threshold if official else
                                    cfg.default_min_score)
        negatives = [] if official else list(
            dict.fromkeys(tuple(cfg.canonical_negatives) + q.negatives))
        # Only the largest similarity over the negatives counts (_relevancy). The canonical
        # negatives' is the same for every query that is not one of them: it comes from the
        # per-block cache (a map that changed in a few blocks recomputes those), and the pass
        # over every voxel is for the queries and the request's own negatives.
        canonical = [] if official or set(q.queries) & set(cfg.canonical_negatives) else list(
            dict.fromkeys(cfg.canonical_negatives))
        negatives = [n for n in negatives if n not in canonical]
        texts = list(dict.fromkeys(q.queries)) + [n for n in negatives if n not in q.queries]
        E = self.embed(texts)
        sims = snapshot.cosine(E, threads=cfg.threads)  # (T, N)
        canonical_max = None if not canonical else snapshot.cosine_max(
            self.embed(canonical), self._negatives_cache, threads=cfg.threads)  # (N,)
        has_feature = snapshot.clip_weights > 0
        col = {t: i for i, t in enumerate(texts)}
        objects: list[LocatedObject] = []
        best = np.zeros(snapshot.n_voxels, dtype=np.float32)  # (N,) max relevancy over queries
        for i, text in enumerate(q.queries):
            label = q.labels[i] if q.labels else text
            s_q = sims[col[text]]
            if official:
                relevancy, cut = official_relevancy(s_q, has_feature, min_score)
                member = has_feature & (relevancy >= cut)
            else:
                neg_rows = [col[n] for n in negatives if n != text]
                relevancy = self._relevancy(s_q, sims, neg_rows, canonical_max)
                # 0 where no feature was fused: relevancy is finite, so a product with the mask
                # (one pass, 0.3 ms on 1M voxels; the masked assignment took 1.9)
                np.multiply(relevancy, has_feature, out=relevancy)
                cut = min_score
                member = self._members(s_q, relevancy, has_feature, min_score)
            np.maximum(best, relevancy, out=best, casting='unsafe')
            found = self._merge(snapshot, self._instances(snapshot, member))
            objects.extend(self._rank(snapshot, text, label, relevancy, found, top_k, cut))
        n_found = sum(o.status != LocateStatus.NOT_FOUND for o in objects)
        unused = ' (negatives unused in official mode)' if official and q.negatives else ''
        return LocateResult(objects=tuple(objects), map_stamp_ns=snapshot.stamp_ns,
                            frame=snapshot.frame,
                            message=f'{len(q.queries)} queries, {n_found} objects, map of '
                                    f'{snapshot.n_voxels} voxels, {mode} relevancy{unused}',
                            relevancy=best)

    def _relevancy(self, s_q: np.ndarray, sims: np.ndarray, neg_rows: list[int],
                   neg_max: np.ndarray | None = None) -> np.ndarray:
        """(N,) min over negatives (rows of sims (T, N), and those whose per-voxel maximum is
        neg_max) of exp(q/T) / (exp(q/T) + exp(neg/T)).

        The minimum over negatives of that pairwise softmax is the one against the most similar
        negative, so only the max negative similarity is needed.
        """
        if not neg_rows and neg_max is None:
            return np.ones_like(s_q)
        neg = neg_max if neg_max is not None else sims[neg_rows[0]]
        rest = neg_rows if neg_max is not None else neg_rows[1:]
        if rest:
            neg = neg.copy()
            for r in rest:
                np.maximum(neg, sims[r], out=neg)
        margin = np.subtract(neg, s_q)  # -(q - neg): one pass, no copy of neg first
        margin *= 1.0 / self.cfg.temperature
        np.clip(margin, -50, 50, out=margin)
        np.exp(margin, out=margin)  # (scipy's expit, one pass, measured 2.5x slower)
        margin += 1.0
        return np.reciprocal(margin, out=margin)

    def _members(self, s_q: np.ndarray, relevancy: np.ndarray, has_feature: np.ndarray,
                 min_score: float) -> np.ndarray:
        """(N,) bool: voxels that belong to the query.

        Relevancy against the negatives says whether a voxel resembles the query at all; it
        saturates, so a voxel on an object's border whose feature is a mixture of the object and
        the floor also passes. A voxel must therefore also be mostly the query: its similarity
        at least a fraction `membership_fraction` of the way from the map's typical similarity
        (median) to the similarity of the query's clearest voxels (95th percentile of the
        relevant ones). The cut adapts to the model's similarity range (raw CLIP cosines are
        compressed, ~0.2-0.3).
        """
        relevant = relevancy >= min_score
        if not relevant.any():
            return relevant
        s_top = float(np.percentile(s_q[relevant], 95))
        s_typ = _typical(s_q[has_feature])
        cut = s_typ + self.cfg.membership_fraction * max(s_top - s_typ, 0.0)
        return relevant & (s_q >= cut)

    def _instances(self, snap: MapSnapshot, member: np.ndarray):
        cand = np.flatnonzero(member)
        if len(cand) < self.cfg.min_instance_voxels:
            return []
        keys = snap.take('keys', cand)
        order = np.argsort(keys)
        keys_sorted = keys[order]
        src, dst = [], []
        for off in _NEIGHBOUR_OFFSETS:
            nb = keys_sorted + off
            at = np.searchsorted(keys_sorted, nb)
            at_c = np.minimum(at, len(keys_sorted) - 1)
            hit = keys_sorted[at_c] == nb
            src.append(np.flatnonzero(hit))
            dst.append(at_c[hit])
        src = np.concatenate(src)
        dst = np.concatenate(dst)
        if snap.dino_dim and len(src):
            Fd = snap.feature_rows('dino', cand[order])
            Fd /= np.maximum(np.linalg.norm(Fd, axis=1, keepdims=True), 1e-12)
            similar = (Fd[src] * Fd[dst]).sum(-1) >= self.cfg.dino_split_similarity
            src, dst = src[similar], dst[similar]
        n = len(keys_sorted)
        graph = coo_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(n, n))
        n_comp, comp = connected_components(graph, directed=False)
        sizes = np.bincount(comp, minlength=n_comp)
        rows_sorted = cand[order]  # flat voxel index of each sorted candidate
        keep = np.flatnonzero(sizes >= self.cfg.min_instance_voxels)
        by_comp = np.argsort(comp, kind='stable')
        cuts = np.cumsum(sizes)[:-1]
        groups = np.split(rows_sorted[by_comp], cuts)
        return [groups[c] for c in keep]

    def _rank(self, snap: MapSnapshot, text: str, label: str, relevancy: np.ndarray,
              instances: list[np.ndarray], top_k: int, min_score: float) -> list[LocatedObject]:
        """Objects of one query, best first, all carrying the query's status."""
        if not instances:
            return [LocatedObject(query=text, label=label, status=LocateStatus.NOT_FOUND,
                                  score=0.0)]
        scores = np.array([float(relevancy[rows].mean()) for rows in instances])
        # Rank by evidence (relevancy summed over voxels): a fragment of a few voxels with a
        # saturated relevancy must not beat the whole object.
        mass = np.array([float(relevancy[rows].sum()) for rows in instances])
        order = np.argsort(-mass, kind='stable')
        best = scores[order[0]]
        margin = self.cfg.ambiguity_margin
        # Ambiguous: barely relevant, or a comparable second instance (at least half the
        # evidence) scoring almost as well, e.g. two chairs for 'the chair'.
        ambiguous = best < min_score + margin or (
            len(order) > 1 and mass[order[1]] >= 0.5 * mass[order[0]]
            and best - scores[order[1]] < margin)
        status = LocateStatus.AMBIGUOUS if ambiguous else LocateStatus.FOUND
        out = []
        for k in order[:top_k]:
            rows = instances[k]
            P = snap.take('pos', rows)  # (n, 3) float32
            # Unweighted: each voxel is a patch of observed surface; fused weights say how often
            # a patch was seen, which would pull the centre towards the most viewed side.
            centroid = P.astype(np.float64).mean(axis=0)
            box = fit_box(P, self.gravity(snap), min_size=snap.voxel_size)
            out.append(LocatedObject(
                query=text, label=label, status=status, score=float(scores[k]),
                centroid=centroid, box=box, points=P,
                colors=np.clip(np.rint(snap.take('color', rows)), 0, 255).astype(np.uint8),
                last_seen_ns=int(snap.take('last_seen', rows).max())))
        return out

    # ------------------------------------------------------------------------ gravity
    def gravity(self, snap: MapSnapshot) -> np.ndarray | None:
        """The map's gravity: known (posed maps), else estimated from the floor plane
        (:func:`estimate_gravity`, cached per map version), else None (PCA boxes)."""
        if snap.gravity is not None or not self.cfg.estimate_gravity or snap.empty:
            return snap.gravity
        key = (snap.version, snap.n_voxels)
        with self._lock:
            cached = getattr(self, '_gravity_cache', None)
        if cached is not None and cached[0] == key:
            return cached[1]
        g = estimate_gravity(snap.positions, inlier_m=max(snap.voxel_size, 0.02))
        with self._lock:
            self._gravity_cache = (key, g)
        return g

    # ------------------------------------------------------------------------ merging
    def _merge(self, snap: MapSnapshot, instances: list[np.ndarray]) -> list[np.ndarray]:
        """Join instances of one query that are one object split in two: closer than
        query.merge_gap_m, with similar mean DINO features (when the map has them)."""
        gap = self.cfg.merge_gap_m
        if gap <= 0 or len(instances) < 2:
            return instances
        n = len(instances)
        P = [snap.take('pos', rows) for rows in instances]
        lo = np.stack([p.min(0) for p in P])  # (n, 3) axis-aligned bounds
        hi = np.stack([p.max(0) for p in P])
        # Pairs whose bounds are within the gap (cheap); only those are checked point-wise.
        apart = np.maximum(lo[:, None] - hi[None], lo[None] - hi[:, None]).max(-1)  # (n, n)
        near = np.argwhere(np.triu(apart <= gap, 1))
        if not len(near):
            return instances
        dino = None
        if snap.dino_dim:
            dino = np.stack([snap.feature_rows('dino', rows).mean(0) for rows in instances])
            dino /= np.maximum(np.linalg.norm(dino, axis=1, keepdims=True), 1e-12)
        parent = list(range(n))
        trees: dict[int, cKDTree] = {}

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for i, j in near:
            if dino is not None and dino[i] @ dino[j] < self.cfg.dino_split_similarity:
                continue
            if root(i) == root(j):
                continue
            if j not in trees:
                trees[j] = cKDTree(P[j])
            d, _ = trees[j].query(P[i], k=1, distance_upper_bound=gap)
            if np.isfinite(d).any():
                parent[root(j)] = root(i)
        groups: dict[int, list[np.ndarray]] = {}
        for i in range(n):
            groups.setdefault(root(i), []).append(instances[i])
        return [np.concatenate(g) for g in groups.values()]

    # ---------------------------------------------------------------------- calibrated
    def _competitors(self, text: str, e_q: np.ndarray, negatives: Sequence[str]
                     ) -> tuple[list[str], np.ndarray]:
        """Vocabulary + canonical negatives + the request's negatives, less the query and its
        near-synonyms (text cosine >= query.synonym_similarity): (words, (K, F) embeddings)."""
        words = [w for w in dict.fromkeys(
            tuple(self.cfg.vocabulary) + tuple(self.cfg.canonical_negatives) + tuple(negatives))
            if w != text]
        if not words:
            return [], np.zeros((0, len(e_q)), np.float32)
        E = self.embed(words)
        keep = E @ e_q < self.cfg.synonym_similarity
        return [w for w, k in zip(words, keep) if k], E[keep]

    def _locate_calibrated(self, snap: MapSnapshot, q: LocateQuery) -> LocateResult:
        """'calibrated' relevancy (see :meth:`_decide`): scale-free FOUND / NOT_FOUND."""
        cfg = self.cfg
        top_k = q.top_k or cfg.default_top_k
        min_score = q.min_score or cfg.calibrated_min_score
        texts = list(dict.fromkeys(q.queries))
        E = self.embed(texts)
        sims = snap.cosine(E, threads=cfg.threads)  # (T, N)
        has_feature = snap.clip_weights > 0
        objects: list[LocatedObject] = []
        best = np.zeros(snap.n_voxels, dtype=np.float32)
        for i, text in enumerate(q.queries):
            label = q.labels[i] if q.labels else text
            t = texts.index(text)
            words, E_c = self._competitors(text, E[t], q.negatives)
            relevancy, instances = self._calibrated_members(snap, sims[t], has_feature, E_c)
            np.maximum(best, relevancy, out=best)
            objects.extend(self._decide(snap, text, label, E[t], words, E_c, instances,
                                        min_score, top_k))
        n_found = sum(o.status == LocateStatus.FOUND for o in objects)
        return LocateResult(objects=tuple(objects), map_stamp_ns=snap.stamp_ns, frame=snap.frame,
                            message=f'{len(q.queries)} queries, {n_found} objects FOUND, map of '
                                    f'{snap.n_voxels} voxels, calibrated relevancy',
                            relevancy=best)

    def _calibrated_members(self, snap: MapSnapshot, s_q: np.ndarray, has_feature: np.ndarray,
                            E_c: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """(relevancy (N,), instances): candidate voxels are those whose cosine lies
        query.membership_fraction of the way from the map's median to its clearest voxels
        (scale-free, cheap); a candidate is a member where the query beats every competitor;
        members form instances (adjacency, DINO cuts, merges)."""
        relevancy = np.zeros(snap.n_voxels, np.float32)
        if not has_feature.any():
            return relevancy, []
        # the median and the 99.5th percentile in one partition (of a sample on large maps:
        # the 99.5th percentile of 1M voxels' half is ~2500 voxels deep)
        s_typ, s_top = (float(v) for v in np.quantile(_sample(s_q[has_feature]), [0.5, 0.995]))
        cut = s_typ + self.cfg.membership_fraction * max(s_top - s_typ, 0.0)
        cand = np.flatnonzero(has_feature & (s_q >= cut))
        if not len(cand):
            return relevancy, []
        limit = self.cfg.max_candidate_voxels
        if len(cand) > limit:
            cand = np.sort(cand[np.argpartition(-s_q[cand], limit - 1)[:limit]])
        if len(E_c):
            S_c = snap.cosine_rows(E_c, cand)  # (K, n), in the stored codes' space
            s_c_max = S_c.max(0)
            spread = np.maximum(S_c.std(0), 1e-6)
            margin = (s_q[cand] - s_c_max) / spread  # in standard deviations of the vocabulary
            relevancy[cand] = 1.0 / (1.0 + np.exp(-np.clip(margin, -50, 50)))
            member = np.zeros(snap.n_voxels, bool)
            member[cand[margin > 0]] = True
        else:
            relevancy[cand] = 1.0
            member = np.zeros(snap.n_voxels, bool)
            member[cand] = True
        return relevancy, self._merge(snap, self._instances(snap, member))

    def _decide(self, snap: MapSnapshot, text: str, label: str, e_q: np.ndarray,
                words: list[str], E_c: np.ndarray, instances: list[np.ndarray],
                min_score: float, top_k: int) -> list[LocatedObject]:
        """Per instance: its mean CLIP feature against the query and the competitors.

        z: the query's cosine above the competitors' mean in their standard deviations (must
        reach query.vocabulary_min_z: the instance resembles the query far more than words in
        general); score: 1 / (1 + exp(-m)), m the query's lead over its strongest competitor in
        the same units (0.5: a tie). FOUND at score >= min_score; AMBIGUOUS within
        query.ambiguity_margin below it when z is a full std above query.vocabulary_min_z
        (clearly of the query's kind, a close competitor); otherwise the instance is something
        else and is not returned. Instances smaller than query.min_relative_size of the query's
        largest FOUND instance are dropped as fragments.
        """
        cfg = self.cfg
        decided = []
        best_rejection = None
        for rows in instances:
            f = snap.feature_rows('clip', rows).mean(0)
            f /= max(float(np.linalg.norm(f)), 1e-12)
            s_q = float(f @ e_q)
            if len(E_c):
                s_c = E_c @ f
                spread = max(float(s_c.std()), 1e-6)
                z = (s_q - float(s_c.mean())) / spread
                k = int(np.argmax(s_c))
                lead = (s_q - float(s_c[k])) / spread
                rival = f'{words[k]!r} ({float(s_c[k]):.3f})'
            else:
                z, lead, rival = np.inf, np.inf, 'nothing (empty vocabulary)'
            score = float(1.0 / (1.0 + np.exp(-np.clip(lead, -50, 50))))
            if z >= cfg.vocabulary_min_z and score >= min_score:
                status, why = LocateStatus.FOUND, (
                    f'cosine {s_q:.3f} beats {rival} by {lead:.1f} std; {z:.1f} std above the '
                    'vocabulary')
            elif z >= cfg.vocabulary_min_z + 1 and score >= min_score - cfg.ambiguity_margin:
                status, why = LocateStatus.AMBIGUOUS, (
                    f'cosine {s_q:.3f} is close to {rival} (lead {lead:.1f} std)')
            else:
                why = (f'best candidate ({len(rows)} voxels) is more like {rival} than '
                       f'{text!r} ({s_q:.3f})' if lead < 0 else
                       f'best candidate ({len(rows)} voxels) is only {z:.1f} std above the '
                       f'vocabulary (query.vocabulary_min_z={cfg.vocabulary_min_z:g})')
                if best_rejection is None or len(rows) > best_rejection[0]:
                    best_rejection = (len(rows), why)
                continue
            decided.append((score, len(rows), rows, status, why))
        if not decided:
            why = best_rejection[1] if best_rejection else (
                f'no group of query.min_instance_voxels={cfg.min_instance_voxels} voxels where '
                f'{text!r} beats the vocabulary')
            return [LocatedObject(query=text, label=label, status=LocateStatus.NOT_FOUND,
                                  score=0.0, reason=why)]
        largest = max((d[1] for d in decided if d[3] == LocateStatus.FOUND), default=0)
        decided = [d for d in decided if d[1] >= cfg.min_relative_size * largest]
        # FOUND before AMBIGUOUS, then by size (evidence), then score.
        decided.sort(key=lambda d: (d[3] != LocateStatus.FOUND, -d[1], -d[0]))
        gravity = self.gravity(snap)
        out = []
        for score, _, rows, status, why in decided[:top_k]:
            P = snap.take('pos', rows)
            out.append(LocatedObject(
                query=text, label=label, status=status, score=score,
                centroid=P.astype(np.float64).mean(axis=0),
                box=fit_box(P, gravity, min_size=snap.voxel_size), points=P,
                colors=np.clip(np.rint(snap.take('color', rows)), 0, 255).astype(np.uint8),
                last_seen_ns=int(snap.take('last_seen', rows).max()), reason=why))
        return out
