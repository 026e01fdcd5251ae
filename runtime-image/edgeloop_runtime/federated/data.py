"""A node's local data set: one `.npz` file with `x` (n x features, float) and `y` (n, integer labels).

`dirichlet_partition` builds label-skewed partitions the way federated-learning papers do, for tests,
benchmarks and demos.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """`x` as float32 and `y` as int64 from `path`, or from the only `.npz` file in directory `path`."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if len(files) != 1:
            raise ValueError(f"{path} must hold exactly one .npz file, it holds {len(files)}")
        path = files[0]
    with np.load(path, allow_pickle=False) as data:
        missing = {"x", "y"} - set(data.files)
        if missing:
            raise ValueError(f"{path} lacks array(s) {sorted(missing)}; it has {data.files}")
        x, y = data["x"].astype(np.float32), data["y"].astype(np.int64)
    if len(x) != len(y):
        raise ValueError(f"{path}: x has {len(x)} rows but y has {len(y)}")
    return x, y


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, holdout): a fixed `fraction` of the rows, at least one of each when n ≥ 2."""
    order = np.random.default_rng(seed).permutation(n)
    k = min(max(round(n * fraction), 1 if fraction > 0 and n >= 2 else 0), n - 1 if n >= 2 else 0)
    return np.sort(order[k:]), np.sort(order[:k])


def dirichlet_partition(y: np.ndarray, clients: int, alpha: float, seed: int, min_size: int = 10) -> list[np.ndarray]:
    """Row indices per client; each class is spread over clients with proportions ~ Dirichlet(alpha).

    Small alpha means strong label skew. Draws again until every client has `min_size` rows.
    """
    rng = np.random.default_rng(seed)
    while True:
        parts: list[list[int]] = [[] for _ in range(clients)]
        for label in np.unique(y):
            rows = rng.permutation(np.flatnonzero(y == label))
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients))[:-1] * len(rows)).astype(int)
            for part, chunk in zip(parts, np.split(rows, cuts), strict=True):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
