"""Linear probes on frozen embeddings (protocol of the medical-VLM poster, seed 001).

Features are standardised by a ``StandardScaler`` fit on the rows the classifier is fit on (one
scaler per fit, so a validation or test row never leaks into the scaling). Classifiers:

* ``linear_svc``: L2-regularised squared-hinge SVM, one-vs-rest (``LinearSVC``'s objective, its
  intercept a regularised feature of value 1), ``C = 100 / N`` where N is the number of samples that
  particular SVC is fit on (the training folds during CV, all non-test rows for the final refit).
* ``logistic``: ``LogisticRegression(C=1.0, max_iter=1000)`` (lbfgs, multinomial).

Scores: accuracy and macro-F1 (unweighted mean of per-class F1 over the labels present in the
true or predicted labels, zero when undefined) as mean ± std (population std, ddof=0) over the CV
folds, each fold model scored on its own validation fold, plus the score on the held-out test
rows of a model refit on all training rows.

How the fits are solved (the answers are those of the settings above; only the speed changed):

* **SVC, dual or primal by a stated rule**: ``dual = n_fit < n_features`` (the choice sklearn's
  ``dual="auto"`` made before, so no dual fit moved). Dual fits run liblinear's coordinate descent
  (``LinearSVC(dual=True, tol=1e-4, max_iter=1000)``). Primal fits (N ≥ D, every large collection)
  run :func:`squared_hinge_ovr`: the same objective solved for all one-vs-rest classes at once by
  a generalised Newton method whose conjugate-gradient products are matrix-matrix (one pass over
  X per step for every class; liblinear's trust-region Newton makes two passes per step per
  class, memory-bound, 4x slower at 24k x 512 x 27 classes), or, with few features (about
  D < 200), exact Newton steps (a Cholesky solve per class). It stops at 1 % of liblinear's
  gradient tolerance, so it sits at least as close to the unique optimum as liblinear did.
* **No warm starts across folds**: liblinear has none, and for lbfgs every other fit's solution
  has seen this fold's validation rows (the refit saw all of them; fold j's fit saw fold k's).
  lbfgs stops as soon as the gradient is under its tolerance, which it already is there: a fold
  started from the refit took 0 iterations and scored CV accuracy 1.000 against 0.943 on test
  (a trial on benchmarks/stage_costs.py's --n 3000 collection). Every fit starts from zero, as
  before.
* **Fits in parallel**: the independent fits of one call (every fold and refit of every probe)
  run on ``n_jobs`` loky worker processes (processes: liblinear's random generator is global
  to a process), bounded by the CPUs this process may use; a small problem (train matrix under
  :data:`PARALLEL_MIN_VALUES` values) stays in-process, where a whole probe costs less than
  starting a worker.

Every fit records its solver, iterations and whether it converged (:attr:`ProbeResult.fits`);
the metrics rows carry them (:meth:`ProbeResult.metrics_frame`).

**Very large train sets** (the catalog's ``probe_max_train``): the seed protocol fits every train
image. Past a stated size the probe is fitted, CV folds and refit, on the stratified subsample
:func:`stratified_subsample` draws (the test rows are never subsampled); every metrics row says
how many train images were fitted (``train_n``) out of how many there were (``train_available``).
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Literal, Sequence

import numpy as np
import pandas as pd

from nfhm_pipeline.errors import EvaluationError
from nfhm_pipeline.evaluation.names import PROBE_METRICS
from nfhm_pipeline.evaluation.splits import assign_cv_folds, make_split

Classifier = Literal["linear_svc", "logistic"]

SVC_TOL = 1e-4            # liblinear's tolerance (LinearSVC default)
SVC_MAX_ITER = 1000       # liblinear's iteration cap; also the Newton solver's
NEWTON_TOL_FACTOR = 1e-2  # the Newton solver stops at 1 % of liblinear's primal gradient tolerance
LOGISTIC_MAX_ITER = 1000
# Below this many values in the train matrix (e.g. 1,000 x 500), fits stay in this process.
PARALLEL_MIN_VALUES = 500_000
# Progress lines only once a probe call has run this long (a small probe stays quiet).
LOG_AFTER_S = 3.0
FIT_COLUMNS = ["fit", "n_fit", "solver", "iterations", "max_iter", "converged", "seconds"]
# The smallest probe_max_train the catalog accepts (a few images per class and fold, at the least).
MIN_PROBE_TRAIN = 10


@dataclass(frozen=True)
class ProbeResult:
    """Scores of one linear probe.

    ``fold_scores``: one row per CV fold (fold, n_fit, n_val, accuracy, macro_f1).
    ``fits``: one row per fit (fit = fold id or "refit", n_fit, solver, iterations, max_iter,
    converged, seconds). ``test_predictions``: predicted label per test row, in the order of the
    test rows given (for ``linear_probe_cv``: the rows ``test_index`` of X). ``skipped``: classes
    left out (label, n, reason). ``warnings``: convergence warnings met while fitting, prefixed by
    the fit.
    """

    classifier: str
    cv_accuracy_mean: float
    cv_accuracy_std: float
    cv_macro_f1_mean: float
    cv_macro_f1_std: float
    test_accuracy: float
    test_macro_f1: float
    n_train: int
    n_test: int
    fold_scores: pd.DataFrame
    test_predictions: np.ndarray
    test_index: np.ndarray | None = None
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["label", "n", "reason"]))
    warnings: list = field(default_factory=list)
    fits: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=FIT_COLUMNS))

    def metrics_frame(self) -> pd.DataFrame:
        """Long table (metric, value, std, n, iterations, converged, train_n, train_available)
        matching the warehouse ``metrics`` columns. CV rows: the most iterations any fold took,
        and converged only when every fold did; test rows: the refit's. ``train_n``: the train
        rows fitted (the CV folds together; the refit), on every row; ``train_available``: the
        train rows there were, here ``train_n`` (a caller that gave a subsample, as the
        linear_probe_metrics stage does, puts the full count there: a smaller ``train_n`` then
        says the probe was fitted on a subsample)."""
        folds = self.fits[self.fits["fit"] != "refit"]
        refit = self.fits[self.fits["fit"] == "refit"]
        cv_iter, cv_conv = int(folds["iterations"].max()), bool(folds["converged"].all())
        test_iter, test_conv = int(refit["iterations"].iloc[0]), bool(refit["converged"].iloc[0])
        return pd.DataFrame(
            {
                "metric": list(PROBE_METRICS),  # cv_accuracy, cv_macro_f1, test_accuracy, test_macro_f1
                "value": [self.cv_accuracy_mean, self.cv_macro_f1_mean, self.test_accuracy, self.test_macro_f1],
                "std": [self.cv_accuracy_std, self.cv_macro_f1_std, np.nan, np.nan],
                "n": [self.n_train, self.n_train, self.n_test, self.n_test],
                "iterations": pd.array([cv_iter, cv_iter, test_iter, test_iter], dtype="Int64"),
                "converged": pd.array([cv_conv, cv_conv, test_conv, test_conv], dtype="boolean"),
                "train_n": pd.array([self.n_train] * 4, dtype="Int64"),
                "train_available": pd.array([self.n_train] * 4, dtype="Int64"),
            }
        )


@dataclass(frozen=True)
class ProbeJob:
    """One probe to run: train rows (X_train [n, D], y_train [n]) with a CV fold id per row,
    and the test rows it is scored on. ``name`` labels its progress lines."""

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    folds: np.ndarray
    classifier: Classifier = "linear_svc"
    seed: int = 0


def linear_probe_cv(
    X: np.ndarray,
    y: np.ndarray,
    *,
    classifier: Classifier = "linear_svc",
    test_fraction: float = 0.2,
    n_folds: int = 5,
    seed: int = 0,
    n_jobs: int | None = None,
) -> ProbeResult:
    """Hold out a stratified ``test_fraction`` of (X [N, D], y [N]), cross-validate on the rest
    with ``n_folds`` stratified folds and score a refit model on the held-out rows.

    The hold-out and the folds come from ``make_split`` (rows identified by their position), so
    classes with a single member are skipped and reported in ``result.skipped``.
    """
    X, y = _checked(X, y, "X")
    frame = pd.DataFrame({"image_id": np.arange(len(y)), "label": y})
    split = make_split(frame, label_column="label", test_fraction=test_fraction, seed=seed, n_folds=n_folds)
    a = split.assignments
    train = a.loc[a["split"] == "train"]
    test_idx = a.loc[a["split"] == "test", "image_id"].to_numpy()
    train_idx = train["image_id"].to_numpy()
    result = probe_on_split(
        X[train_idx], y[train_idx], X[test_idx], y[test_idx],
        folds=train["fold"].to_numpy(dtype=np.int64), classifier=classifier, seed=seed, n_jobs=n_jobs,
    )
    skipped = split.dropped.groupby("label", sort=True).size().rename("n").reset_index()
    skipped["reason"] = "single_image_class"
    return replace(result, test_index=test_idx, skipped=skipped)


def probe_on_split(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    *,
    folds: np.ndarray | None = None,
    classifier: Classifier = "linear_svc",
    n_folds: int = 5,
    seed: int = 0,
    n_jobs: int | None = None,
    log: Callable[[str], None] | None = None,
) -> ProbeResult:
    """Probe on a given split: CV over ``folds`` (fold id per train row, e.g. from
    ``make_split``; computed by ``assign_cv_folds(y_train, n_folds, seed)`` when None), then refit
    on all train rows and score X_test. Predictions are labels of the same kind as ``y_train``.
    """
    if folds is None:
        _, y_checked = _checked(X_train, y_train, "X_train")
        folds = assign_cv_folds(y_checked, n_folds=n_folds, seed=seed)[0]
    [result] = run_probes([ProbeJob("probe", X_train, y_train, X_test, y_test, folds, classifier, seed)],
                          n_jobs=n_jobs, log=log)
    if isinstance(result, EvaluationError):
        raise result
    return result


def run_probes(jobs: Sequence[ProbeJob], *, n_jobs: int | None = None, log: Callable[[str], None] | None = None,
               log_after_s: float = LOG_AFTER_S) -> list[ProbeResult | EvaluationError]:
    """Run several probes, their fits sharing one pool of workers; returns, per job in order, its
    result or the :class:`EvaluationError` that rules it out (bad input, a single class...).

    ``n_jobs``: worker processes (None: every CPU this process may use, in-process for a small
    problem; 1: in-process). ``log``: once the call has run ``log_after_s`` seconds, one line per
    finished fit with done/total and the elapsed time.
    """
    checked: list = []
    for job in jobs:
        try:
            checked.append(_checked_job(job))
        except EvaluationError as exc:
            checked.append(exc)
    live = [i for i, job in enumerate(checked) if not isinstance(job, EvaluationError)]
    # Fit specs: (job index, fit name, fit-row mask or None for all train rows)
    specs = []
    for i in live:
        job = checked[i]
        for fold in np.unique(job.folds):
            fit = job.folds != fold
            if len(np.unique(job.y_train[fit])) >= 2:  # else noted when the result is put together
                specs.append((i, int(fold), fit))
        specs.append((i, "refit", None))
    total = len(specs)
    workers = _workers(n_jobs, [checked[i] for i in live], total)
    progress = _Progress(log, total, log_after_s)
    outcomes: dict[tuple[int, object], _FitOutcome] = {}
    with _pool(workers) as run:
        checked = [run.shared(job) if isinstance(job, ProbeJob) else job for job in checked]
        for spec, outcome in run(((i, name), checked[i], fit) for i, name, fit in specs):
            outcomes[spec] = outcome
            progress.done(f"{checked[spec[0]].name} {_fit_label(spec[1])}")
    progress.finish()
    results: list = []
    for i, job in enumerate(checked):
        results.append(job if isinstance(job, EvaluationError) else _result(i, job, outcomes))
    return results


def stratified_subsample(labels: np.ndarray, max_n: int, *, seed: int = 0,
                         spread: np.ndarray | None = None, level: str = "label") -> np.ndarray:
    """Positions (sorted, int64) of at most ``max_n`` rows of ``labels``, stratified by label;
    every position when there are no more than ``max_n`` rows.

    How many per class (N rows, class c with n_c of them, M = ``max_n``):

    1. the proportional share ``M · n_c / N``, rounded by largest remainder (ties: the class
       first in sorted order), so the quotas sum to M and each is within 1 of its exact share;
    2. raised to a floor of ``min(n_c, 2)`` (``min(n_c, 1)`` when 2 per class would not fit
       in M), so every class stays present and, where it has 2 images, in two CV folds;
    3. the images the floors added are taken back one at a time from the class holding the most
       images above its floor (ties: the class first in sorted order), so the total is M.

    Which images: a permutation of each class's rows drawn from ``numpy.random.default_rng(seed)``
    (classes in sorted order, so the draw depends on the labels, their row order and the seed
    only). With ``spread`` (e.g. the CV fold id per row) a class's picks go round the spread
    values: every value's first image, then every value's second..., so a class's subsample is
    spread over the folds within 1 image where the folds hold enough of it. Raises
    :class:`EvaluationError` when there are more classes than M (``level`` names them).
    """
    labels = np.asarray(labels)
    n = len(labels)
    if isinstance(max_n, bool) or int(max_n) != max_n or max_n < 1:
        raise EvaluationError(f"max_n must be a positive whole number of train rows, got {max_n!r}.")
    max_n = int(max_n)
    if n <= max_n:
        return np.arange(n, dtype=np.int64)
    classes, codes = np.unique(labels, return_inverse=True)
    codes = codes.reshape(-1)
    counts = np.bincount(codes, minlength=len(classes))
    quotas = _subsample_quotas(counts, max_n, level)
    rng = np.random.default_rng(seed)
    spread = None if spread is None else np.asarray(spread).reshape(-1)
    chosen = []
    by_class = np.argsort(codes, kind="stable")  # each class's rows in increasing position
    ends = np.cumsum(counts)
    for c in range(len(classes)):
        rows = rng.permutation(by_class[ends[c] - counts[c]:ends[c]])
        if spread is not None:  # round-robin over the spread values, in the permuted order
            _, values = np.unique(spread[rows], return_inverse=True)
            values = values.reshape(-1)
            rank = np.empty(len(rows), dtype=np.int64)
            for v in np.unique(values):
                at = np.flatnonzero(values == v)
                rank[at] = np.arange(len(at))
            rows = rows[np.argsort(rank, kind="stable")]
        chosen.append(rows[:quotas[c]])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _subsample_quotas(counts: np.ndarray, max_n: int, level: str) -> np.ndarray:
    """Images per class for :func:`stratified_subsample` (steps 1-3 of its docstring)."""
    if len(counts) > max_n:
        raise EvaluationError(
            f"A train subsample of {max_n} images cannot keep all {len(counts)} classes of level {level!r}; "
            f"raise the dataset's probe_max_train to at least {len(counts)} (or leave it out to fit every "
            "train image).")
    floor = np.minimum(counts, 2)
    if floor.sum() > max_n:
        floor = np.minimum(counts, 1)
    exact = max_n * counts / counts.sum()
    quotas = np.floor(exact).astype(np.int64)
    short = max_n - int(quotas.sum())
    if short:
        # largest remainder first; a stable sort keeps sorted class order among equal remainders
        quotas[np.argsort(-(exact - quotas), kind="stable")[:short]] += 1
    quotas = np.maximum(quotas, floor)
    for _ in range(int(quotas.sum()) - max_n):
        quotas[int(np.argmax(quotas - floor))] -= 1
    return quotas


def build_probe(classifier: Classifier, n_fit: int, seed: int = 0, n_features: int | None = None):
    """The unfitted sklearn Pipeline (scaler + classifier) today's settings describe for a fit on
    ``n_fit`` rows: LinearSVC with the dual rule of the module docstring (``dual="auto"`` when
    ``n_features`` is not given), or the logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    if classifier == "linear_svc":
        dual = "auto" if n_features is None else bool(n_fit < n_features)
        model = LinearSVC(C=100.0 / n_fit, dual=dual, tol=SVC_TOL, max_iter=SVC_MAX_ITER, random_state=seed)
    else:
        model = LogisticRegression(C=1.0, max_iter=LOGISTIC_MAX_ITER)
    return make_pipeline(StandardScaler(), model)


