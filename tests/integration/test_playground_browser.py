"""The playground page in headless Chromium on the real engine (the session's server): a
best-of-4 answer's ranked candidates and KL numbers against the API's for the same seeded
request, speculative rejection's pruning picture next to best-of-n in compare mode, and an API
error shown as the API's message.

The compare-mode screenshot goes to a temporary folder; with UPDATE_PLAYGROUND_SCREENSHOT=1 it
replaces docs/playground.png (the README's picture)."""

from __future__ import annotations

import json
import math
import os
import shutil

import httpx
import pytest
from live import ROOT

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
RUN_TIMEOUT_MS = 300_000  # a request on 2 shared CPU cores
SCREENSHOT_MAX_BYTES = 300_000


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM)
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        pg.csp_errors = []
        pg.on("console", lambda m: pg.csp_errors.append(m.text)
              if "Content Security Policy" in m.text else None)
        pg.set_default_timeout(60_000)
        pg.goto(f"{server.base_url}/playground")
        pg.wait_for_selector("body[data-ready='1']")
        yield pg
        browser.close()


def run(page, side: str = "a") -> dict:
    page.click("#run")
    page.wait_for_selector(f"#result-{side}[data-state=done], #result-{side}[data-state=error]",
                           timeout=RUN_TIMEOUT_MS)
    return json.loads(page.get_attribute(f"#result-{side}", "data-request"))


def api(server, body: dict) -> httpx.Response:
    """The page's exact request, sent by a plain client (unstreamed: same seed, same answer)."""
    return httpx.post(f"{server.base_url}/v1/chat/completions", json={**body, "stream": False},
                      timeout=300)


def screenshot(page, out):
    """The whole page as a commit-sized PNG: a 64-colour palette (flat UI colours survive it)."""
    from PIL import Image

    page.screenshot(path=str(out), full_page=True)
    with Image.open(out) as im:
        small = im.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    small.save(out, optimize=True)
    return out


def shown(page, side: str, key: str) -> str | None:
    return page.get_attribute(f"#result-{side} .summary [data-key='{key}']", "data-value")


def test_best_of_4_ranked_candidates_and_the_apis_kl(page, server):
    page.select_option("#strategy-a", "best_of_n")
    page.fill("#options-a [data-name=n]", "4")
    page.fill("#seed", "1234")
    page.fill("#max-tokens", "32")
    body = run(page)
    assert page.get_attribute("#result-a", "data-state") == "done"
    rows = page.query_selector_all("#result-a .candidates tbody tr")
    assert len(rows) == 4
    assert len(page.query_selector_all("#result-a .candidates tr.chosen")) == 1
    assert rows[0].get_attribute("class") == "chosen"  # best-of-n returns the top objective
    a = api(server, body).json()
    info = a["alignment"]
    assert page.text_content("#result-a .answer") == a["choices"][0]["message"]["content"]
    assert float(shown(page, "a", "kl_bound")) == info["kl_bound"] == \
        pytest.approx(math.log(4) - 3 / 4)
    assert float(shown(page, "a", "kl_estimate")) == info["kl_estimate"]
    assert float(shown(page, "a", "win_rate_bound")) == info["win_rate_bound"] == 0.8
    assert float(shown(page, "a", "reward")) == info["reward"]
    rewards = sorted(float(c["reward"]) for c in info["candidates"])
    assert [float(r.query_selector_all("td")[3].text_content()) for r in rows] == \
        pytest.approx(rewards[::-1], abs=1e-4)  # shown to 4 decimals, best first


def test_compare_best_of_n_with_speculative_rejection_and_its_pruning(page, server, tmp_path):
    page.check("#compare")
    page.select_option("#strategy-b", "speculative_rejection")
    page.fill("#options-b [data-name=n]", "8")
    page.fill("#options-b [data-name=decision_tokens]", "8")
    page.click("#run")
    page.wait_for_selector("#result-b[data-state=done], #result-b[data-state=error]",
                           timeout=RUN_TIMEOUT_MS)
    assert page.get_attribute("#result-b", "data-state") == "done"
    body = json.loads(page.get_attribute("#result-b", "data-request"))
    info = api(server, body).json()["alignment"]
    pruning = "#result-b .pruning"
    assert len(page.query_selector_all(f"{pruning} .track")) == 8
    assert len(page.query_selector_all(f"{pruning} .track.chosen")) == 1
    decisions = page.query_selector_all(f"{pruning} line.decision")
    assert len(decisions) == len(info["rejected"]) == info["rounds"] - 1 >= 1
    pruned = len(page.query_selector_all(f"{pruning} .track.pruned"))
    assert pruned + bool(info.get("chosen_rejected")) == sum(info["rejected"])
    row = page.eval_on_selector("#compare-table [data-key=strategy]",
                                "r => [...r.cells].map(c => c.textContent)")
    assert row == ["strategy", "best_of_n", "speculative_rejection"]
    assert float(shown(page, "b", "kl_bound")) == pytest.approx(math.log(8))
    out = screenshot(page, tmp_path / "playground.png")
    assert 0 < out.stat().st_size < SCREENSHOT_MAX_BYTES
    if os.environ.get("UPDATE_PLAYGROUND_SCREENSHOT") == "1":
        shutil.copyfile(out, ROOT / "docs" / "playground.png")
    page.uncheck("#compare")


def test_a_bad_option_shows_the_apis_message(page, server):
    page.select_option("#strategy-a", "speculative_rejection")
    page.fill("#options-a [data-name=alpha]", "1.5")
    body = run(page)
    error = api(server, body).json()["error"]
    assert error["message"] in page.text_content("#result-a .error")
    assert "alpha" in page.text_content("#result-a .error")


def test_nothing_was_blocked_by_the_pages_csp(page):
    assert page.csp_errors == []
