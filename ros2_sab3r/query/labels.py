"""Closed-set labelling of a semantic map: each voxel gets the label whose text embedding its
CLIP feature is most similar to (for display — the map cloud's label/score fields — and for the
Map-and-Locate evaluation). Open-vocabulary questions go through Locate instead.
"""

from __future__ import annotations

import numpy as np

from ros2_sab3r.mapping.snapshot import MapSnapshot

NO_LABEL = -1


def label_voxels(snapshot: MapSnapshot, E: np.ndarray, temperature: float, threads: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,) int32, scores (N,) float32) for unit label embeddings E (L, F).

    label: row of E with the highest cosine, NO_LABEL for voxels without a CLIP feature (or a
    map without CLIP features at all); score: softmax over the L labels of cosine/temperature at
    that label (1/L when undecided, towards 1 when one label clearly wins), 0 without a label.
    threads: as query.threads (see MapSnapshot.cosine).
    """
    n = snapshot.n_voxels
    labels = np.full(n, NO_LABEL, np.int32)
    scores = np.zeros(n, np.float32)
    E = np.asarray(E, np.float32)
    if not n or not snapshot.clip_dim or not len(E):
        return labels, scores
    if temperature <= 0:
        raise ValueError(f'temperature={temperature} must be positive')
    sims = snapshot.cosine(E, threads)  # (L, N)
    has = snapshot.clip_weights > 0
    best = np.argmax(sims, axis=0)
    z = (sims - sims[best, np.arange(n)]) / temperature  # <= 0, the winner at 0
    p_best = 1.0 / np.exp(z).sum(axis=0)
    labels[has] = best[has]
    scores[has] = p_best[has]
    return labels, scores