def squared_hinge_ovr(X: np.ndarray, Y: np.ndarray, C: float, *, tol: np.ndarray | float,
                      max_iter: int = SVC_MAX_ITER, cg_tol: float = 0.1,
                      steps: Literal["auto", "cg", "cholesky"] = "auto") -> tuple[np.ndarray, int, bool]:
    """Solve, for every column k of Y [N, K] (±1), ``min_w ½‖w‖² + C Σ_i max(0, 1 − Y_ik x_iᵀw)²``
    over X [N, D] (float64; append a column of ones for liblinear's regularised intercept).

    Generalised Newton (the objective is C¹ and piecewise quadratic): each step solves
    ``(I + 2C Xᵀ A_k X) d = −g`` by conjugate gradients (``‖r‖ ≤ cg_tol ‖g‖``, as liblinear) for
    all open columns with one matrix product per CG step, then an exact line search (1-D Newton
    on the piecewise quadratic). Column k is done when ``‖g_k‖ ≤ tol_k ‖g_k(0)‖``. ``steps``:
    "cholesky" solves each Newton system exactly instead; "auto" picks it for few features.
    Returns W [D, K], the Newton iterations of the slowest column, and whether all converged.
    """
    n, dim = X.shape
    k = Y.shape[1]
    tol = np.broadcast_to(np.asarray(tol, dtype=np.float64), (k,))
    W = np.zeros((dim, k))
    margin = np.zeros((n, k))  # X @ W, kept up to date along the line search

    def gradient(cols):
        slack = np.maximum(0.0, 1.0 - Y[:, cols] * margin[:, cols])
        return W[:, cols] - 2.0 * C * (X.T @ (Y[:, cols] * slack)), slack > 0

    # Few features: solve each Newton system exactly (Cholesky of the D x D Hessian over the active
    # rows, about N D² per class) when that costs less than ~50 CG steps (4 N D per class each);
    # correlated features (raw pixels) need hundreds of CG steps, each a Python-level loop turn.
    direct = dim * (1 + dim / (3 * n)) < 200 if steps == "auto" else steps == "cholesky"
    # The CG products in float32 (half the memory traffic, the solver's whole cost): the direction
    # only has to be a good one, the gradient and the stopping test stay float64.
    X32 = None if direct else X.astype(np.float32)
    all_cols = np.arange(k)
    G, active = gradient(all_cols)
    stop = tol * np.linalg.norm(G, axis=0)
    open_cols = np.flatnonzero(np.linalg.norm(G, axis=0) > stop)
    G, active = G[:, np.isin(all_cols, open_cols)], active[:, np.isin(all_cols, open_cols)]
    iterations = 0
    while len(open_cols) and iterations < max_iter:
        iterations += 1
        if direct:
            d = _exact_newton_direction(X, C, G, active)
        else:
            d = _newton_direction(X32, C, G.astype(np.float32), active.astype(np.float32), cg_tol).astype(np.float64)
        cols = open_cols
        Z = X @ d
        y, m0, w = Y[:, cols], margin[:, cols], W[:, cols]
        t = _line_search(y, m0, Z, w, d, C)
        W[:, cols] = w + t * d
        margin[:, cols] = m0 + t * Z
        G, active = gradient(cols)
        still = np.linalg.norm(G, axis=0) > stop[cols]
        open_cols, G, active = cols[still], G[:, still], active[:, still]
    return W, iterations, not len(open_cols)


