"""Multi-label evaluation: per-label ROC AUC, linear probes, zero-shot, model comparison.

Every function takes targets y [N, F] in {0, 1} and a mask [N, F] (True where
the entry counts), as produced by `nfhm_pipeline.ingest.chexpert`. A label whose
counted entries hold only one class has no AUC: it gets NaN and a reason
instead of stopping the run.
"""
from __future__ import annotations

import html
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from nfhm_pipeline.errors import EvaluationError
from nfhm_pipeline.evaluation.vectors import unit_rows
from nfhm_pipeline.evaluation.names import MACRO_AUC, MICRO_AUC, N_LABELS_DEFINED

_NO_FINDING_PROMPTS = ("chest x-ray with no findings", "chest x-ray with abnormal findings")


def _check_targets(y, mask, scores=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    y = np.asarray(y)
    mask = np.asarray(mask, dtype=bool)
    if y.ndim != 2 or mask.shape != y.shape:
        raise EvaluationError(f"targets must be 2-D [images, labels] with a mask of the same shape; got {y.shape} and {mask.shape}")
    if not np.all(np.isin(y[mask], (0, 1))):
        raise EvaluationError("targets must be 0 or 1 wherever the mask is True")
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != y.shape:
            raise EvaluationError(f"scores shape {scores.shape} differs from targets shape {y.shape}")
        if not np.all(np.isfinite(scores[mask])):
            raise EvaluationError("scores contain NaN or inf at counted entries; check the embeddings or the model")
    return y, mask, scores


def _label_names(label_names, n: int) -> list[str]:
    names = [f"label_{j}" for j in range(n)] if label_names is None else [str(s) for s in label_names]
    if len(names) != n:
        raise EvaluationError(f"{len(names)} label names given for {n} label columns")
    return names


def roc_auc_per_label(y, mask, scores, label_names: Sequence[str] | None = None) -> pd.DataFrame:
    """ROC AUC per label over the counted (masked-in) entries only.

    y [N, F] in {0, 1}, mask bool [N, F], scores float [N, F] (higher = more
    likely positive). Returns one row per label: label, auc (float, NaN when
    undefined), n_pos, n_neg (counted entries), reason (None, or why auc is NaN).
    Tied scores count one half, as in the Mann-Whitney statistic.
    """
    y, mask, scores = _check_targets(y, mask, scores)
    rows = []
    for j, name in enumerate(_label_names(label_names, y.shape[1])):
        yj, sj = y[mask[:, j], j], scores[mask[:, j], j]
        n_pos = int(yj.sum())
        n_neg = int(len(yj) - n_pos)
        auc, reason = np.nan, None
        if n_pos == 0 or n_neg == 0:
            reason = f"no {'positive' if n_pos == 0 else 'negative'} entries among {len(yj)} counted"
        else:
            auc = float(roc_auc_score(yj, sj))
        rows.append({"label": name, "auc": auc, "n_pos": n_pos, "n_neg": n_neg, "reason": reason})
    return pd.DataFrame(rows, columns=["label", "auc", "n_pos", "n_neg", "reason"])


def macro_micro_auc(y, mask, scores) -> dict[str, float]:
    """Summary AUCs: macro = mean of the defined per-label AUCs; micro = one AUC
    over all counted entries pooled across labels (NaN if the pool has one class).

    Returns {"macro_auc", "micro_auc", "n_labels_defined"}.
    """
    y, mask, scores = _check_targets(y, mask, scores)
    defined = roc_auc_per_label(y, mask, scores)["auc"].dropna()
    pooled_y, pooled_s = y[mask], scores[mask]
    micro = np.nan
    if 0 < pooled_y.sum() < len(pooled_y):
        micro = float(roc_auc_score(pooled_y, pooled_s))
    return {
        MACRO_AUC: float(defined.mean()) if len(defined) else np.nan,
        MICRO_AUC: micro,
        N_LABELS_DEFINED: int(len(defined)),
    }


def multilabel_probe(
    X_train, Y_train, M_train, X_test, Y_test, M_test, *,
    label_names: Sequence[str] | None = None, seed: int = 0, C: float = 1.0,
) -> tuple[np.ndarray, pd.DataFrame]:
    """One-vs-rest linear probe: per label, StandardScaler + LogisticRegression
    trained on that label's counted training rows only.

    X_* float [N, D]; Y_*, M_* [N, F]. Returns scores_test float64 [N_test, F]
    (P(positive); NaN columns for skipped labels) and the per-label table of
    `roc_auc_per_label` plus n_train; a label whose counted training rows hold
    one class is skipped with that reason.
    """
    X_train = np.asarray(X_train, dtype=np.float64)
    X_test = np.asarray(X_test, dtype=np.float64)
    Y_train, M_train, _ = _check_targets(Y_train, M_train)
    Y_test, M_test, _ = _check_targets(Y_test, M_test)
    if X_train.shape[0] != Y_train.shape[0] or X_test.shape[0] != Y_test.shape[0]:
        raise EvaluationError(f"features and targets disagree on image count: {X_train.shape} vs {Y_train.shape}, {X_test.shape} vs {Y_test.shape}")
    if Y_train.shape[1] != Y_test.shape[1] or X_train.shape[1] != X_test.shape[1]:
        raise EvaluationError("train and test must have the same labels and embedding dimension")
    names = _label_names(label_names, Y_train.shape[1])

    scores = np.full(Y_test.shape, np.nan)
    skipped, n_train = {}, []
    for j in range(Y_train.shape[1]):
        rows = M_train[:, j]
        yj = Y_train[rows, j]
        n_train.append(int(rows.sum()))
        if len(np.unique(yj)) < 2:
            skipped[j] = f"training rows hold one class only ({len(yj)} counted)"
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000, random_state=seed))
        model.fit(X_train[rows], yj)
        scores[:, j] = model.predict_proba(X_test)[:, 1]

    # Skipped labels have NaN scores: rank placeholders, then overwrite their AUC with the reason.
    table = roc_auc_per_label(Y_test, M_test, np.nan_to_num(scores), names)
    for j, reason in skipped.items():
        table.loc[j, ["auc", "reason"]] = [np.nan, reason]
    table.insert(4, "n_train", n_train)
    return scores, table


