"""The page at / in real Chromium against the real stack (the built-in phantom model, so the
screenshots show a real edit): upload, submit, follow, see the result."""

import httpx
import numpy as np
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from phantoms.bench import bench_case
from phantoms.captions import explicit_caption
from phantoms.render import render
from tests.api.test_docs_pages import _screenshot
from tests.browser import chromium, foreign, requested_urls
from tests.helpers import write_png
from tests.stack import STALL_S


def _set(driver, element_id: str, value: str) -> None:
    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(value)


def test_upload_submit_follow_and_compare(builtin_service, tmp_path):
    service = builtin_service
    anatomy, source, target, _ = bench_case("remove_devices", 0, 128)
    image = write_png(tmp_path / "phantom.png", render(anatomy, source)[:, 12:116])  # 128 x 104, portrait
    with chromium() as driver:
        wait = WebDriverWait(driver, STALL_S)
        driver.get(service.url + "/")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
        assert "Research use only, not for diagnosis" in driver.find_element(By.ID, "disclaimer").text
        assert driver.find_element(By.ID, "key-fieldset").get_attribute("hidden")  # keys are off here
        _screenshot(driver, "page-before.png", tmp_path)

        driver.find_element(By.ID, "image").send_keys(str(image))
        wait.until(lambda d: d.find_element(By.ID, "preview").get_attribute("data-ready") == "true")
        _set(driver, "original_prompt", explicit_caption(source))
        _set(driver, "edit_prompt", explicit_caption(target))
        driver.find_element(By.CSS_SELECTOR, "#advanced summary").click()
        assert driver.find_element(By.ID, "opt-steps").get_attribute("value") == "50"  # the API's default
        assert Select(driver.find_element(By.ID, "opt-inversion")).first_selected_option.text == "null_text"
        _set(driver, "opt-steps", "10")
        _set(driver, "opt-self_replace_steps", "0.4,0.8")
        _set(driver, "opt-blend_words", "support devices")
        driver.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_element(By.ID, "results").get_attribute("hidden") is None)

        job_id = driver.find_element(By.ID, "results").get_attribute("data-job")
        status = httpx.get(f"{service.url}/jobs/{job_id}").json()
        assert status["status"] == "succeeded"
        size = driver.execute_script(
            "const i = document.getElementById('counterfactual-img'); return [i.naturalWidth, i.naturalHeight];"
        )
        assert size == [104, 128]
        assert driver.find_element(By.ID, "score-value").text == f"{status['result']['s_clip']:.3f}"
        candidates = driver.find_elements(By.CSS_SELECTOR, "#candidates tr")
        assert [row.find_elements(By.TAG_NAME, "td")[0].text for row in candidates] == ["0.4", "0.8"]
        links = [a.text for a in driver.find_elements(By.CSS_SELECTOR, "#files a")]
        assert sorted(links) == sorted(status["result"]["files"])
        driver.find_element(By.ID, "zoom-in").click()
        transforms = driver.execute_script(
            "return [...document.querySelectorAll('.viewport img')].map(i => i.style.transform);"
        )
        assert len(set(transforms)) == 1 and "scale" in transforms[0]  # the three views zoom together
        driver.find_element(By.ID, "zoom-reset").click()
        driver.find_element(By.CSS_SELECTOR, "#advanced summary").click()
        _screenshot(driver, "page-after.png", tmp_path)

        _set(driver, "original_prompt", " ")
        driver.find_element(By.ID, "submit").click()
        wait.until(lambda d: "original_prompt" in d.find_element(By.ID, "message").text)
        assert "Some fields need a change" in driver.find_element(By.ID, "message").text
        urls = requested_urls(driver)
    assert foreign(urls, service.url) == []
    assert any(u.endswith("/counterfactual") for u in urls)


def test_findings_form_and_dicom_preview(builtin_service, tmp_path):
    service = builtin_service
    from tests.dicom_files import encode, radiograph

    ds, _ = radiograph(bits_stored=12, photometric="MONOCHROME1")
    dicom = tmp_path / "study.dcm"
    dicom.write_bytes(encode(ds))
    with chromium() as driver:
        wait = WebDriverWait(driver, STALL_S)
        driver.get(service.url + "/")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
        driver.find_element(By.ID, "image").send_keys(str(dicom))
        wait.until(lambda d: d.find_element(By.ID, "preview").get_attribute("data-ready") == "true")
        assert "DICOM" in driver.find_element(By.ID, "preview-caption").text
        preview = driver.execute_script(
            "const i = document.getElementById('preview'); return [i.naturalWidth, i.naturalHeight];"
        )
        assert preview == [40, 48]
        driver.find_element(By.CSS_SELECTOR, 'input[name="mode"][value="findings"]').click()
        Select(driver.find_element(By.ID, "f-support-devices")).select_by_value("1")
        Select(driver.find_element(By.ID, "e-support-devices")).select_by_value("0")
        driver.find_element(By.CSS_SELECTOR, "#advanced summary").click()
        _set(driver, "opt-steps", "3")
        _set(driver, "opt-self_replace_steps", "0.5")
        driver.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_element(By.ID, "results").get_attribute("hidden") is None)
        job_id = driver.find_element(By.ID, "results").get_attribute("data-job")
        links = [a.text for a in driver.find_elements(By.CSS_SELECTOR, "#files a")]
    status = httpx.get(f"{service.url}/jobs/{job_id}").json()
    assert status["prompts"]["original_prompt"] == "Chest X-ray showing Support Devices"
    assert "counterfactual.dcm" in links and np.isfinite(status["result"]["s_clip"])
