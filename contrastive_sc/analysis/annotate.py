"""Cell-type annotation: calibrated linear heads on the model's own input, with query-adaptive rejection
of cell types the reference does not have.

A model trained with labels keeps a :class:`CellTypeAnnotator`. It names a new cell from the
model's preprocessed input (its genes, log-normalised and scaled with the training state) and
the embedding:

1. Six class-balanced logistic regressions (two strengths on each of three feature sets: the
   genes as log1p counts per 10,000, recovered exactly from the preprocessed input; the
   preprocessed input itself; the genes beside the embedding) each give logits, divided by a
   temperature fitted on out-of-fold logits of the reference, so that the averaged probability
   estimates the chance that the call is right: that probability is the cell's ``confidence``.
2. Each query cell's probabilities are mixed (weight ``smooth_alpha``) with those of its
   ``smooth_k`` nearest query cells: the cells of one query population tend to share a type.
3. Unseen types: each query cell's expression, averaged over its ``novelty_k`` nearest query
   cells and centred on the query's mean, is correlated with every reference type's centred
   profile; the best correlation, as a robust z-score within the query (``(m - median) / MAD``),
   flags a cell below ``-novelty_z``, and a flagged cell whose query neighbours are flagged too
   (a share ``novelty_share``) is ``"unassigned"``: a population the reference lacks. The
   threshold is fixed from the reference side (chosen across splits, docs/annotation.md); it
   adapts to the query through the query's own median and spread.

Steps 2 and 3 compare the cells of one call with each other: they need at least
:data:`MIN_QUERY_CELLS` cells, and a sample is best sent whole. Only numpy and scipy at predict
time (the served model runs it without torch or scikit-learn); fitting uses scikit-learn.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

UNASSIGNED = "unassigned"
FEATURES = ("logcp10k", "scaled", "embedding", "logcp10k+embedding")
#: Defaults chosen by leave-one-split-out selection over eight reference -> query splits
#: (docs/annotation.md): six heads, three feature sets x C in {0.1, 1}, probabilities averaged.
DEFAULT_FEATURES = ("logcp10k", "logcp10k", "scaled", "scaled", "logcp10k+embedding", "logcp10k+embedding")
DEFAULT_C = (0.1, 1.0, 0.1, 1.0, 0.1, 1.0)
#: Below this many cells in one call the query-adaptive steps (smoothing, unseen types) are skipped.
MIN_QUERY_CELLS = 50
#: Smallest spread (MAD) of the best type-profile correlations within a query: a query of
#: populations that all match their types almost equally well is not read as holding new ones
#: (the spreads of the eight development splits' queries were 0.04-0.14, so their calls are unchanged).
NOVELTY_MAD_FLOOR = 0.02
#: A reference type with fewer training cells than this is named poorly: fitting warns about it.
FEW_CELLS = 10
_FORMAT = 2


class CellTypeAnnotator:
    """Calibrated logistic-regression annotator with query-adaptive unseen-type rejection.

    Parameters
    ----------
    features
        What each head reads (:data:`FEATURES`), one name per head.
    C
        Inverse L2 strength of each head's logistic regression, one per head.
    smooth_alpha, smooth_k
        Weight of the query neighbours' mean probabilities in a cell's, and how many (0: off).
    min_confidence
        Calls with a confidence below this are ``"unassigned"`` (0: off; a request may set it).
    novelty_z
        Robust z-score (in MADs) under which a cell matches no reference type; ``None``: off.
    novelty_share
        Share of a flagged cell's ``smooth_k`` query neighbours that must be flagged too.
    novelty_k
        Query neighbours whose mean expression is compared with the types' profiles.
    n_pcs
        Principal components of the query in which its cells' neighbours are found.
    folds
        Stratified folds of the out-of-fold logits the temperatures are fitted on.
    label_key
        The ``obs`` column the labels came from (provenance).
    """

    def __init__(self, features=DEFAULT_FEATURES, C=DEFAULT_C, *, smooth_alpha: float = 0.25, smooth_k: int = 15,
                 min_confidence: float = 0.0, novelty_z: float | None = 1.75, novelty_share: float = 0.3,
                 novelty_k: int = 30, n_pcs: int = 30, folds: int = 5, max_iter: int = 5000,
                 label_key: str = "") -> None:
        features = (features,) if isinstance(features, str) else tuple(features)
        C = (float(C),) * len(features) if np.ndim(C) == 0 else tuple(float(c) for c in C)
        if not features or len(C) != len(features):
            msg = f"one C per head: got features {features} and C {C}"
            raise ValueError(msg)
        unknown = [f for f in features if f not in FEATURES]
        if unknown:
            msg = f"features must be among {FEATURES}, got {unknown}"
            raise ValueError(msg)
        self.features, self.C = features, C
        self.smooth_alpha, self.smooth_k = float(smooth_alpha), int(smooth_k)
        self.min_confidence = _check_min_confidence(min_confidence)
        self.novelty_z = None if novelty_z is None else float(novelty_z)
        self.novelty_share, self.novelty_k = float(novelty_share), int(novelty_k)
        self.n_pcs, self.folds, self.max_iter = int(n_pcs), int(folds), int(max_iter)
        self.label_key = str(label_key)
        self.arrays: dict[str, np.ndarray] | None = None
        #: Out-of-fold figures on the reference, computed by :meth:`fit` (not saved).
        self.report: dict[str, float] = {}
        #: Reference types with fewer than :data:`FEW_CELLS` cells (set by :meth:`fit`).
        self.few_cell_types: dict[str, int] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(map(str, self.arrays["names"]))

    @property
    def needs_embedding(self) -> bool:
        return any("embedding" in f for f in self.features)

    # ------------------------------------------------------------------ features
    def _logcp10k(self, pre: np.ndarray) -> np.ndarray:
        a = self.arrays
        log_scaled = np.asarray(pre, dtype=np.float64) * a["gene_std"] + a["gene_mean"]  # log1p(counts * target / lib)
        return np.log1p(np.maximum(np.expm1(log_scaled), 0.0) * (1e4 / float(a["target_sum"])))

    def _features(self, kind: str, pre: np.ndarray, embedding, logcp: np.ndarray) -> np.ndarray:
        if kind == "logcp10k":
            return logcp
        if kind == "scaled":
            return np.asarray(pre, dtype=np.float64)
        if embedding is None:
            msg = f"features {kind!r} need the embedding of the cells"
            raise ValueError(msg)
        emb = np.asarray(embedding, dtype=np.float64)
        return emb if kind == "embedding" else np.hstack([logcp, emb * float(self.arrays["embedding_scale"])])

    # ------------------------------------------------------------------ fitting
    def fit(self, pre: np.ndarray, labels, *, gene_mean, gene_std, target_sum: float, embedding=None,
            seed: int = 0) -> CellTypeAnnotator:
        """Fit the heads, their temperatures and the type profiles on the reference.

        Parameters
        ----------
        pre
            ``(cells, genes)`` preprocessed reference (the model's input).
        labels
            One cell-type name per cell.
        gene_mean, gene_std, target_sum
            The model's preprocessing state.
        embedding
            ``(cells, d)`` embedding of the reference (for the embedding features).
        seed
            Seed of the calibration folds.

        Raises
        ------
        ValueError
            Missing labels, a single type, the reserved name ``"unassigned"``, or shapes that disagree.
        """
        from sklearn.linear_model import LogisticRegression

        pre = np.asarray(pre, dtype=np.float64)
        labels = np.asarray(labels)
        if pre.ndim != 2 or pre.shape[0] != labels.shape[0]:
            msg = f"expected one label per cell, got {labels.shape[0]} labels for {pre.shape[0]} cells"
            raise ValueError(msg)
        text = labels.astype(str)
        missing = (text == "nan") | (text == "None") | (text == "")
        if missing.any():
            msg = f"{int(missing.sum())} cell(s) have no label in {self.label_key or 'the labels'}; drop or label them"
            raise ValueError(msg)
        names, counts = np.unique(text, return_counts=True)
        if len(names) < 2:
            msg = f"an annotated reference needs at least 2 cell types, got {list(names)}"
            raise ValueError(msg)
        if UNASSIGNED in names:
            msg = f"{UNASSIGNED!r} is reserved for cells unlike every type; rename that label"
            raise ValueError(msg)
        few = {str(n): int(c) for n, c in zip(names, counts) if c < FEW_CELLS}
        if few:
            log.warning("reference type(s) with fewer than %d cells are named poorly: %s", FEW_CELLS, few)
        self.few_cell_types = few
        self.arrays = {"names": names, "gene_mean": np.asarray(gene_mean, dtype=np.float64),
                       "gene_std": np.asarray(gene_std, dtype=np.float64), "target_sum": np.float64(target_sum)}
        logcp = self._logcp10k(pre)
        if "logcp10k+embedding" in self.features:
            emb = np.asarray(embedding, dtype=np.float64)
            self.arrays["embedding_scale"] = np.float64(_rms(logcp) / max(_rms(emb), 1e-12))
        y = np.searchsorted(names, text)
        oof = np.zeros((len(y), len(names)))
        for i, (kind, C) in enumerate(zip(self.features, self.C)):
            x = self._features(kind, pre, embedding, logcp)

            def head(C=C):
                return LogisticRegression(C=C, class_weight="balanced", max_iter=self.max_iter)

            coef, intercept = _softmax_form(head().fit(x, y), len(names))
            self.arrays[f"coef_{i}"], self.arrays[f"intercept_{i}"] = coef, intercept
            logits, seen = _out_of_fold_logits(x, y, head, self.folds, seed)
            temperature = _fit_temperature(logits[seen], y[seen])
            self.arrays[f"temperature_{i}"] = np.float64(temperature)
            oof += np.exp(_log_softmax(logits / temperature)) / len(self.features)
        self.arrays["profiles"] = np.stack([logcp[text == n].mean(axis=0) for n in names])
        self.arrays["reference_mean"] = logcp.mean(axis=0)
        self.report = _out_of_fold_report(oof[seen], y[seen], len(names))
        return self

    # ------------------------------------------------------------------ prediction
    def annotate(self, pre: np.ndarray, embedding=None, min_confidence: float | None = None,
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Name each cell: ``(types, confidence)``.

        Parameters
        ----------
        pre
            ``(cells, genes)`` preprocessed query, all cells of one sample in one call.
        embedding
            ``(cells, d)`` embedding of the query (the embedding features need it).
        min_confidence
            Override of :attr:`min_confidence` for this call.

        Returns
        -------
        types
            Cell-type names, or ``"unassigned"``.
        confidence
            Calibrated probability that the call is right (for unassigned cells, that of the most
            probable type).
        """
        if self.arrays is None:
            msg = "this annotator is not fitted; call fit(...) or CellTypeAnnotator.load(path)"
            raise RuntimeError(msg)
        threshold = self.min_confidence if min_confidence is None else _check_min_confidence(min_confidence)
        a = self.arrays
        pre = np.asarray(pre, dtype=np.float64)
        if pre.ndim != 2 or pre.shape[1] != a["gene_mean"].shape[0]:
            msg = f"expected (cells, {a['gene_mean'].shape[0]}) preprocessed input, got shape {pre.shape}"
            raise ValueError(msg)
        logcp = self._logcp10k(pre)
        probs = np.zeros((len(pre), len(a["names"])))
        for i, kind in enumerate(self.features):  # the mean of the heads' calibrated probabilities
            x = self._features(kind, pre, embedding, logcp)
            logits = (x @ a[f"coef_{i}"].T + a[f"intercept_{i}"]) / float(a[f"temperature_{i}"])
            probs += np.exp(_log_softmax(logits)) / len(self.features)
        flagged = np.zeros(len(pre), dtype=bool)
        k = max(self.smooth_k, self.novelty_k)
        if len(pre) >= MIN_QUERY_CELLS and len(pre) > k:
            neighbours = _knn(_pca(logcp, self.n_pcs), k)  # (cells, k + 1), each cell first
            near = neighbours[:, 1:self.smooth_k + 1]
            if self.novelty_z is not None:
                z = self._novelty_z(logcp, neighbours[:, :self.novelty_k])
                flagged = z < -self.novelty_z
                if self.novelty_share > 0:  # a population the reference lacks, not a stray cell
                    flagged &= flagged[near].mean(axis=1) >= self.novelty_share
            if self.smooth_alpha > 0:
                probs = (1 - self.smooth_alpha) * probs + self.smooth_alpha * probs[near].mean(axis=1)
        best = probs.argmax(axis=1)
        confidence = probs[np.arange(len(best)), best]
        types = a["names"].astype(object)[best]
        types[flagged | (confidence < threshold)] = UNASSIGNED
        return types.astype(str), confidence

    def _novelty_z(self, logcp: np.ndarray, neighbourhood: np.ndarray) -> np.ndarray:
        """Robust z-score, within the query, of each cell's best correlation with a reference type's profile."""
        import scipy.sparse as sp

        n, k = neighbourhood.shape
        # the mean expression of each cell's neighbourhood, as one sparse product
        average = sp.csr_matrix((np.full(n * k, 1.0 / k), neighbourhood.ravel(), np.arange(0, n * k + 1, k)),
                                shape=(n, n))
        smoothed = average @ logcp
        a = self.arrays
        best = _row_corr(smoothed - logcp.mean(axis=0), a["profiles"] - a["reference_mean"]).max(axis=1)
        median = np.median(best)
        return (best - median) / max(float(np.median(np.abs(best - median))), NOVELTY_MAD_FLOOR)

    # ------------------------------------------------------------------ persistence
    def settings(self) -> dict:
        """The constructor arguments (saved with the arrays)."""
        return {"features": list(self.features), "C": list(self.C), "smooth_alpha": self.smooth_alpha,
                "smooth_k": self.smooth_k, "min_confidence": self.min_confidence, "novelty_z": self.novelty_z,
                "novelty_share": self.novelty_share, "novelty_k": self.novelty_k, "n_pcs": self.n_pcs,
                "folds": self.folds, "max_iter": self.max_iter, "label_key": self.label_key}

    def save(self, path: str | Path, *, model_id: str = "") -> Path:
        """Write the arrays and settings to one ``.npz`` (read back without pickle)."""
        if self.arrays is None:
            msg = "this annotator is not fitted"
            raise RuntimeError(msg)
        arrays = {k: np.asarray(v) for k, v in self.arrays.items()} | {"names": np.asarray(self.names, dtype=str)}
        with open(path, "wb") as handle:  # np.savez on a str path would append ".npz"
            np.savez(handle, settings=np.asarray(json.dumps(self.settings())), format=np.asarray(_FORMAT),
                     model_id=np.asarray(model_id), **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> CellTypeAnnotator:
        """Read an annotator written by :meth:`save`; a malformed file is named in the error."""
        try:
            with np.load(path, allow_pickle=False) as data:
                if "format" not in data.files or int(data["format"]) != _FORMAT:
                    msg = "written by another version of contrastive-sc (annotator format differs); fit the model again"
                    raise ValueError(msg)
                annotator = cls(**json.loads(str(data["settings"])))
                annotator.arrays = {k: data[k] for k in data.files if k not in ("settings", "format", "model_id")}
        except (KeyError, TypeError, ValueError, OSError) as error:
            msg = f"{Path(path).name} is not a valid cell-type annotator: {error}"
            raise ValueError(msg) from None
        return annotator

    @property
    def embedding_dim(self) -> int | None:
        """Width of the embedding the heads read (``None`` when no head reads it)."""
        for i, kind in enumerate(self.features):
            if kind == "embedding":
                return int(self.arrays[f"coef_{i}"].shape[1])
            if kind == "logcp10k+embedding":
                return int(self.arrays[f"coef_{i}"].shape[1] - self.arrays["gene_mean"].shape[0])
        return None


def held_out_type_detection(annotator: CellTypeAnnotator, pre: np.ndarray, labels, *, seed: int = 0,
                            max_types: int = 5) -> dict[str, float]:
    """How well the unseen-type rule flags a type the reference lacks, measured on the reference itself.

    For up to ``max_types`` types (the largest ones, each under half the cells), the reference's
    cells are split in two halves: the type profiles of one half without that type are the
    reference, the other half (every type) is the query. Returns the mean share of the type's
    query cells and of the other query cells that the rule calls unassigned.
    """
    labels = np.asarray(labels).astype(str)
    names, counts = np.unique(labels, return_counts=True)
    rng = np.random.default_rng(seed)
    half = rng.random(len(labels)) < 0.5
    logcp = annotator._logcp10k(pre)
    candidates = [n for n, c in sorted(zip(names, counts), key=lambda t: -t[1]) if c < 0.5 * len(labels) and c >= 20]
    held, known = [], []
    for name in candidates[:max_types]:
        reference = half & (labels != name)
        query = ~half
        if query.sum() <= max(MIN_QUERY_CELLS, annotator.novelty_k) or len(set(labels[reference])) < 2:
            continue
        kept = sorted(set(labels[reference]))
        probe = CellTypeAnnotator(features=("scaled",), C=(1.0,), smooth_k=annotator.smooth_k,
                                  novelty_z=annotator.novelty_z, novelty_share=annotator.novelty_share,
                                  novelty_k=annotator.novelty_k, n_pcs=annotator.n_pcs)
        probe.arrays = dict(annotator.arrays)
        probe.arrays["profiles"] = np.stack([logcp[reference & (labels == n)].mean(axis=0) for n in kept])
        probe.arrays["reference_mean"] = logcp[reference].mean(axis=0)
        q = logcp[query]
        neighbours = _knn(_pca(q, probe.n_pcs), max(probe.smooth_k, probe.novelty_k))
        flagged = probe._novelty_z(q, neighbours[:, :probe.novelty_k]) < -probe.novelty_z
        if probe.novelty_share > 0:
            flagged &= flagged[neighbours[:, 1:probe.smooth_k + 1]].mean(axis=1) >= probe.novelty_share
        is_held = labels[query] == name
        held.append(float(flagged[is_held].mean()))
        known.append(float(flagged[~is_held].mean()))
    if not held:
        return {}
    return {"held_out_type_unassigned": float(np.mean(held)), "known_unassigned": float(np.mean(known)),
            "types_tested": float(len(held))}


# ---------------------------------------------------------------------- helpers
def _check_min_confidence(value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating) or not 0.0 <= float(value) <= 1.0:
        msg = f"min_confidence must be a number within [0, 1], got {value!r}"
        raise ValueError(msg)
    return float(value)


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(((values - values.mean(axis=0)) ** 2).sum(axis=1).mean()))


def _softmax_form(fitted, n_types: int) -> tuple[np.ndarray, np.ndarray]:
    """A fitted logistic regression's coefficients as one row per type (two rows for two types)."""
    coef, intercept = fitted.coef_.astype(np.float64), fitted.intercept_.astype(np.float64)
    if n_types == 2:  # scikit-learn's binary form -> a two-class softmax
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    return coef, intercept


def _out_of_fold_logits(x, y, head, folds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(y)
    folds = int(min(folds, max(2, counts.max())))
    logits, seen = np.zeros((len(y), counts.size)), np.zeros(len(y), dtype=bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # types with fewer cells than folds
        for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
            present = np.unique(y[train])
            if len(present) < 2:
                continue
            fitted = head().fit(x[train], y[train])
            out = np.full((len(test), counts.size), -1e9)
            if len(present) == 2:
                d = fitted.decision_function(x[test])
                out[:, present[0]], out[:, present[1]] = -d / 2, d / 2
            else:
                out[:, present] = fitted.decision_function(x[test])
            logits[test], seen[test] = out, True
    return logits, seen


def _fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 200))
    nll = [(-_log_softmax(logits / t)[np.arange(len(y)), y]).mean() for t in grid]
    return float(grid[int(np.argmin(nll))])


def _out_of_fold_report(probs: np.ndarray, y: np.ndarray, n_types: int) -> dict[str, float]:
    """Macro F1, calibration error and confidence AUROC of the out-of-fold calls."""
    from sklearn.metrics import f1_score, roc_auc_score

    called = probs.argmax(axis=1)
    confidence = probs[np.arange(len(called)), called]
    correct = called == y
    report = {"cv_macro_f1": float(f1_score(y, called, labels=np.arange(n_types), average="macro", zero_division=0)),
              "cv_calibration_error": expected_calibration_error(correct, confidence)}
    if 0 < correct.sum() < len(correct):
        report["cv_confidence_auroc"] = float(roc_auc_score(correct, confidence))
    return report


def expected_calibration_error(correct, confidence, bins: int = 10) -> float:
    """Mean gap between confidence and accuracy over ``bins`` equal-width bins, weighted by their cells."""
    correct, confidence = np.asarray(correct, dtype=float), np.asarray(confidence, dtype=float)
    if not len(correct):
        return float("nan")
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    gaps = [abs(correct[which == b].mean() - confidence[which == b].mean()) * (which == b).mean()
            for b in range(bins) if (which == b).any()]
    return float(np.sum(gaps))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _pca(x: np.ndarray, n: int) -> np.ndarray:
    """Scores on the first ``n`` principal components of the rows of ``x`` (eigenvectors of the smaller Gram matrix)."""
    xc = x - x.mean(axis=0)
    n = min(n, *xc.shape)
    if xc.shape[0] <= xc.shape[1]:
        values, vectors = _top_eigenpairs(xc @ xc.T, n)
        return vectors * np.sqrt(np.maximum(values, 0))
    return xc @ _top_eigenpairs(xc.T @ xc, n)[1]


def _top_eigenpairs(gram: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` largest eigenvalues of a symmetric matrix and their vectors, largest first.

    Lanczos (ARPACK) finds the few pairs PCA needs about 5x faster than a full decomposition of
    a 2,000 x 2,000 matrix (0.16 against 0.78 s), to ~1e-10: the same neighbours, the same calls.
    A fixed start vector keeps it deterministic; small matrices take the full decomposition.
    """
    size = gram.shape[0]
    if n >= size - 1 or size <= 200:
        values, vectors = np.linalg.eigh(gram)
    else:
        from scipy.sparse.linalg import eigsh

        values, vectors = eigsh(gram, k=n, which="LA", v0=np.ones(size))
    order = np.argsort(values)[::-1][:n]
    return values[order], vectors[:, order]


def _knn(x: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """Indices of each row's ``k + 1`` nearest rows (itself first), exact, a block of rows at a time."""
    x = np.asarray(x, dtype=np.float64)
    norms = (x**2).sum(axis=1)
    out = np.empty((len(x), k + 1), dtype=np.int64)
    for start in range(0, len(x), block):
        part_x = x[start:start + block]
        d2 = norms[start:start + block, None] - 2 * part_x @ x.T + norms[None]
        rows = np.arange(len(part_x))
        d2[rows, start + rows] = -np.inf  # itself first
        part = np.argpartition(d2, k, axis=1)[:, :k + 1]
        order = np.argsort(np.take_along_axis(d2, part, axis=1), axis=1)
        out[start:start + block] = np.take_along_axis(part, order, axis=1)
    return out


def _row_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of every row of ``a`` with every row of ``b``."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T