def prompt_pair(finding: str) -> tuple[str, str]:
    """Default (positive, negative) zero-shot prompts for a chest x-ray finding."""
    if finding.strip().lower() == "no finding":
        return _NO_FINDING_PROMPTS
    f = finding.strip().lower()
    return f"chest x-ray showing {f}", f"chest x-ray with no {f}"


def cosine_margin(image_emb, pos_text_emb, neg_text_emb) -> np.ndarray:
    """cos(image, positive prompt) - cos(image, negative prompt), float64 [N, F].

    image_emb [N, D]; pos_text_emb, neg_text_emb [F, D] (any scale: L2-normalised here; a zero or
    non-finite vector is an EvaluationError). The zero-shot P(positive) = sigmoid(T * margin) with
    one T for every label, so the margin ranks images exactly as the probability does, also when
    pooled across labels (micro AUC), and without the ties a saturated sigmoid would create.
    """
    v, p, n = (unit_rows(image_emb, "image embeddings", non_empty=False),
               unit_rows(pos_text_emb, "positive prompt embeddings", non_empty=False),
               unit_rows(neg_text_emb, "negative prompt embeddings", non_empty=False))
    if p.shape != n.shape or v.shape[1] != p.shape[1]:
        raise EvaluationError(f"image {v.shape}, positive {p.shape} and negative {n.shape} prompt embeddings do not fit")
    return v @ p.T - v @ n.T


def _zero_shot_margin(image_emb, pos_text_emb, neg_text_emb, temperature: float) -> np.ndarray:
    return temperature * cosine_margin(image_emb, pos_text_emb, neg_text_emb)


def zero_shot_scores(image_emb, pos_text_emb, neg_text_emb, temperature: float = 100.0) -> np.ndarray:
    """P(positive) [N, F] = softmax over the (positive, negative) prompt cosine
    logits times `temperature`, i.e. sigmoid(T * (cos_pos - cos_neg)).

    image_emb [N, D]; pos_text_emb, neg_text_emb [F, D] (any scale: L2-normalised here).
    """
    margin = _zero_shot_margin(image_emb, pos_text_emb, neg_text_emb, temperature)
    return 0.5 * (1.0 + np.tanh(0.5 * margin))  # sigmoid without overflow


def zero_shot_auc(
    image_emb, pos_text_emb, neg_text_emb, Y, M, label_names: Sequence[str] | None = None,
    temperature: float = 100.0,
) -> pd.DataFrame:
    """Per-label zero-shot ROC AUC of `zero_shot_scores` (table as `roc_auc_per_label`)."""
    # AUC depends only on the order of P(pos), which is the order of the logit margin;
    # ranking the margin avoids false ties where the sigmoid saturates at 1.0 in float64.
    margin = _zero_shot_margin(image_emb, pos_text_emb, neg_text_emb, temperature)
    return roc_auc_per_label(Y, M, margin, label_names)


