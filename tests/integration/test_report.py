"""The profiler report of a real training run, loaded in headless Chromium (Debian's `chromium` package).

Chromium is driven through the DevTools protocol (imgclf.ui.chromium): the page must load from disk with no
request other than file:/data: URLs, no console error or exception, every section present with its plot or
table, and every embedded image decoded.
"""

from __future__ import annotations

import json

import pytest
from imgclf.debugging import report, rules
from imgclf.ui import chromium


@pytest.fixture
def browser(tmp_path):
    with chromium.launch(tmp_path) as tools:
        yield tools


CHECK_PAGE = """JSON.stringify({
  sections: Object.fromEntries([...document.querySelectorAll('section')].map(s => [s.id, {
    heading: s.querySelector('h2') ? s.querySelector('h2').textContent : null,
    images: s.querySelectorAll('img').length, tables: s.querySelectorAll('table').length}])),
  images: [...document.images].map(i => ({complete: i.complete, width: i.naturalWidth})),
  rules: [...document.querySelectorAll('#rules tr')].length - 1,
  profilerRules: [...document.querySelectorAll('#profiler .profiler-rule')].map(d => [d.id,
    d.querySelector('h3').textContent, d.querySelector('table tr td:nth-child(2)').textContent]),
  worst: [...document.querySelectorAll('#classes table')][0] ? [...[...document.querySelectorAll('#classes table')][0]
    .querySelectorAll('tr')].slice(1).map(r => [...r.cells].map(c => c.textContent)) : null,
  usage: [...document.querySelectorAll('#usage tr')].slice(1).map(r => [...r.cells].map(c => c.textContent)),
})"""


def test_report_loads_in_chromium_with_every_section(browser, trained):
    out, _ = trained
    page = out / "reports" / "profiler-report.html"
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.send(f"{domain}.enable")
    browser.send("Page.navigate", url=page.resolve().as_uri())
    browser.wait_for("Page.loadEventFired")
    result = json.loads(browser.send("Runtime.evaluate", expression=CHECK_PAGE, returnByValue=True)["result"]["value"])

    errors = [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert not errors, errors
    requested = [e["params"]["request"]["url"] for e in browser.events
                 if e.get("method") == "Network.requestWillBeSent"]
    assert requested and all(u.startswith(("file:", "data:")) for u in requested), requested

    assert list(result["sections"]) == list(report.SECTIONS)
    for key, title in report.SECTIONS.items():
        section = result["sections"][key]
        assert section["heading"] == title
        assert section["images"] + section["tables"] > 0, f"section {key} shows no plot or table: {section}"
    for key in ("training", "system", "steps"):
        assert result["sections"][key]["images"] == 1, key
    assert result["sections"]["classes"]["images"] == 2  # the confusion heatmap and the worst classes
    worst = json.loads((out / "reports" / "metrics.json").read_text())["classes"]["worst"]
    assert result["worst"] == [[w["class"], f"{w['accuracy']:.3f}", str(w["images"])] for w in worst]
    assert result["images"] and all(i["complete"] and i["width"] > 100 for i in result["images"]), result["images"]
    assert result["rules"] == len(rules.RULES)
    # a block per ProfilerReport rule, with its status; on a CPU-only machine the GPU rules are NotApplicable
    assert [p[1] for p in result["profilerRules"]] == list(rules.PROFILER_RULES)
    status = {p[1]: p[2] for p in result["profilerRules"]}
    assert status["step_outlier"] == status["max_initialization_time"] == rules.NO_ISSUES, status
    # the percentile table: p50 <= p95 <= p99 <= max for every metric of the node
    metrics = [row[1] for row in result["usage"]]
    assert {"CPU total (%)", "CPU busiest core (%)", "CPU I/O wait (%)", "memory (%)", "disk read (MB/s)",
            "network in (MB/s)"} <= set(metrics), metrics
    for row in result["usage"]:
        p50, p95, p99, top = map(float, row[2:])
        assert p50 <= p95 <= p99 <= top, row


def test_report_is_self_contained(trained):
    out, _ = trained
    text = (out / "reports" / "profiler-report.html").read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert text.count('src="data:image/png;base64,') == 5


def test_class_results_agree_with_the_confusion_matrix(trained, sample_dataset):
    """metrics.json's worst classes and most-confused pairs, recomputed from the written confusion matrix; every
    example is a file of its true class, predicted as the other; the PNGs decode."""
    from PIL import Image

    reports = trained[0] / "reports"
    classes = json.loads((reports / "metrics.json").read_text())["classes"]
    split = classes["split"]
    rows = [line.split(",") for line in (reports / f"confusion_matrix_{split}.csv").read_text().splitlines()[1:]]
    counts = {(t[0], rows[j][0]): int(n) for t in rows for j, n in enumerate(t[1:])}
    totals = {t[0]: sum(map(int, t[1:])) for t in rows}
    accuracy = {name: counts[name, name] / totals[name] for name in totals}
    assert [w["class"] for w in classes["worst"]] == sorted(accuracy, key=lambda c: (accuracy[c], -totals[c], c))
    assert [w["accuracy"] for w in classes["worst"]] == pytest.approx([accuracy[w["class"]] for w in classes["worst"]])
    confused = sorted(((n, t, p) for (t, p), n in counts.items() if t != p and n), key=lambda c: (-c[0], c[1], c[2]))
    assert [(p["count"], p["true"], p["predicted"]) for p in classes["most_confused"]] == confused[:10]
    for pair in classes["most_confused"]:
        assert 1 <= len(pair["examples"]) <= min(3, pair["count"])
        for example in pair["examples"]:
            assert example.split("/")[0] == pair["true"] and (sample_dataset / split / example).is_file()
    for name in (f"confusion_matrix_{split}.png", f"worst_classes_{split}.png"):
        with Image.open(reports / name) as image:
            assert image.format == "PNG" and min(image.size) > 100, name
