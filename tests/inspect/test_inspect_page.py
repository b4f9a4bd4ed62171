"""The HTML page: self-contained, safe with any token text, and working in a real headless browser.

The browser test drives Debian's Chromium through Playwright (`pip install playwright`; no
`playwright install`: it uses the system browser). It skips, saying why, where either is missing.
Set MOSAIC_CHROMIUM to use a browser binary elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from memory_mosaics.inspect.html import heatmap_payload, render_html
from memory_mosaics.inspect.report import build_report
from memory_mosaics.inspect.retrieval import inspect_sequence

IDS = [3, 9, 4, 7, 9, 4, 7, 9, 4, 2, 7, 9, 11, 4, 7, 9]
EVIL = "</script><script>window.hacked=1</script><b>x</b>"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def describe(token: int) -> str:
    return EVIL if token == 2 else f"w{token} "


@pytest.fixture
def page_and_report(make_mosaic, tmp_path):
    inspection = inspect_sequence(make_mosaic(pmem_count=2), IDS, top_k=3)
    report = build_report(inspection, describe, {"checkpoint": "tiny", "config": {"n_layer": 2, "n_head": 3}})
    path = tmp_path / "page.html"
    path.write_text(render_html(report, heatmap_payload(inspection)), encoding="utf-8")
    return path, report


def embedded(page: str, element_id: str):
    match = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>', page, re.S)
    assert match, element_id
    return json.loads(match.group(1))


def test_page_is_self_contained_and_embeds_the_report(page_and_report):
    path, report = page_and_report
    page = path.read_text(encoding="utf-8")
    for reference in ("http:", "https:", "//cdn", "<link", " src=", "@import", "url("):
        assert reference not in page, reference
    assert embedded(page, "mosaic-report") == json.loads(json.dumps(report))
    heatmaps = embedded(page, "mosaic-heatmaps")
    assert heatmaps["length"] == len(IDS) and len(heatmaps["layers"]) == 2 and len(heatmaps["layers"][0]) == 3
    # Token text cannot close the data block: exactly the page's own three scripts exist.
    assert page.count("</script>") == 3 and EVIL not in page


def chromium_path() -> str | None:
    for candidate in (
        os.environ.get("MOSAIC_CHROMIUM"),
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set MOSAIC_CHROMIUM)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def entry_positions(card) -> list[int]:
    return [int(row.get_attribute("data-position")) for row in card.query_selector_all("tr.entry")]


def expected_positions(report, t: int, layer: int) -> list[list[int]]:
    return [[e["position"] for e in head["entries"]] for head in report["retrievals"][t][layer]["context"]]


@pytest.mark.browser
def test_page_in_a_headless_browser(browser, page_and_report):
    path, report = page_and_report
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    page.set_default_timeout(15_000)
    problems, requests = [], []
    page.on("console", lambda msg: problems.append(msg.text) if msg.type in ("error", "warning") else None)
    page.on("pageerror", lambda err: problems.append(str(err)))
    page.on("request", lambda request: requests.append(request.url))
    page.goto(path.as_uri())
    details = page.locator("#details")
    last = len(IDS) - 1
    assert details.get_attribute("data-position") == str(last)

    # Clicking a token shows its retrievals, per head, exactly as the report has them.
    page.click('#strip .tok[data-position="5"]')
    assert details.get_attribute("data-position") == "5"
    cards = page.query_selector_all(".context-cards .head-card")
    assert [entry_positions(card) for card in cards] == expected_positions(report, 5, 0)
    assert all(positions for positions in expected_positions(report, 5, 0))
    slot_rows = [
        len(card.query_selector_all("tr.slot")) for card in page.query_selector_all(".persistent-cards .head-card")
    ]
    assert slot_rows == [3, 3, 3]

    # Hovering previews another token; leaving it returns to the clicked one.
    page.hover('#strip .tok[data-position="2"]')
    assert details.get_attribute("data-position") == "2"
    page.hover("h1")
    assert details.get_attribute("data-position") == "5"

    # Position 0 has nothing stored before it.
    page.click('#strip .tok[data-position="0"]')
    assert len(page.query_selector_all(".context-cards .empty")) == 3
    assert page.query_selector_all(".context-cards tr.entry") == []

    # Another layer; then a click on a heatmap row selects that query position.
    page.click('#layers button[data-layer="1"]')
    page.click('#strip .tok[data-position="9"]')
    assert details.get_attribute("data-layer") == "1"
    cards = page.query_selector_all(".context-cards .head-card")
    assert [entry_positions(card) for card in cards] == expected_positions(report, 9, 1)
    canvases = page.query_selector_all("#heatmaps canvas")
    assert len(canvases) == 3
    box = canvases[0].bounding_box()
    canvases[0].click(position={"x": box["width"] / 2, "y": (12.5 / len(IDS)) * box["height"]})
    assert details.get_attribute("data-position") == "12"
    painted = page.evaluate(
        "() => { const c = document.querySelector('#heatmaps canvas');"
        " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let dark = 0; for (let i = 0; i < d.length; i += 4) if (d[i] < 200) dark++; return dark; }"
    )
    assert painted > 0

    # Token text is shown as text, never run as markup.
    assert page.inner_text('#strip .tok[data-position="9"]') == EVIL
    assert page.evaluate("() => window.hacked === undefined && !document.querySelector('#strip b')")
    assert problems == []
    assert all(url.startswith("file:") for url in requests), requests
