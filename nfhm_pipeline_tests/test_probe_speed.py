"""The fast probe solvers give today's answers, and every fit says how it converged.

The reference is the probe as it was before (LinearSVC(C = 100 / N) with sklearn's defaults,
LogisticRegression(C=1, max_iter=1000), a standardising scaler per fit, folds one after the
other), written out plainly here. Speed itself is measured by benchmarks/stage_costs.py.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from conftest import SHARED_DATA
from nfhm_pipeline.errors import EvaluationError
from nfhm_pipeline.evaluation.linear_probe import (
    ProbeJob, default_n_jobs, probe_on_split, run_probes, squared_hinge_ovr,
)
from nfhm_pipeline.evaluation.splits import make_split


def reference_probe(X_train, y_train, X_test, y_test, folds, classifier, seed=0):
    """(CV accuracy mean, test accuracy, test predictions) with the settings the probe had before."""
    def fit_predict(X_fit, y_fit, X_eval):
        model = (LinearSVC(C=100 / len(y_fit), random_state=seed) if classifier == "linear_svc"
                 else LogisticRegression(C=1.0, max_iter=1000))
        return make_pipeline(StandardScaler(), model).fit(X_fit, y_fit).predict(X_eval)

    accuracies = []
    for fold in np.unique(folds):
        fit = folds != fold
        accuracies.append(np.mean(fit_predict(X_train[fit], y_train[fit], X_train[~fit]) == y_train[~fit]))
    pred = fit_predict(X_train, y_train, X_test)
    return float(np.mean(accuracies)), float(np.mean(pred == y_test)), pred


def blobs(n=600, dim=20, classes=4, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * spread
    y = np.arange(n) % classes
    return centres[y] + rng.normal(size=(n, dim)) * rng.uniform(0.5, 3, size=dim), y


# --- the primal solver ------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("steps", ["cg", "cholesky"])
@pytest.mark.parametrize("classes", [2, 5])
def test_newton_solver_reaches_liblinears_optimum(classes, steps):
    """Same objective as liblinear's primal L2-loss SVC (intercept = a regularised feature of 1):
    liblinear run to a far tighter tolerance is the reference optimum."""
    X, y = blobs(n=400, dim=15, classes=classes, seed=classes)
    Xs = StandardScaler().fit_transform(X)
    C = 100 / len(y)
    ref = LinearSVC(C=C, dual=False, tol=1e-10, max_iter=100_000).fit(Xs, y)
    positive = np.unique(y)[1:] if classes == 2 else np.unique(y)
    Y = np.where(y[:, None] == positive[None, :], 1.0, -1.0)
    W, iterations, converged = squared_hinge_ovr(np.hstack([Xs, np.ones((len(y), 1))]), Y, C, tol=1e-10, steps=steps)
    want = np.hstack([ref.coef_, ref.intercept_[:, None]]).T
    assert converged and 0 < iterations < 100
    np.testing.assert_allclose(W, want, rtol=1e-6, atol=1e-8)


def test_newton_solver_stops_at_zero_gradient():
    """KKT of ½‖w‖² + C Σ max(0, 1 − y xᵀw)², checked by hand: w = 2C Σ_i y_i slack_i x_i."""
    X, y = blobs(n=300, dim=8, classes=3, seed=7)
    X = np.hstack([StandardScaler().fit_transform(X), np.ones((300, 1))])
    Y = np.where(y[:, None] == np.arange(3)[None, :], 1.0, -1.0)
    C = 0.05
    W, _, converged = squared_hinge_ovr(X, Y, C, tol=1e-12, steps="cg")
    for k in range(3):
        slack = np.maximum(0, 1 - Y[:, k] * (X @ W[:, k]))
        grad = W[:, k] - 2 * C * sum(Y[i, k] * slack[i] * X[i] for i in range(300))
        assert converged and np.linalg.norm(grad) < 1e-8


def test_the_dual_rule_and_the_solver_of_each_fit_are_recorded():
    X, y = blobs(n=250, dim=60, classes=3, seed=1)
    wide = probe_on_split(X[:200, :], y[:200], X[200:], y[200:], folds=np.arange(200) % 5)
    assert (wide.fits["solver"] == "newton_primal").all()          # 160 / 200 rows >= 60 features
    narrow = probe_on_split(X[:40], y[:40], X[200:], y[200:], folds=np.arange(40) % 5)
    assert (narrow.fits["solver"] == "liblinear_dual").all()        # 32 / 40 rows < 60 features
    logistic = probe_on_split(X[:200], y[:200], X[200:], y[200:], folds=np.arange(200) % 5, classifier="logistic")
    assert (logistic.fits["solver"] == "lbfgs").all()
    assert list(wide.fits["fit"]) == ["0", "1", "2", "3", "4", "refit"]
    assert wide.fits["iterations"].between(1, 999).all() and wide.fits["converged"].all()


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("rows, classifier", [(300, "linear_svc"), (45, "linear_svc"), (300, "logistic")])
def test_probe_equals_the_old_settings_on_synthetic_data(rows, classifier):
    X, y = blobs(n=rows + 100, dim=40, classes=4, seed=rows, spread=0.4)
    folds = np.arange(rows) % 5
    result = probe_on_split(X[:rows], y[:rows], X[rows:], y[rows:], folds=folds, classifier=classifier)
    cv, test, pred = reference_probe(X[:rows], y[:rows], X[rows:], y[rows:], folds, classifier)
    assert result.cv_accuracy_mean == pytest.approx(cv, abs=1e-12)
    np.testing.assert_array_equal(result.test_predictions, pred)


# --- convergence in the results ----------------------------------------------------------------------

def test_a_fit_that_runs_out_of_iterations_is_marked_not_converged(recwarn):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(10, 100))
    X = np.vstack([base, base + 1e-3 * rng.normal(size=base.shape)])
    y = np.r_[np.zeros(10, int), np.ones(10, int)]
    result = probe_on_split(X, y, X, y, n_folds=2)
    assert not result.fits["converged"].any() and (result.fits["iterations"] == 1000).all()
    frame = result.metrics_frame().set_index("metric")
    assert frame["converged"].tolist() == [False] * 4 and frame["iterations"].tolist() == [1000] * 4
    assert not [w for w in recwarn if "converge" in str(w.message)]


def test_metrics_rows_carry_the_slowest_fold_and_the_refit():
    X, y = blobs(n=300, dim=10, classes=3, seed=3)
    result = probe_on_split(X[:250], y[:250], X[250:], y[250:], folds=np.arange(250) % 5, classifier="logistic")
    frame = result.metrics_frame().set_index("metric")
    folds, refit = result.fits[result.fits["fit"] != "refit"], result.fits[result.fits["fit"] == "refit"]
    assert frame.loc["cv_accuracy", "iterations"] == folds["iterations"].max()
    assert frame.loc["test_accuracy", "iterations"] == refit["iterations"].iloc[0]
    assert frame["converged"].all() and str(frame["converged"].dtype) == "boolean"


def test_probe_rows_store_iterations_and_converged_and_other_rows_null(tmp_path):
    from helpers import write_results
    from nfhm_pipeline.evaluation.tables import knn_tables, probe_tables
    from nfhm_pipeline.store import warehouse

    X, y = blobs(n=200, dim=12, classes=3, seed=4)
    frame = pd.DataFrame({"image_id": [f"i{i}" for i in range(200)], "label": y.astype(str), "group": None})
    split = make_split(frame, label_column="label", test_fraction=0.2, seed=0, n_folds=5).assignments
    frame = frame.merge(split[["image_id", "split", "fold"]], on="image_id")
    db = tmp_path / "warehouse.duckdb"
    write_results(db, "d", "m", probe_tables(frame, X.astype(np.float32), ["label"]), split_id="s")
    write_results(db, "d", "m", knn_tables(frame, X.astype(np.float32), ["label"]), split_id="s")
    rows = warehouse.read_table(db, "metrics", dataset="d")
    probes = rows[rows["task"].isin(["linear_probe", "logistic_probe"])]
    assert len(probes) == 8 and probes["iterations"].notna().all() and (probes["iterations"] > 0).all()
    assert probes["converged"].astype(bool).all()
    knn = rows[rows["task"] == "knn"]
    assert len(knn) and knn["iterations"].isna().all() and knn["converged"].isna().all()
    types = dict(warehouse.query(db, "SELECT column_name, data_type FROM information_schema.columns "
                                     "WHERE table_name = 'metrics'").itertuples(index=False))
    assert types["iterations"] == "INTEGER" and types["converged"] == "BOOLEAN"


def test_an_older_warehouse_gains_the_convergence_columns(tmp_path):
    import duckdb

    from helpers import write_results
    from nfhm_pipeline.evaluation.tables import probe_tables
    from nfhm_pipeline.store import warehouse
    from nfhm_pipeline.store.schemas import WAREHOUSE_TABLES

    db = tmp_path / "warehouse.duckdb"
    before = [c for c in WAREHOUSE_TABLES["metrics"] if c.name not in ("iterations", "converged")]
    con = duckdb.connect(str(db))
    con.execute(f"CREATE TABLE metrics ({', '.join(c.ddl for c in before)})")
    con.execute("INSERT INTO metrics (dataset, model, task, metric, value) VALUES ('old', 'm', 'linear_probe', "
                "'cv_accuracy', 0.5)")
    con.close()
    X, y = blobs(n=120, dim=6, classes=2, seed=5)
    frame = pd.DataFrame({"image_id": [f"i{i}" for i in range(120)], "label": y.astype(str), "group": None,
                          "split": np.where(np.arange(120) < 100, "train", "test"), "fold": np.arange(120) % 5})
    write_results(db, "new", "m", probe_tables(frame, X, ["label"]), split_id="s")
    rows = warehouse.read_table(db, "metrics").set_index("dataset")
    assert pd.isna(rows.loc["old", "iterations"]) and pd.isna(rows.loc["old", "converged"])
    assert rows.loc["new", "iterations"].notna().all() and rows.loc["new", "converged"].astype(bool).all()


# --- workers and progress ------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_fits_in_worker_processes_give_the_same_answers_as_in_process():
    X, y = blobs(n=400, dim=50, classes=3, seed=6, spread=0.3)
    jobs = [ProbeJob("primal", X[:300], y[:300], X[300:], y[300:], np.arange(300) % 5, "linear_svc"),
            ProbeJob("dual", X[:50], y[:50], X[300:], y[300:], np.arange(50) % 5, "linear_svc", seed=3),
            ProbeJob("logistic", X[:300], y[:300], X[300:], y[300:], np.arange(300) % 5, "logistic"),
            ProbeJob("bad", X[:10], np.zeros(10, int), X[300:], y[300:], np.arange(10) % 5)]
    alone, pooled = run_probes(jobs, n_jobs=1), run_probes(jobs, n_jobs=2)
    for a, b in zip(alone[:3], pooled[:3]):
        pd.testing.assert_frame_equal(a.fold_scores, b.fold_scores, check_exact=True)
        np.testing.assert_array_equal(a.test_predictions, b.test_predictions)
        assert list(a.fits["iterations"]) == list(b.fits["iterations"])
    assert isinstance(alone[3], EvaluationError) and "single class" in str(pooled[3])


def test_progress_is_one_line_per_fit_with_done_total_and_elapsed():
    X, y = blobs(n=200, dim=10, classes=3, seed=8)
    jobs = [ProbeJob(f"{c}/label", X[:150], y[:150], X[150:], y[150:], np.arange(150) % 5, c)
            for c in ("linear_svc", "logistic")]
    lines: list[str] = []
    run_probes(jobs, n_jobs=1, log=lines.append, log_after_s=0.0)
    assert len(lines) == 13 and lines[-1].startswith("probes: all 12 fits done in ")
    assert lines[0].startswith("probes: linear_svc/label fold 0 done (1/12 fits, ") and lines[0].endswith(" s elapsed)")
    assert "logistic/label refit done (12/12 fits" in lines[-2]
    quiet: list[str] = []
    run_probes(jobs, n_jobs=1, log=quiet.append)  # well under the default 3 s: no lines
    assert quiet == []


def test_worker_counts_are_checked(monkeypatch):
    X, y = blobs(n=60, dim=4, classes=2)
    with pytest.raises(EvaluationError, match="n_jobs must be at least 1"):
        probe_on_split(X[:50], y[:50], X[50:], y[50:], n_jobs=0)
    monkeypatch.setenv("NFHM_PROBE_JOBS", "many")
    with pytest.raises(EvaluationError, match="NFHM_PROBE_JOBS must be a whole number"):
        default_n_jobs()
    monkeypatch.setenv("NFHM_PROBE_JOBS", "1")
    assert default_n_jobs() == 1


# --- real data: the shipped datasets -------------------------------------------------------------------

def _thumbnail(path, size: int) -> np.ndarray:
    with Image.open(path) as image:
        image.draft("RGB", (size * 4, size * 4))  # JPEG: decode at a reduced scale
        return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32).ravel()


def _real_raw_pixels(name: str):
    """(vectors, {level: labels}) of a shipped dataset: raw pixels at 8 x 8 RGB (14 x 14 grey for
    MedMNIST, every official split pooled)."""
    if name == "leeds_butterfly":
        labels = pd.read_csv(SHARED_DATA / name / "labels.csv")
        X = np.stack([_thumbnail(SHARED_DATA / name / f, 8) for f in labels["filename"]])
        return X, {level: labels[level].astype(str).to_numpy() for level in ("species", "family")}
    if name == "brain_tumor_mri_4class":
        files = sorted(f for f in (SHARED_DATA / name / "Testing").glob("*/*.jpg") if f.is_file())
        return np.stack([_thumbnail(f, 8) for f in files]), {"label": np.array([f.parent.name for f in files])}
    data = np.load(SHARED_DATA / "medmnist" / f"{name}.npz")
    images = np.concatenate([data[f"{s}_images"] for s in ("train", "val", "test")])
    small = np.stack([np.asarray(Image.fromarray(i).resize((14, 14), Image.BILINEAR)) for i in images])
    y = np.concatenate([data[f"{s}_labels"].ravel() for s in ("train", "val", "test")]).astype(str)
    return small.reshape(len(small), -1).astype(np.float32), {"label": y}


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real-data test: {SHARED_DATA} is absent")
@pytest.mark.parametrize("name", ["leeds_butterfly", "brain_tumor_mri_4class", "pneumoniamnist", "breastmnist"])
def test_new_svc_solver_scores_within_half_a_point_of_the_old_settings_on_real_images(name):
    X, levels = _real_raw_pixels(name)
    for level, y in levels.items():
        frame = pd.DataFrame({"image_id": np.arange(len(y)), "label": y})
        a = make_split(frame, label_column="label", test_fraction=0.2, seed=0, n_folds=5).assignments
        train, test = a[a["split"] == "train"], a[a["split"] == "test"]
        tr, te = train["image_id"].to_numpy(), test["image_id"].to_numpy()
        folds = train["fold"].to_numpy(dtype=int)
        result = probe_on_split(X[tr], y[tr], X[te], y[te], folds=folds)
        assert (result.fits["solver"] == "newton_primal").all() and result.fits["converged"].all()
        cv, test_acc, _ = reference_probe(X[tr], y[tr], X[te], y[te], folds, "linear_svc")
        assert abs(result.cv_accuracy_mean - cv) <= 0.005, (level, result.cv_accuracy_mean, cv)
        assert abs(result.test_accuracy - test_acc) <= 0.005, (level, result.test_accuracy, test_acc)
