"""The playground page (`GET /`) in a real headless browser (Debian's chromium through Selenium and
chromedriver) against the gateway and a scripted upstream: a person types a question and watches
the reasoning, the code, its output, a figure and a file link stream in."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from ..fake_upstream import FakeUpstream, code_call, last_tool_output
from .test_gateway import Running

CODE = ("import matplotlib.pyplot as plt\n"
        "xs = list(range(11))\n"
        "plt.plot(xs, [x * x for x in xs])\n"
        "plt.show()\n"
        "open('squares.csv', 'w').write('\\n'.join(f'{x},{x * x}' for x in xs))\n"
        "print('sum of squares:', sum(x * x for x in xs))")


@pytest.fixture
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    assert chromium and driver_path, "the playground test needs Debian's chromium and chromium-driver (.ci/run installs them)"
    # The browser's profile and its temp files (singleton sockets) go into a dir of this test's own,
    # removed afterwards: nothing of it stays in /tmp.
    before = set(glob.glob("/tmp/org.chromium.*"))  # (other browsers on the machine are not ours to judge)
    with tempfile.TemporaryDirectory(prefix="jailcell-browser-") as home:
        options = Options()
        options.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1200,900", f"--user-data-dir={home}/profile"):
            options.add_argument(arg)
        service = Service(driver_path, env={**os.environ, "TMPDIR": home})
        driver = webdriver.Chrome(service=service, options=options)
        try:
            yield driver
        finally:
            driver.quit()
    assert not set(glob.glob("/tmp/org.chromium.*")) - before


def test_the_playground_streams_reasoning_code_output_image_and_files(browser):
    up = FakeUpstream([
        {"role": "assistant", "reasoning_content": "I will compute the squares and plot them.", "content": None,
         "tool_calls": [code_call("c1", CODE)]},
        lambda body: {"role": "assistant", "content": "Done: " + last_tool_output(body).split("\n")[1]},
    ], models=["fake-model"])
    g = Running(up.url, policy="standard")
    try:
        browser.get(g.base + "/#key=anything")  # as the start line prints it
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
        browser.find_element(By.ID, "question").send_keys("Plot y = x^2 for x in 0..10 and save the points")
        browser.find_element(By.ID, "send").click()

        answer = wait.until(lambda d: next((a for a in d.find_elements(By.CSS_SELECTOR, ".answer")
                                            if a.text.startswith("Done")), None))
        assert answer.text == "Done: sum of squares: 385"
        assert browser.find_element(By.CSS_SELECTOR, ".question").text.startswith("Plot y = x^2")
        assert browser.find_element(By.CSS_SELECTOR, ".reasoning pre").text == "I will compute the squares and plot them."
        assert browser.find_element(By.CSS_SELECTOR, ".cell .code").text == CODE
        assert browser.find_element(By.CSS_SELECTOR, ".cell .status").text == "completed"
        assert "sum of squares: 385" in browser.find_element(By.CSS_SELECTOR, ".cell .output").text
        image = browser.find_element(By.CSS_SELECTOR, ".cell img")
        assert image.get_attribute("src").startswith("data:image/png;base64,")
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 100

        link = wait.until(lambda d: next(iter(d.find_elements(By.CSS_SELECTOR, ".files a")), None))
        size = len("\n".join(f"{x},{x * x}" for x in range(11)))
        assert link.text == f"squares.csv ({size} bytes)"
        downloaded = browser.execute_script(
            "return await (await fetch(arguments[0], {headers: {Authorization: 'Bearer ' + "
            "sessionStorage.getItem('jailcell-key')}})).text()", link.get_attribute("href"))
        assert downloaded.splitlines()[-1] == "10,100"
        assert up.requests[0]["model"] == "fake-model"  # the page used the upstream's listed model
    finally:
        g.close()
        up.close()