def default_n_jobs() -> int:
    """Worker processes for the probes: the CPUs this process may use (``NFHM_PROBE_JOBS`` caps it)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    cap = os.environ.get("NFHM_PROBE_JOBS")
    if cap:
        try:
            cpus = min(cpus, max(1, int(cap)))
        except ValueError:
            raise EvaluationError(f"NFHM_PROBE_JOBS must be a whole number of worker processes, got {cap!r}.") \
                from None
    return max(1, cpus)


# --- one fit ---------------------------------------------------------------------------------------


@dataclass
class _FitOutcome:
    predictions: np.ndarray   # labels of the evaluated rows (validation fold, or test rows for the refit)
    solver: str
    iterations: int
    max_iter: int
    converged: bool
    seconds: float
    notes: list[str]
    n_fit: int


def _keyed_fit(key, job: ProbeJob, fit_rows):
    """``(key, outcome)`` of one fit of ``job``: on the rows ``fit_rows`` (bool mask over the train
    rows) scored on the others, or (None) on all train rows scored on the test rows. Slices here,
    in the worker, so the parent never holds a copy per fold."""
    if fit_rows is None:
        X_fit, y_fit, X_eval = job.X_train, job.y_train, job.X_test
    else:
        X_fit, y_fit, X_eval = job.X_train[fit_rows], job.y_train[fit_rows], job.X_train[~fit_rows]
    return key, _fit_predict(key[1], X_fit, y_fit, X_eval, job.classifier, job.seed)


def _fit_predict(name, X_fit, y_fit, X_eval, classifier, seed) -> _FitOutcome:
    """Standardise on the fit rows, fit, predict X_eval; convergence recorded, never raised."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.preprocessing import StandardScaler

    start = time.perf_counter()
    where = _fit_label(name)
    n_fit, dim = X_fit.shape
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        if classifier == "linear_svc" and n_fit >= dim:
            scaler = StandardScaler().fit(X_fit)
            classes, pred_scores, iterations, converged = _svc_primal(scaler.transform(X_fit), y_fit,
                                                                      scaler.transform(X_eval))
            predictions = classes[np.argmax(pred_scores, axis=1)] if pred_scores.shape[1] > 1 \
                else classes[(pred_scores[:, 0] > 0).astype(int)]
            solver, max_iter = "newton_primal", SVC_MAX_ITER
            if not converged:
                notes.append(f"{where}: the primal Newton solver did not converge in {SVC_MAX_ITER} iterations")
        else:
            model = build_probe(classifier, n_fit, seed, n_features=dim)
            model.fit(X_fit, y_fit)
            predictions = model.predict(X_eval)
            estimator = model[-1]
            iterations = int(np.max(estimator.n_iter_))
            max_iter = int(estimator.max_iter)
            solver = "liblinear_dual" if classifier == "linear_svc" else "lbfgs"
            converged = iterations < max_iter
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            notes.append(f"{where}: {w.message}")
            converged = False  # lbfgs also stops short of max_iter when its line search fails
        else:  # only convergence is expected; anything else stays visible
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return _FitOutcome(predictions, solver, iterations, max_iter, bool(converged), time.perf_counter() - start,
                       notes, n_fit)


