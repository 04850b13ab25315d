"""depio.state's HTML report: self-contained, one bar per task (or per bucket above the limit), the
failures with their log tails, checked in a real headless Chromium (Debian's chromium and
chromium-driver, driven by selenium); skipped when those are missing unless DEPIO_REQUIRE_BROWSER=1."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import List

import pytest

from depio.state import RunTask, StateStore
from depio.state.report import timeline, write_report

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def synthetic_run(store: StateStore, n: int, workers: int, log_dir: Path, failing=()) -> str:
    """A run of n tasks spread over `workers` workers on two hosts; tasks in `failing` FAILED and left
    a 60-line stderr log (the report shows its tail)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    run = store.begin_run("pipeline.py", log_dir=log_dir)
    t0 = store.run(run)["start"]
    tasks: List[RunTask] = []
    for i in range(n):
        seq, name = i + 1, f"task_{i}"
        start = t0 + (i // workers) * 0.05
        status = "FAILED" if i in failing else "FINISHED"
        if status == "FAILED":
            lines = [f"{name} line {k}" for k in range(60)] + [f"ValueError: {name} broke"]
            (log_dir / f"{seq}-{name}.err").write_text("\n".join(lines) + "\n")
        tasks.append(RunTask(seq, "", name, status, start, start + 0.04 + (i % 7) * 0.01, f"w{i % workers}",
                             f"node{i % 2}", "", 1, "error: ValueError" if status == "FAILED" else ""))
    store.record_run_tasks(run, tasks)
    store.record_run_tasks(run, [RunTask(n + 1, "", "never_started", "DEPFAILED")])
    store.end_run(run)
    return run


@pytest.fixture
def store(tmp_path):
    s = StateStore(tmp_path / "state.sqlite")
    yield s
    s.close()


def test_small_run_has_one_bar_per_task_and_the_failures(tmp_path, store):
    run = synthetic_run(store, 30, 3, tmp_path / "logs" / "r1", failing={4, 17})
    page = write_report(store, run, tmp_path / "r.html").read_text()
    assert "data-bars='30'" in page and "task_4 line 59" in page and "task_4 line 5\n" not in page
    assert "ValueError: task_17 broke" in page and "never started" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)                 # nothing fetched
    assert write_report(store, None, tmp_path / "latest.html").read_text() == page


def test_large_runs_are_aggregated_into_buckets():
    tasks = [RunTask(i, "", f"t{i}", "FAILED" if i == 5 else "FINISHED", 100 + i * 0.01, 100 + i * 0.01 + 0.5,
                     f"w{i % 16}") for i in range(20_000)]
    data = timeline(tasks, 100.0, bar_limit=2000)
    assert data["aggregated"] and 0 < len(data["bars"]) <= 2000
    assert sum(b[4] for b in data["bars"]) == 20_000
    worst = [b for b in data["bars"] if b[5].get("FAILED")]
    assert len(worst) == 1 and data["statuses"][worst[0][3]] == "FAILED"
    assert not timeline(tasks[:2000], 100.0, bar_limit=2000)["aggregated"]


def test_unknown_run_raises(tmp_path, store):
    with pytest.raises(KeyError):
        write_report(store, None, tmp_path / "x.html")
    store.begin_run("p.py")
    with pytest.raises(KeyError):
        write_report(store, "nope", tmp_path / "x.html")


def _browser_or_skip():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        if os.environ.get("DEPIO_REQUIRE_BROWSER") == "1":
            pytest.fail(f"DEPIO_REQUIRE_BROWSER=1 but missing: {', '.join(missing)}")
        pytest.skip(f"no headless browser: missing {', '.join(missing)} (apt-get install chromium "
                    f"chromium-driver; pip install selenium)")


@pytest.fixture
def browser(tmp_path):
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _open(driver, path: Path) -> None:
    driver.get(path.resolve().as_uri())
    driver.execute_script("return document.readyState")
    severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, severe


@pytest.mark.timeout(300)
def test_reports_in_a_headless_browser(tmp_path, store, browser):
    from selenium.webdriver.common.by import By
    small = synthetic_run(store, 30, 3, tmp_path / "logs" / "small", failing={4, 17})
    big = synthetic_run(store, 20_000, 16, tmp_path / "logs" / "big", failing={123})
    small_page = write_report(store, small, tmp_path / "small.html")
    big_page = write_report(store, big, tmp_path / "big.html")

    _open(browser, small_page)
    assert browser.execute_script("return document.querySelectorAll('svg rect.bar').length") == 30
    assert browser.execute_script("return document.querySelectorAll('rect.bucket').length") == 0
    names = browser.execute_script("return Array.from(document.querySelectorAll('rect.bar'), r => r.dataset.task)")
    assert sorted(names) == sorted(f"task_{i}" for i in range(30))
    failures = browser.find_elements(By.CSS_SELECTOR, ".failure")
    assert [f.get_attribute("data-task") for f in failures] == ["task_4", "task_17"]
    for f, name in zip(failures, ("task_4", "task_17")):
        assert f.is_displayed()
        text = f.text
        assert name in text and f"ValueError: {name} broke" in text and f"{name} line 59" in text
        assert f"{name} line 10\n" not in text                                   # only the tail

    _open(browser, big_page)
    said = int(browser.find_element(By.ID, "timeline-note").get_attribute("data-bars"))
    note = browser.find_element(By.ID, "timeline-note").text
    assert f"20,000 tasks are drawn as {said:,} bars" in note
    drawn = browser.execute_script("return document.querySelectorAll('svg rect.bar.bucket').length")
    assert drawn == said and 0 < said <= 2000
    assert browser.execute_script(
        "return Array.from(document.querySelectorAll('rect.bucket'), r => +r.dataset.count).reduce((a, b) => a + b, 0)"
    ) == 20_000
    failure = browser.find_element(By.CSS_SELECTOR, ".failure")
    assert failure.is_displayed() and "ValueError: task_123 broke" in failure.text
