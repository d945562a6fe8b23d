"""The playground page in headless Chromium (Playwright) against the real app on the fakes:
the key flow, the ranked candidates, speculative rejection's pruning picture, compare mode,
the copy buttons and an API error, all under the page's own Content-Security-Policy.

Chromium is Debian's (/usr/bin/chromium; scripts/install.sh installs it with the dev extras).
The real-engine run is tests/integration/test_playground_browser.py."""

from __future__ import annotations

import json
import math
import threading

import httpx
import pytest
import uvicorn
from fakes import FakeEngine, make_app

KEY = "page-test-key-1"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def base_url():
    app = make_app(FakeEngine(seed=3), api_keys=KEY)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    started = threading.Event()
    while not started.wait(0.02):  # uvicorn sets `started` once its socket listens
        if server.started:
            started.set()
        assert thread.is_alive(), "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def page(base_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM)
        context = browser.new_context(permissions=["clipboard-read", "clipboard-write"])
        pg = context.new_page()
        pg.csp_errors = []
        pg.on("console", lambda m: pg.csp_errors.append(m.text)
              if "Content Security Policy" in m.text else None)
        pg.set_default_timeout(30_000)
        pg.goto(f"{base_url}/playground")
        yield pg
        browser.close()


def api(base_url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/chat/completions", json={**body, "stream": False},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def run(page, side: str = "a") -> dict:
    page.click("#run")
    page.wait_for_selector(f"#result-{side}[data-state=done], #result-{side}[data-state=error]")
    return json.loads(page.get_attribute(f"#result-{side}", "data-request"))


def set_option(page, side: str, name: str, value: str) -> None:
    page.fill(f"#options-{side} [data-name={name}]", value)


def test_without_a_key_the_page_says_so_and_loads_once_given_one(page):
    page.wait_for_selector("#status.bad")  # (wait_for_function would need eval: the CSP says no)
    assert "missing API key" in page.text_content("#status")
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    page.wait_for_selector("body[data-ready='1']")
    strategies = page.eval_on_selector_all("#strategy-a option", "os => os.map(o => o.value)")
    assert {"best_of_n", "speculative_rejection", "blockwise_cd", "tokenwise_cd"} <= set(strategies)
    assert page.input_value("#model") == "fake"


def test_best_of_n_shows_ranked_candidates_with_the_chosen_one_marked(page, base_url):
    page.select_option("#strategy-a", "best_of_n")
    set_option(page, "a", "n", "4")
    page.fill("#seed", "7")
    page.fill("#max-tokens", "12")
    body = run(page)
    assert body["alignment"] == {"strategy": "best_of_n", "n": 4, "return_candidates": True}
    rows = page.query_selector_all("#result-a .candidates tbody tr")
    assert len(rows) == 4
    chosen = page.query_selector_all("#result-a .candidates tr.chosen")
    assert len(chosen) == 1 and rows[0].get_attribute("class") == "chosen"
    objectives = [float(r.get_attribute("data-objective")) for r in rows]
    assert objectives == sorted(objectives, reverse=True)  # ranked, best first
    # The answer shown is the chosen candidate's text, and the numbers are the API's.
    a = api(base_url, body).json()
    assert page.text_content("#result-a .answer") == a["choices"][0]["message"]["content"]
    for key in ("kl_bound", "kl_estimate", "win_rate_bound", "reward"):
        shown = page.get_attribute(f"#result-a .summary [data-key='{key}']", "data-value")
        assert float(shown) == pytest.approx(a["alignment"][key], rel=1e-12)
    assert a["alignment"]["kl_bound"] == pytest.approx(math.log(4) - 3 / 4)


def test_speculative_rejection_draws_tracks_over_decision_points(page):
    page.select_option("#strategy-a", "speculative_rejection")
    set_option(page, "a", "n", "8")
    set_option(page, "a", "decision_tokens", "3")
    page.fill("#max-tokens", "24")
    run(page)
    pruning = "#result-a .pruning"
    page.wait_for_selector(f"{pruning} svg")
    tracks = page.query_selector_all(f"{pruning} .track")
    pruned = page.query_selector_all(f"{pruning} .track.pruned")
    assert len(tracks) == 8 and len(page.query_selector_all(f"{pruning} .track.chosen")) == 1
    points = page.query_selector_all(f"{pruning} line.decision")
    cells = page.eval_on_selector_all(f"{pruning} table.points tbody tr",
                                      "rs => rs.map(r => [...r.cells].map(c => c.textContent))")
    assert len(points) == len(cells) >= 1
    # a track rejected after it finished stays eligible: it may be the answer (drawn as chosen)
    chosen_rejected = page.get_attribute("#result-a .summary [data-key=chosen_rejected]",
                                         "data-value") == "true"
    assert len(pruned) + chosen_rejected == sum(int(c[4]) for c in cells) > 0
    assert cells[0][1] == "3" and cells[0][2] == "8"  # first point: 3 tokens, pool of 8
    pruned_rows = page.query_selector_all("#result-a .candidates tr.pruned")
    assert len(pruned_rows) == len(pruned)


def test_compare_mode_puts_two_strategies_side_by_side(page):
    page.check("#compare")
    page.select_option("#strategy-a", "best_of_n")
    set_option(page, "a", "n", "4")
    page.select_option("#strategy-b", "soft_best_of_n")
    set_option(page, "b", "n", "4")
    page.click("#run")
    page.wait_for_selector("#result-b[data-state=done]")
    page.wait_for_selector("#compare-box:not([hidden])")
    row = page.eval_on_selector("#compare-table [data-key=strategy]",
                                "r => [...r.cells].map(c => c.textContent)")
    assert row == ["strategy", "best_of_n", "soft_best_of_n"]
    assert page.query_selector_all("#compare-table [data-key=kl_bound] td")
    # soft best-of-n lists each candidate's selection probability, summing to 1
    header = page.eval_on_selector_all("#result-b .candidates th", "hs => hs.map(h => h.textContent)")
    col = header.index("p(select)")
    probs = page.eval_on_selector_all(
        "#result-b .candidates tbody tr", f"rs => rs.map(r => Number(r.cells[{col}].textContent))")
    assert sum(probs) == pytest.approx(1.0, abs=0.01)
    page.uncheck("#compare")


def test_copy_buttons_give_the_exact_request(page, base_url):
    page.select_option("#strategy-a", "best_of_n")
    page.click("#copy-curl")
    curl = page.text_content("#code")
    assert curl.startswith(f"curl -sN {base_url}/v1/chat/completions")
    sent = json.loads(curl.split("-d '", 1)[1].rstrip("'"))
    assert sent["alignment"]["strategy"] == "best_of_n" and sent["seed"] == 7
    assert page.evaluate("navigator.clipboard.readText()") == curl
    page.click("#copy-python")
    code = page.text_content("#code")
    assert "from openai import OpenAI" in code and '"strategy": "best_of_n"' in code
    assert "extra_body=" in code and "return_candidates" in code and "True" in code
    compile(code, "<copied>", "exec")  # valid Python


def test_a_bad_option_shows_the_apis_message(page, base_url):
    page.select_option("#strategy-a", "speculative_rejection")
    set_option(page, "a", "alpha", "1.5")
    body = run(page)
    message = api(base_url, body).json()["error"]["message"]
    shown = page.text_content("#result-a .error")
    assert message in shown and "alpha" in shown
    assert page.get_attribute("#result-a", "data-state") == "error"


def _canned(page, alignment: dict, content: str) -> None:
    """Answer the page's next chat request with `alignment` (a trace shape the strategies may
    report) instead of the server's."""
    body = {"id": "x", "object": "chat.completion", "created": 0, "model": "fake",
            "choices": [{"index": 0, "finish_reason": "stop", "alignment": alignment,
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            "alignment": alignment}
    page.route("**/v1/chat/completions", lambda route: route.fulfill(json=body))


def _cand(text: str, reward: float, tokens: int, finish: str | None = "stop") -> dict:
    return {"text": text, "reward": reward, "cost": None, "tokens": tokens, "logprob": -1.0,
            "finish_reason": finish, "token_ids": list(range(tokens))}


ACCOUNTING = {"kl_bound": 1.0, "kl_estimate": None, "win_rate_bound": 0.8, "generated_tokens": 9,
              "scored_candidates": 4, "latency": {"generate_s": 0.1, "score_s": 0.1, "total_s": 0.2}}


def test_reported_decision_points_are_drawn_as_reported(page):
    page.uncheck("#stream")
    page.select_option("#strategy-a", "speculative_rejection")
    page.fill("#options-a [data-name=alpha]", "")
    _canned(page, {"strategy": "speculative_rejection", "n": 4, **ACCOUNTING, "rounds": 2,
                   "rejected": [2], "decision_points": [
                       {"tokens": 4, "pool": 4, "kept": 2, "pruned": [1, 3],
                        "scores": [[0, 0.5], [1, 0.1], [2, 0.7], [3, 0.2]]}],
                   "candidates": [_cand("a b c", 1.0, 3), _cand("d e f g", 0.0, 5, None),
                                  _cand("best one", 2.0, 2), _cand("h i j k", 0.0, 4, None)]},
            "best one")
    try:
        run(page)
    finally:
        page.unroute("**/v1/chat/completions")
    pruned = page.eval_on_selector_all("#result-a .pruning .track.pruned",
                                       "gs => gs.map(g => g.dataset.track).sort()")
    assert pruned == ["1", "3"]
    assert page.get_attribute("#result-a .pruning .track.chosen", "data-track") == "2"
    assert "0.700" in page.text_content("#result-a .pruning .track.chosen title")  # its score
    assert not page.query_selector("#result-a .pruning .note")  # nothing reconstructed
    ends = page.eval_on_selector_all("#result-a .candidates tr.pruned",
                                     "rs => rs.map(r => r.cells[7].textContent)")
    assert ends == ["pruned @ 4", "pruned @ 4"]
    page.check("#stream")


def test_reported_blocks_show_each_blocks_candidates_with_the_kept_one(page):
    page.uncheck("#stream")
    page.select_option("#strategy-a", "blockwise_cd")
    trace = [{"candidates": [{"text": " Hello", "value": 0.1}, {"text": " Hi", "value": 0.9}],
              "kept": 1},
             {"candidates": [{"text": " there", "value": 0.4}, {"text": " you", "value": 0.2}],
              "kept": 0}]
    _canned(page, {"strategy": "blockwise_cd", "n": 2, **ACCOUNTING, "blocks": 2,
                   "block_tokens": 1, "block_trace": trace}, " Hi there")
    try:
        run(page)
    finally:
        page.unroute("**/v1/chat/completions")
    assert len(page.query_selector_all("#result-a .blocks .block")) == 2
    kept = page.eval_on_selector_all("#result-a .blocks .block-cand.kept",
                                     "cs => cs.map(c => c.textContent)")
    assert kept == ["0.900 Hi", "0.400 there"]
    page.check("#stream")


def test_a_preset_shows_its_alignment_and_fills_strategy_a(page, base_url):
    models = {"object": "list", "data": [
        {"id": "fake", "object": "model", "created": 0, "owned_by": "alignserve"},
        {"id": "careful", "object": "model", "created": 0, "owned_by": "alignserve",
         "alignment": {"strategy": "speculative_rejection", "n": 8, "alpha": 0.25}}]}
    page.route("**/v1/models", lambda route: route.fulfill(json=models))
    try:
        page.click("#reload")
        page.wait_for_selector("#model option[value=careful]", state="attached")
    finally:
        page.unroute("**/v1/models")
    page.select_option("#model", "careful")
    assert "alpha" in page.text_content("#preset-info")
    assert page.input_value("#strategy-a") == "speculative_rejection"
    assert page.input_value("#options-a [data-name=alpha]") == "0.25"
    assert page.input_value("#options-a [data-name=n]") == "8"
    # on a preset the request states every field: the preset's own would win over an omitted one
    page.fill("#options-a [data-name=alpha]", "0.5")  # the schema default
    page.click("#copy-curl")
    sent = json.loads(page.text_content("#code").split("-d '", 1)[1].rstrip("'"))
    assert sent["model"] == "careful" and sent["alignment"]["alpha"] == 0.5
    page.click("#reload")  # back to the server's own list
    page.wait_for_selector("#model option[value=careful]", state="detached")


def test_nothing_was_blocked_by_the_pages_csp(page):
    assert page.csp_errors == []