def _svc_primal(Xs_fit, y_fit, Xs_eval):
    """LinearSVC's primal objective (C = 100 / n, intercept a regularised feature of value 1,
    one-vs-rest; two classes: one problem, classes[1] positive) by :func:`squared_hinge_ovr`.
    Returns (classes, decision scores [n_eval, K or 1], iterations, converged)."""
    n = len(y_fit)
    classes = np.unique(y_fit)
    X = np.hstack([Xs_fit, np.ones((n, 1))])
    positive = classes[1:] if len(classes) == 2 else classes
    Y = np.where(y_fit[:, None] == positive[None, :], 1.0, -1.0)
    # liblinear's primal stopping rule: ‖g‖ ≤ tol · max(min(#pos, #neg), 1) / n · ‖g(0)‖
    pos = (Y > 0).sum(axis=0)
    tol = NEWTON_TOL_FACTOR * SVC_TOL * np.maximum(np.minimum(pos, n - pos), 1) / n
    W, iterations, converged = squared_hinge_ovr(X, Y, 100.0 / n, tol=tol)
    scores = np.hstack([Xs_eval, np.ones((len(Xs_eval), 1))]) @ W
    return classes, scores, iterations, converged


def _newton_direction(X, C, G, A, cg_tol, max_cg: int = 1000):
    """Conjugate gradients for (I + 2C Xᵀ diag(A_k) X) d_k = −g_k, all columns k together."""
    d = np.zeros_like(G)
    r = -G
    p = r.copy()
    C = G.dtype.type(C)
    rr = (r * r).sum(axis=0)
    target = cg_tol * np.sqrt(rr)
    running = np.sqrt(rr) > target
    for _ in range(max_cg):
        if not running.any():
            break
        Hp = p + 2.0 * C * (X.T @ (A * (X @ p)))
        curvature = (p * Hp).sum(axis=0)
        alpha = np.where(running, rr / np.where(curvature > 0, curvature, 1.0), 0.0)
        d += alpha * p
        r -= alpha * Hp
        rr_new = (r * r).sum(axis=0)
        running &= np.sqrt(rr_new) > target
        p = r + np.where(rr > 0, rr_new / np.where(rr > 0, rr, 1.0), 0.0) * p
        rr = rr_new
    return d