def auc_difference_table(
    a: pd.DataFrame, b: pd.DataFrame, name_a: str, name_b: str, threshold: float = 0.005,
    p_values: pd.Series | dict | None = None, alpha: float = 0.05,
) -> pd.DataFrame:
    """Compare two per-label AUC tables (columns label, auc): diff = auc_b - auc_a.

    Without ``p_values`` (seed 003's rule): mark is 'better' if diff > threshold, 'worse' if
    diff < -threshold, 'same' otherwise, and 'n/a' where either AUC is missing. The default
    threshold 0.005 is 0.5 percentage points of AUC.

    With ``p_values`` (label -> two-sided p of a paired test of the two AUCs: DeLong's per label, the
    paired bootstrap's for the ``macro_auc`` / ``micro_auc`` rows): a difference beyond the threshold
    is 'better' / 'worse' only when its p < ``alpha``; otherwise it is 'not significant', or
    'untested' for a row without a p-value (e.g. macro and micro when no bootstrap row was stored).
    Column ``p_value`` holds the p-values (NaN without). Rows follow a's label order, then labels
    only in b. The names, threshold and whether p-values were given are kept in `table.attrs` for
    `auc_difference_html`.
    """
    for name, t in ((name_a, a), (name_b, b)):
        if not {"label", "auc"} <= set(t.columns):
            raise EvaluationError(f"AUC table for {name!r} needs columns 'label' and 'auc', has {list(t.columns)}")
        if t["label"].duplicated().any():
            raise EvaluationError(f"AUC table for {name!r} repeats labels {sorted(set(t.loc[t['label'].duplicated(), 'label']))}")
    merged = pd.merge(
        a[["label", "auc"]].rename(columns={"auc": "auc_a"}),
        b[["label", "auc"]].rename(columns={"auc": "auc_b"}),
        on="label", how="outer", sort=False,
    )
    order = {lab: i for i, lab in enumerate(dict.fromkeys([*a["label"], *b["label"]]))}
    merged = merged.sort_values("label", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    merged["diff"] = merged["auc_b"] - merged["auc_a"]
    # A tiny tolerance so a difference of exactly the threshold (0.805 - 0.800) is not
    # marked by float rounding error.
    eps = 1e-12
    beyond_up, beyond_down = merged["diff"] > threshold + eps, merged["diff"] < -threshold - eps
    tested = p_values is not None
    p = pd.Series(p_values if tested else {}, dtype=np.float64)
    merged["p_value"] = merged["label"].map(p).astype(np.float64) if len(p) else np.nan
    if not tested:
        merged["mark"] = np.select([merged["diff"].isna(), beyond_up, beyond_down], ["n/a", "better", "worse"],
                                   default="same")
    else:
        significant = merged["p_value"] < alpha
        merged["mark"] = np.select(
            [merged["diff"].isna(), ~(beyond_up | beyond_down), merged["p_value"].isna(), ~significant, beyond_up],
            ["n/a", "same", "untested", "not significant", "better"], default="worse")
    merged.attrs.update(name_a=name_a, name_b=name_b, threshold=threshold, tested=tested, alpha=alpha)
    return merged


_MARK_COLOURS = {"better": "#1a7f37", "worse": "#cf222e"}
_NO_DIFFERENCE_COLOUR = "#6e7781"  # grey: no detectable difference (with p-values only)


def auc_difference_html(table: pd.DataFrame) -> str:
    """An HTML table of `auc_difference_table`: differences marked better are green (improvement of
    b over a), worse red. With p-values, every other difference is grey ("no detectable
    difference"), a column shows the p-values and a line under the table says the rule."""
    name_a = html.escape(str(table.attrs.get("name_a", "A")))
    name_b = html.escape(str(table.attrs.get("name_b", "B")))
    tested = bool(table.attrs.get("tested", False))

    def cell(x: float, signed: bool = False) -> str:
        return "&ndash;" if pd.isna(x) else (f"{x:+.4f}" if signed else f"{x:.4f}")

    def p_cell(x: float) -> str:
        return "&ndash;" if pd.isna(x) else ("&lt;0.0001" if x < 1e-4 else f"{x:.4f}")

    p_head = "<th>p (paired)</th>" if tested else ""
    lines = [
        '<table class="auc-difference">',
        f"<thead><tr><th>label</th><th>{name_a}</th><th>{name_b}</th><th>{name_b} &minus; {name_a}</th>"
        f"{p_head}</tr></thead>",
        "<tbody>",
    ]
    for r in table.itertuples(index=False):
        colour = _MARK_COLOURS.get(r.mark)
        if colour:
            style = f' style="color:{colour};font-weight:bold"'
        elif tested and r.mark != "n/a":
            style = f' style="color:{_NO_DIFFERENCE_COLOUR}"'
        else:
            style = ""
        p_col = f"<td>{p_cell(getattr(r, 'p_value', np.nan))}</td>" if tested else ""
        lines.append(
            f"<tr><td>{html.escape(str(r.label))}</td><td>{cell(r.auc_a)}</td><td>{cell(r.auc_b)}</td>"
            f'<td class="{r.mark}"{style}>{cell(r.diff, signed=True)}</td>{p_col}</tr>'
        )
    lines += ["</tbody>", "</table>"]
    if tested:
        points = 100 * float(table.attrs.get("threshold", 0.005))
        alpha = float(table.attrs.get("alpha", 0.05))
        lines.append(f'<p class="auc-difference-rule">Green / red: {name_b} better / worse by more than '
                     f"{points:g} points of AUC and a paired test p &lt; {alpha:g} on the same test images "
                     "(DeLong's per label; a paired bootstrap over the test images for macro and micro AUC); "
                     "grey: no detectable difference (within the threshold, not significant, or no test "
                     "stored).</p>")
    return "\n".join(lines)
