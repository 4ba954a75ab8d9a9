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


def _shown(driver, element_id: str) -> str:
    """The text of an element when it is shown, else ''."""
    element = driver.find_element(By.ID, element_id)
    return element.text if element.get_attribute("hidden") is None else ""


def test_errors_sit_at_their_field_and_clear_when_it_changes(builtin_service, tmp_path):
    from tests.dicom_files import encode, grey_in_colour, radiograph

    colour = tmp_path / "colour.dcm"
    colour.write_bytes(encode(grey_in_colour(*radiograph(bits_stored=8), tint=60)))
    grey = write_png(tmp_path / "grey.png", np.linspace(0, 1, 48 * 40, dtype=np.float32).reshape(48, 40))
    with chromium() as driver:
        wait = WebDriverWait(driver, STALL_S)
        driver.get(builtin_service.url + "/")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
        for name in ("original_prompt", "edit_prompt"):  # an example is a hint, not a value that looks given
            assert driver.find_element(By.ID, name).get_attribute("placeholder") in (None, "")
            assert "For example" in driver.find_element(By.ID, f"hint-{name}").text

        # a refused DICOM: its reason at the image, no preview left behind, and Generate keeps the reason
        driver.find_element(By.ID, "image").send_keys(str(colour))
        wait.until(lambda d: "colour image" in _shown(d, "error-image"))
        assert driver.find_element(By.ID, "preview-figure").get_attribute("hidden") is not None
        assert driver.find_element(By.ID, "preview").get_attribute("src") in (None, "")
        driver.find_element(By.ID, "submit").click()
        assert "colour image" in _shown(driver, "error-image")
        assert "Choose an image first" not in driver.find_element(By.ID, "message").text

        # a good image clears it; an empty prompt is named at its field and cleared by typing one
        driver.find_element(By.ID, "image").send_keys(str(grey))
        wait.until(lambda d: d.find_element(By.ID, "preview").get_attribute("data-ready") == "true")
        assert _shown(driver, "error-image") == ""
        _set(driver, "edit_prompt", "chest x-ray of a patient without support devices")
        driver.find_element(By.ID, "submit").click()
        assert "Required" in _shown(driver, "error-original_prompt") and _shown(driver, "error-edit_prompt") == ""
        assert driver.find_element(By.ID, "original_prompt").get_attribute("aria-invalid") == "true"
        _set(driver, "original_prompt", "chest x-ray of a patient with support devices")
        assert _shown(driver, "error-original_prompt") == "" and driver.find_element(By.ID, "message").text == ""

        # the service's 422 for an advanced field lands at that field, and clears when it is edited
        driver.find_element(By.CSS_SELECTOR, "#advanced summary").click()
        _set(driver, "opt-self_replace_steps", "0.4,2")
        driver.find_element(By.ID, "submit").click()
        wait.until(lambda d: _shown(d, "error-self_replace_steps") != "")
        assert "Some fields need a change" in driver.find_element(By.ID, "message").text
        _set(driver, "opt-self_replace_steps", "0.5")
        assert _shown(driver, "error-self_replace_steps") == "" and driver.find_element(By.ID, "message").text == ""