def _exact_newton_direction(X, C, G, active):
    """d_k = −(I + 2C X_kᵀ X_k)⁻¹ g_k, X_k the rows active (slack > 0) for column k."""
    from scipy.linalg import cho_factor, cho_solve

    d = np.empty_like(G)
    eye = np.eye(X.shape[1])
    for j in range(G.shape[1]):
        rows = X[active[:, j]]
        d[:, j] = -cho_solve(cho_factor(eye + 2.0 * C * (rows.T @ rows)), G[:, j])
    return d


def _line_search(y, m0, Z, w, d, C, max_steps: int = 50):
    """The exact step t_k minimising ½‖w + t d‖² + C Σ max(0, 1 − y (m0 + t Z))² per column (a
    convex piecewise quadratic: 1-D Newton from t = 1 ends on its minimum in a few steps)."""
    t = np.ones(w.shape[1])
    wd, dd = (w * d).sum(axis=0), (d * d).sum(axis=0)
    for _ in range(max_steps):
        slack = 1.0 - y * (m0 + t * Z)
        on = slack > 0
        slope = wd + t * dd - 2.0 * C * (on * slack * y * Z).sum(axis=0)
        curvature = dd + 2.0 * C * (on * Z * Z).sum(axis=0)
        step = np.where(curvature > 0, slope / np.where(curvature > 0, curvature, 1.0), 0.0)
        t = t - step
        if np.all(np.abs(step) <= 1e-12 * np.maximum(1.0, np.abs(t))):
            break
    return t


