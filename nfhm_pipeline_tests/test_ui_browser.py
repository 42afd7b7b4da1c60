"""End to end through the Dagster UI in a real browser (headless Debian Chromium driven by Playwright).

A dagster-webserver on a loopback port serves the project's code location with the demo catalog cut down to
one dataset (demo_shapes, 2 images per species) and one model (raw-pixels). The test opens the dataset's asset
lineage in the browser and launches materializations the way a person would, filtering the graph and pressing
Materialize: the unpartitioned assets, then the per-model assets for partition ``raw-pixels`` through the
partition dialog, then ``model_comparison``. It waits on each run's page for Success, then opens the comparison
asset's ``charts`` markdown and checks that a report image (a data: PNG) is displayed.

Only the webserver runs, no daemon (see ``ui_helpers.write_instance_yaml``). Screenshots land in
``test-artifacts/ui/`` (gitignored). Slow (about 3 minutes on two busy cores): deselect with
``-m "not browser"``. Skips when ``/usr/bin/chromium`` or Playwright is missing (``make browser`` installs
Chromium where it can).
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest
import yaml

import ui_helpers as ui
from conftest import REPO_ROOT

ARTIFACTS = REPO_ROOT / "test-artifacts" / "ui"
DATASET = "demo_shapes"
MODEL = "raw-pixels"
TARGET = "model_comparison"
CHARTS_FROM = "knn_metrics"  # the nearest-neighbour bar charts and confusion matrices
# The demo's own entries, shrunk: 2 images per species (54 images) instead of 8; folds and UMAP grid to match.
DATASET_OVERRIDES = {"images_per_species": 2, "size": 32,
                     "split": {"test_fraction": 0.2, "seed": 0, "folds": 2},
                     "umap": {"n_neighbors": [5], "min_dist": [0.1], "max_points": 100}}


def write_tiny_catalog(path: Path) -> Path:
    """The shipped demo catalog cut down to one dataset and one model, so it stays valid as the demo evolves."""
    demo = yaml.safe_load((REPO_ROOT / "nfhm_pipeline" / "catalog" / "demo.yaml").read_text(encoding="utf-8"))
    tiny = {"description": "The demo shrunk for the browser test.",
            "datasets": {DATASET: {**demo["datasets"][DATASET], **DATASET_OVERRIDES}},
            "models": {MODEL: demo["models"][MODEL]}}
    path.write_text(yaml.safe_dump(tiny, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def launch_plan(catalog: Path) -> tuple[list[str], list[str]]:
    """(unpartitioned, per-model) stages the report's charts are drawn from: ``CHARTS_FROM`` and its ancestors,
    read from the code location's asset graph.

    The UI launches one run per partitions definition (a selection mixing unpartitioned and per-model assets
    becomes a backfill, which needs the daemon), so the test launches three runs: plain, per-model, ``TARGET``.
    The other metric assets (probes: about a minute of CPU on this busy two-core machine) and embedding_maps
    (UMAP) are left out to keep the test within its time budget; the report tolerates their absence and
    test_pipeline materializes them through the same code.
    """
    import dagster as dg

    from nfhm_pipeline.catalog import load_catalog
    from nfhm_pipeline.definitions import build_definitions

    graph = build_definitions(load_catalog(catalog)).resolve_asset_graph()
    target = dg.AssetKey([DATASET, TARGET])
    needed = graph.get_ancestor_asset_keys(dg.AssetKey([DATASET, CHARTS_FROM])) | {dg.AssetKey([DATASET, CHARTS_FROM])}
    assert needed <= graph.get_ancestor_asset_keys(target), f"{TARGET} no longer depends on {CHARTS_FROM}"
    plain = sorted(k for k in needed if not graph.get(k).is_partitioned)
    per_model = sorted(k for k in needed if graph.get(k).is_partitioned)
    for key in plain:  # runs go plain -> per-model -> target, so plain assets must not need per-model ones
        assert not any(graph.get(a).is_partitioned for a in graph.get_ancestor_asset_keys(key)), key
    return [k.path[-1] for k in plain], [k.path[-1] for k in per_model]


pytestmark = pytest.mark.browser


@pytest.fixture
def playwright_api():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright is not installed (pip install -e '.[dev]' installs it)")
    if not ui.CHROMIUM.is_file():
        pytest.skip(f"browser test: {ui.CHROMIUM} is missing; install Debian's chromium with `make browser` "
                    "(scripts/install_browser.sh, needs root + apt-get)")
    with sync_api.sync_playwright() as p:
        yield p


@pytest.fixture
def webserver(tmp_path):
    """Base URL of a dagster-webserver serving the tiny catalog, with its own DAGSTER_HOME and data folder."""
    catalog = write_tiny_catalog(tmp_path / "catalog.yaml")
    home = tmp_path / "dagster_home"
    ui.write_instance_yaml(home, REPO_ROOT / "dagster_home" / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "NFHM_CATALOG": str(catalog),
           "NFHM_DATA_DIR": str(tmp_path / "data"), "NFHM_DEVICE": "cpu",
           # DataLoader worker processes only cost start-up time for 27 images on two cores.
           "NFHM_LOADER_WORKERS": "0"}
    log = tmp_path / "webserver.log"
    with ui.dagster_webserver(REPO_ROOT, env, log, startup_timeout_s=120) as base_url:
        yield base_url, log, catalog


def keys(*stages: str) -> list[str]:
    return [f"{DATASET}/{s}" for s in stages]


def test_materializing_the_demo_from_the_asset_graph_shows_the_report_charts(playwright_api, webserver, tmp_path):
    base_url, server_log, catalog = webserver
    plain, per_model = launch_plan(catalog)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {ARTIFACTS}")
    started = time.monotonic()
    browser = ui.launch_chromium(playwright_api, tmp_path / "chromium-profile")
    page = browser.new_page()
    page.set_default_timeout(30_000)
    runs: set[str] = set()

    def materialize(stages, partition, shot, timeout_s, confirm_missing_upstream=False):
        page.goto(f"{base_url}/asset-groups/{DATASET}")
        ui.filter_asset_graph(page, keys(*stages))
        run_id = ui.launch_materialization(page, partition=partition, known_runs=frozenset(runs),
                                           confirm_missing_upstream=confirm_missing_upstream,
                                           screenshot=ARTIFACTS / f"{shot}-partition-dialog.png" if partition else None)
        runs.add(run_id)
        status = ui.wait_for_run(page, base_url, run_id, timeout_s=timeout_s)
        page.screenshot(path=str(ARTIFACTS / f"{shot}-run.png"))
        assert status == "Success", (f"run {run_id} ({', '.join(stages)}) ended {status}; see {base_url}/runs/{run_id}"
                                     f" and {ARTIFACTS / f'{shot}-run.png'}; webserver log:\n{ui.log_tail(server_log)}")
        print(f"  run {run_id[:8]} {stages} ok at {time.monotonic() - started:.0f} s")

    try:
        page.goto(f"{base_url}/asset-groups/{DATASET}")
        page.get_by_role("button", name=TARGET).first.wait_for()
        print(f"  community dialog shown and skipped: {ui.skip_community_dialog(page)}")
        page.screenshot(path=str(ARTIFACTS / "01-asset-graph.png"))

        materialize(plain, None, "02-unpartitioned", timeout_s=90)
        materialize(per_model, MODEL, "03-per-model", timeout_s=120)
        # The UI asks "Are you sure?" because the probe and zero-shot metrics were left out on purpose.
        materialize([TARGET], None, "04-model-comparison", timeout_s=90, confirm_missing_upstream=True)

        page.goto(f"{base_url}/assets/{DATASET}/{TARGET}")
        charts_row = page.locator("tr").filter(has=page.get_by_text("charts", exact=True))
        charts_row.get_by_text("[Show Markdown]").click()
        image = page.get_by_role("dialog").locator("img[src^='data:image/png']").first
        image.wait_for()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle(),
                               timeout=10_000)
        width, height = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        page.screenshot(path=str(ARTIFACTS / "05-model-comparison-charts.png"))
        assert width >= 100 and height >= 100, f"the report image decodes to {width}x{height} px"
    except Exception:
        with contextlib.suppress(Exception):
            page.screenshot(path=str(ARTIFACTS / "failure.png"))
            print(f"  failure screenshot: {ARTIFACTS / 'failure.png'}")
        raise
    finally:
        browser.close()
        print(f"  browser part took {time.monotonic() - started:.0f} s")
