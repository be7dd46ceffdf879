"""The dashboard in a real browser: Debian's chromium + chromium-driver, driven by Selenium.

Logs in through the form, opens the overview and a finished job, checks that the overlay
PNGs load (naturalWidth > 0) and that screenshots of both pages are not blank.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from node_support import free_port
from radnode.web.server import DashboardServer
from web_support import PASSWORD, make_node_data

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1280,1600",
)


def _browser(profile: Path) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    # Debian's driver, not one Selenium Manager would download.
    return webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver") or "chromedriver"))


def _not_blank(png: Path) -> float:
    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    return float(pixels.std())


def test_log_in_open_a_finished_job_and_see_its_overlays(tmp_path: Path) -> None:
    node = make_node_data(tmp_path, dashboard={"host": "127.0.0.1", "port": free_port()})
    server = DashboardServer(node.settings)
    server.start()
    browser = _browser(tmp_path / "chromium-profile")
    try:
        wait = WebDriverWait(browser, 20)
        browser.get(server.url + f"jobs/{node.done_job}")  # not logged in: the form, then back here
        wait.until(EC.presence_of_element_located((By.ID, "username"))).send_keys("viewer")
        browser.find_element(By.ID, "password").send_keys(PASSWORD)
        browser.find_element(By.ID, "login").click()
        wait.until(EC.presence_of_element_located((By.ID, "demo-label")))
        assert browser.current_url.endswith(f"/jobs/{node.done_job}")
        assert "demo — not for clinical use" in browser.find_element(By.ID, "demo-label").text
        images = browser.find_elements(By.CSS_SELECTOR, "img.overlay")
        assert len(images) == 4
        wait.until(lambda b: all(b.execute_script("return arguments[0].complete", img) for img in images))
        widths = [browser.execute_script("return arguments[0].naturalWidth", img) for img in images]
        assert all(w > 0 for w in widths), widths
        job_png = tmp_path / "job.png"
        browser.save_screenshot(str(job_png))

        browser.get(server.url)
        wait.until(EC.presence_of_element_located((By.ID, "live")))
        assert "Destinations" in browser.page_source and "pacs" in browser.page_source
        overview_png = tmp_path / "overview.png"
        browser.save_screenshot(str(overview_png))
    finally:
        browser.quit()
        server.stop()
    for png in (job_png, overview_png):
        assert _not_blank(png) > 5.0, png  # a blank page is one flat colour
    print(f"\nscreenshots: {job_png} {overview_png}; overlay widths {widths}")


def test_a_reviewer_approves_for_the_planning_system_and_rejects_another_job(tmp_path: Path) -> None:
    """Orthanc stands in for the TPS (``requires_approval``) and the PACS: the reviewer leaves
    the tumour out and approves one job, rejects another; the TPS then holds exactly one
    RTSTRUCT, APPROVED by the reviewer, without the tumour."""
    import io

    import pydicom

    from radnode.pipeline.dispatch import Dispatcher
    from radnode.pipeline.jobs import JobSpec
    from radnode.pipeline.outbox import Outbox
    from radnode.pipeline.queue import SQLiteJobQueue
    from radnode.testing.orthanc import OrthancServer
    from web_support import stage_for_review

    with OrthancServer(aet="PACS") as pacs, OrthancServer(aet="TPS") as tps:
        destinations = [
            {"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port},
            {"name": "tps", "ae_title": tps.aet, "host": "127.0.0.1", "port": tps.dicom_port, "objects": ["RTSTRUCT", "SEG"],
             "requires_approval": True},
        ]
        node = make_node_data(tmp_path, dashboard={"host": "127.0.0.1", "port": free_port()}, destinations=destinations)
        other = SQLiteJobQueue.in_data_dir(node.data_dir).enqueue(
            JobSpec(series_uid=node.series_uid, input_path=node.phantom / "ct", pipeline_version="other"))
        original = stage_for_review(node)
        stage_for_review(node, other.id)
        dispatcher = Dispatcher(Outbox(node.data_dir), node.settings)
        dispatcher.run_once()

        def tps_rtstructs() -> list[pydicom.Dataset]:
            found = [pydicom.dcmread(io.BytesIO(tps.instance_file(i["MainDicomTags"]["SOPInstanceUID"])))
                     for i in tps.instances()]
            return [ds for ds in found if ds.Modality == "RTSTRUCT"]

        assert tps_rtstructs() == [] and len(pacs.instances()) == 4  # the PACS is not gated

        server = DashboardServer(node.settings)
        server.start()
        browser = _browser(tmp_path / "chromium-profile")
        try:
            wait = WebDriverWait(browser, 20)
            browser.get(server.url + f"jobs/{node.done_job}")
            wait.until(EC.presence_of_element_located((By.ID, "username"))).send_keys("reviewer")
            browser.find_element(By.ID, "password").send_keys(PASSWORD)
            browser.find_element(By.ID, "login").click()
            wait.until(EC.presence_of_element_located((By.ID, "review-form")))
            images = browser.find_elements(By.CSS_SELECTOR, "img.overlay")
            wait.until(lambda b: all(b.execute_script("return arguments[0].complete", img) for img in images))
            assert images and all(browser.execute_script("return arguments[0].naturalWidth", i) > 0 for i in images)
            review_png = tmp_path / "job-review.png"
            browser.save_screenshot(str(review_png))
            tumour = browser.find_element(By.CSS_SELECTOR, "input[name=reject][value=Tumour]")
            tumour.click()
            browser.find_element(By.ID, "comment").send_keys("lungs fine; GTV redrawn by hand")
            browser.find_element(By.ID, "approve").click()
            decision = wait.until(EC.presence_of_element_located((By.ID, "review-decision"))).text
            assert "approved by reviewer" in decision and "left out: Tumour" in decision
            approved_png = tmp_path / "job-approved.png"
            browser.save_screenshot(str(approved_png))

            browser.get(server.url + f"jobs/{other.id}")
            wait.until(EC.presence_of_element_located((By.ID, "comment"))).send_keys("motion artefact")
            browser.find_element(By.ID, "reject").click()
            assert "motion artefact" in wait.until(EC.presence_of_element_located((By.ID, "review-decision"))).text

            browser.get(server.url)
            wait.until(EC.presence_of_element_located((By.ID, "live")))
            overview_png = tmp_path / "overview-reviewed.png"
            browser.save_screenshot(str(overview_png))
        finally:
            browser.quit()
            server.stop()
        for _ in range(2):
            dispatcher.run_once()
        (sent,) = tps_rtstructs()
        assert sent.ApprovalStatus == "APPROVED" and str(sent.ReviewerName) == "reviewer"
        assert sent.SOPInstanceUID != original["RTSTRUCT"]
        assert [str(r.ROIName) for r in sent.StructureSetROISequence] == ["Lung right", "Lung left"]
        assert "GTV redrawn by hand" in sent.StructureSetDescription
        assert len(tps.instances()) == 1  # the SEG carries the rejected tumour: withheld; the rejected job: nothing
    for png in (review_png, approved_png, overview_png):
        assert _not_blank(png) > 5.0, png
    print(f"\nscreenshots: {review_png} {approved_png} {overview_png}")