# --- running many fits ----------------------------------------------------------------------------


def _workers(n_jobs, jobs, total_fits: int) -> int:
    if n_jobs is not None:
        if int(n_jobs) < 1:
            raise EvaluationError(f"n_jobs must be at least 1, got {n_jobs}.")
        return min(int(n_jobs), max(total_fits, 1))
    if not jobs or max(job.X_train.size for job in jobs) < PARALLEL_MIN_VALUES:
        return 1
    return min(default_n_jobs(), max(total_fits, 1))


class _pool:
    """``run(calls)`` yields ((job, fit), outcome) as fits finish: in-process for one worker,
    else on a loky process pool kept for the ``with`` block. ``run.shared(job)``: the job with
    its matrices in memory-mapped files, which joblib hands to workers by name (otherwise it
    hashes and dumps the whole train matrix again for every fold)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.parallel = None
        self.folder = None

    def __enter__(self):
        if self.workers > 1:
            import tempfile

            from joblib import Parallel

            shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            self.folder = tempfile.TemporaryDirectory(prefix="nfhm-probes-", dir=shm)
            self.parallel = Parallel(n_jobs=self.workers, backend="loky", return_as="generator_unordered")
            self.parallel.__enter__()
        return self

    def __call__(self, calls):
        return self.run(calls)

    def __exit__(self, *exc):
        if self.parallel is not None:
            self.parallel.__exit__(*exc)
        if self.folder is not None:
            self.folder.cleanup()

    def shared(self, job: ProbeJob) -> ProbeJob:
        if self.folder is None:
            return job
        arrays = {}
        for name in ("X_train", "X_test"):
            path = os.path.join(self.folder.name, f"{id(job)}-{name}.npy")
            np.save(path, getattr(job, name))
            arrays[name] = np.load(path, mmap_mode="r")
        return replace(job, **arrays)

    def run(self, calls):
        if self.parallel is None:
            for call in calls:
                yield _keyed_fit(*call)
            return
        from joblib import delayed

        yield from self.parallel(delayed(_keyed_fit)(*call) for call in calls)


class _Progress:
    def __init__(self, log, total: int, after_s: float):
        self.log, self.total, self.after_s = log, total, after_s
        self.start, self.count = time.perf_counter(), 0

    def done(self, what: str) -> None:
        self.count += 1
        elapsed = time.perf_counter() - self.start
        if self.log is not None and elapsed >= self.after_s:
            self.log(f"probes: {what} done ({self.count}/{self.total} fits, {elapsed:.1f} s elapsed)")

    def finish(self) -> None:
        elapsed = time.perf_counter() - self.start
        if self.log is not None and elapsed >= self.after_s:
            self.log(f"probes: all {self.total} fits done in {elapsed:.1f} s")


def _fit_label(name) -> str:
    return "refit" if name == "refit" else f"fold {name}"


def _result(i: int, job: ProbeJob, outcomes) -> ProbeResult | EvaluationError:
    notes: list[str] = []
    rows, fits = [], []
    for fold in np.unique(job.folds):
        outcome = outcomes.get((i, int(fold)))
        if outcome is None:
            notes.append(f"fold {fold}: skipped, its training part holds a single class")
            continue
        val = job.folds == fold
        notes += outcome.notes
        rows.append((int(fold), outcome.n_fit, int(val.sum()), *_scores(job.y_train[val], outcome.predictions)))
        fits.append((int(fold), outcome))
    if not rows:
        return EvaluationError("No CV fold could be fit: every fold's training part holds a single class.")
    refit = outcomes[(i, "refit")]
    notes += refit.notes
    fits.append(("refit", refit))
    fold_scores = pd.DataFrame(rows, columns=["fold", "n_fit", "n_val", "accuracy", "macro_f1"])
    test_acc, test_f1 = _scores(job.y_test, refit.predictions)
    fit_table = pd.DataFrame([(str(name), o.n_fit, o.solver, o.iterations, o.max_iter, o.converged, o.seconds)
                              for name, o in fits], columns=FIT_COLUMNS)
    return ProbeResult(
        classifier=job.classifier,
        cv_accuracy_mean=float(fold_scores["accuracy"].mean()),
        cv_accuracy_std=float(fold_scores["accuracy"].std(ddof=0)),
        cv_macro_f1_mean=float(fold_scores["macro_f1"].mean()),
        cv_macro_f1_std=float(fold_scores["macro_f1"].std(ddof=0)),
        test_accuracy=test_acc,
        test_macro_f1=test_f1,
        n_train=len(job.y_train),
        n_test=len(job.y_test),
        fold_scores=fold_scores,
        test_predictions=refit.predictions,
        warnings=notes,
        fits=fit_table,
    )


def _checked_job(job: ProbeJob) -> ProbeJob:
    if job.classifier not in ("linear_svc", "logistic"):
        raise EvaluationError(f"classifier must be 'linear_svc' or 'logistic', got {job.classifier!r}.")
    X_train, y_train = _checked(job.X_train, job.y_train, "X_train")
    X_test, y_test = _checked(job.X_test, job.y_test, "X_test")
    if X_train.shape[1] != X_test.shape[1]:
        raise EvaluationError(f"X_train has {X_train.shape[1]} features but X_test has {X_test.shape[1]}.")
    if len(np.unique(y_train)) < 2:
        raise EvaluationError(f"The training rows hold a single class ({y_train[0]!r}); a probe needs at least 2.")
    folds = np.asarray(job.folds)
    if folds.shape != y_train.shape:
        raise EvaluationError(f"folds has shape {folds.shape}, expected one fold id per train row {y_train.shape}.")
    return replace(job, X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test, folds=folds)


def _scores(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import f1_score

    return float(np.mean(y_true == y_pred)), float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def _checked(X, y, name: str) -> tuple[np.ndarray, np.ndarray]:
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
    if X.ndim != 2 or X.shape[0] == 0:
        raise EvaluationError(f"{name} must be a non-empty 2-D array [rows, features], got shape {X.shape}.")
    if y.shape != (X.shape[0],):
        raise EvaluationError(f"{name} has {X.shape[0]} rows but its labels have shape {y.shape}.")
    if not np.isfinite(X).all():
        raise EvaluationError(f"{name} holds {int((~np.isfinite(X)).any(axis=1).sum())} row(s) with NaN or inf.")
    if pd.isna(y).any():
        raise EvaluationError(f"{int(pd.isna(y).sum())} label(s) for {name} are missing (NaN/None).")
    return X, y
