"""Helpers for the end-to-end UI test: a Dagster webserver on loopback and a headless Chromium driving it.

Only test code imports this module. Every wait here has a bounded timeout, so a broken UI fails the
test with a message instead of hanging it.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

import yaml

CHROMIUM = Path(os.environ.get("NFHM_CHROMIUM", "/usr/bin/chromium"))
# Keep Chromium from phoning home (the machine may be offline) and from needing a GPU or a sandbox (root in CI).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TERMINAL_RUN_STATUSES = ("Success", "Failure", "Canceled")


def free_loopback_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_instance_yaml(dagster_home: Path, template: Path) -> Path:
    """``dagster.yaml`` for the test instance: the project's settings (pools) plus a run coordinator that launches
    runs at once.

    Only the webserver runs (no daemon): the project's sensors (manifest sensor, automation conditions) start
    RUNNING by default and would launch runs of their own under ``dagster dev``, racing the runs the test launches.
    Without a daemon the default queued coordinator would never dequeue, hence ``DefaultRunCoordinator``.
    """
    config = yaml.safe_load(template.read_text(encoding="utf-8")) or {}
    config["run_coordinator"] = {"module": "dagster._core.run_coordinator.default_run_coordinator",
                                 "class": "DefaultRunCoordinator"}
    config["telemetry"] = {"enabled": False}
    dagster_home.mkdir(parents=True, exist_ok=True)
    path = dagster_home / "dagster.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def log_tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def dagster_webserver(repo_root: Path, env: dict[str, str], log_path: Path,
                      startup_timeout_s: float = 120.0) -> Iterator[str]:
    """Run ``dagster-webserver -w workspace.yaml`` on a free loopback port; yields its base URL.

    The server (and the code server and run processes it spawns) live in their own process group, which is
    terminated, then killed, on exit.
    """
    port = free_loopback_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "dagster_webserver", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_server(base_url, proc, log_path, startup_timeout_s)
        yield base_url
    finally:
        stop_process_group(proc)


def wait_for_server(base_url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"dagster-webserver exited with code {proc.returncode} before serving; "
                                 f"log {log_path}:\n{log_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{base_url}/server_info", timeout=3) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise AssertionError(f"dagster-webserver did not answer {base_url}/server_info within {timeout_s:.0f} s; "
                         f"log {log_path}:\n{log_tail(log_path)}")


def stop_process_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the process group started with ``start_new_session=True``; SIGKILL what is left after ``grace_s``."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # run/code-server children may outlive the webserver itself
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def launch_chromium(playwright, profile_dir: Path):
    """A headless Debian Chromium with a fresh profile; returns a Playwright BrowserContext."""
    return playwright.chromium.launch_persistent_context(
        str(profile_dir), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1400, "height": 900})


def skip_community_dialog(page, timeout_ms: int = 20_000) -> bool:
    """Click Skip on "Join the Dagster community"; returns whether the dialog was shown.

    The UI shows it on localhost to a fresh instance and browser profile, one second after a query answers, so
    it appears a while after the page itself; it would swallow the keystrokes meant for the graph's search box.
    """
    skip = page.get_by_role("dialog").filter(has_text="Join the Dagster community").get_by_role(
        "button", name="Skip", exact=True)
    try:
        skip.wait_for(timeout=timeout_ms)
    except Exception:  # Playwright's TimeoutError: not shown (a later Dagster, or dismissed before)
        return False
    skip.click()
    skip.wait_for(state="hidden", timeout=timeout_ms)
    return True


def filter_asset_graph(page, keys: list[str], timeout_ms: int = 30_000) -> None:
    """Type an asset selection (``key:"a/b" or ...``) into the lineage page's search box; the graph then shows
    only those assets and the launch button materializes exactly them."""
    box = page.locator(".CodeMirror").first
    box.wait_for(timeout=timeout_ms)
    box.click()
    page.keyboard.press("ControlOrMeta+a")
    page.keyboard.press("Backspace")
    selection = " or ".join(f'key:"{k}"' for k in keys)
    page.keyboard.type(selection, delay=5)
    page.keyboard.press("Escape")  # closes the autocomplete so Enter applies the text as typed
    page.keyboard.press("Enter")
    # The applied selection lands in the URL (/asset-groups~<selection>/...).
    page.wait_for_url(lambda url: selection in urllib.parse.unquote(url), timeout=timeout_ms)


def launch_materialization(page, partition: str | None = None, screenshot: Path | None = None,
                           known_runs: frozenset[str] = frozenset(), confirm_missing_upstream: bool = False,
                           timeout_ms: int = 30_000) -> str:
    """Click the graph's Materialize button; for partitioned assets pick ``partition`` in the dialog and launch one
    run; with ``confirm_missing_upstream`` answer Confirm when the UI warns that upstream assets were never
    materialized. Returns the launched run's id (from the "Launched run" toast), never one of ``known_runs``."""
    button = page.get_by_role("button").filter(has_text=re.compile(r"^Materialize( all| selected)?…?$")).first
    button.click(timeout=timeout_ms)
    if partition is not None:
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("Select a partition or create one").click(timeout=timeout_ms)
        page.get_by_placeholder("Filter partitions").fill(partition)
        # The row's label holds the key twice (a hidden copy measures truncation), so match by substring.
        page.locator("label").filter(has_text=partition).first.click(timeout=timeout_ms)
        page.keyboard.press("Escape")  # closes the partition list, not the dialog
        launch = dialog.get_by_role("button", name="Launch 1 run", exact=True)
        launch.wait_for(timeout=timeout_ms)
        if screenshot is not None:
            page.screenshot(path=str(screenshot))
        launch.click()
    # Launching with upstream assets never materialized (the test skips some on purpose) asks "Are you sure?".
    confirm = page.get_by_role("dialog").filter(has_text="Are you sure?").get_by_role("button", name="Confirm")
    deadline = time.monotonic() + timeout_ms / 1000
    while time.monotonic() < deadline:
        if confirm_missing_upstream and confirm.count() and confirm.first.is_visible():
            with contextlib.suppress(Exception):  # it may close between the check and the click
                confirm.first.click(timeout=2_000)
        # Read the toasts' "View" links in one evaluation: toasts vanish after a few seconds.
        hrefs = page.eval_on_selector_all(
            "a[href*='/runs/']", "els => els.filter(e => e.innerText.trim() === 'View').map(e => e.getAttribute('href'))")
        for href in hrefs:
            match = re.search(r"/runs/([0-9a-f-]{36})", href)
            if match and match.group(1) not in known_runs:
                return match.group(1)
        page.wait_for_timeout(250)
    raise AssertionError(f"no 'Launched run' toast with a new run link within {timeout_ms / 1000:.0f} s")


def wait_for_run(page, base_url: str, run_id: str, timeout_s: float) -> str:
    """Open the run's page and wait until its status tag is terminal; returns "Success", "Failure" or "Canceled".

    The run page updates itself over a websocket, so no reloads are needed.
    """
    page.goto(f"{base_url}/runs/{run_id}")
    status = page.get_by_text(re.compile(rf"^({'|'.join(TERMINAL_RUN_STATUSES)})$")).first
    status.wait_for(timeout=timeout_s * 1000)
    return status.inner_text().strip()
