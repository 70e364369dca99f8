"""DINOSeg in the browser, end to end: the real web server, real dinomed children (the bundled demo model on
the bundled sample PET/CT), and a real headless Chromium reading the pixels of the views' <img> elements.

The tests share one page and one server (the app holds one scene), and run in file order: open the sample,
segment, jump to a lesion, the cosine map, save and add to the training set, cancel. Every wait polls the
page with a timeout; nothing sleeps a fixed time instead of checking.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow

DEMO_MODEL = REPO_ROOT / "Resources" / "Models" / "demo"
CHILD_TIMEOUT = 420  # s: a dinomed child on a busy 2-core machine

# the pixels of one view: size, how many are not black, how many match each colour, and a coarse grey
# signature (every 4th pixel of every 4th row) to tell whether the picture changed
VIEW_PIXELS_JS = """([view, colours, tol]) => {
  const marker = document.querySelector('.dinoseg-view-' + view);
  const img = marker && marker.parentElement.querySelector('img');
  if (!img || !img.complete || !img.naturalWidth) return null;
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const ctx = canvas.getContext('2d');
  ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  let lit = 0; const hits = colours.map(() => 0); const signature = [];
  for (let y = 0; y < canvas.height; y++) {
    for (let x = 0; x < canvas.width; x++) {
      const p = 4 * (y * canvas.width + x);
      const r = d[p], g = d[p + 1], b = d[p + 2];
      if (r + g + b > 30) lit++;
      for (let k = 0; k < colours.length; k++) {
        const c = colours[k];
        if (Math.abs(r - c[0]) <= tol && Math.abs(g - c[1]) <= tol && Math.abs(b - c[2]) <= tol) hits[k]++;
      }
      if (y % 4 === 0 && x % 4 === 0) signature.push((r + g + b) / 3 | 0);
    }
  }
  return {width: canvas.width, height: canvas.height, lit: lit, hits: hits, signature: signature};
}"""

# a view's pixels kept in the page, to compare a later frame with
SNAPSHOT_JS = """(view) => {
  const img = document.querySelector('.dinoseg-view-' + view).parentElement.querySelector('img');
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const ctx = canvas.getContext('2d'); ctx.drawImage(img, 0, 0);
  window.__snapshots = window.__snapshots || {};
  window.__snapshots[view] = ctx.getImageData(0, 0, canvas.width, canvas.height);
  return [canvas.width, canvas.height];
}"""

# pixels now showing a segment: the segment's colour filled at ``alpha`` over what the pixel showed in the
# snapshot (Slicer's 2D fill), counted per colour; a pixel that did not change is never counted
SEGMENT_FILL_JS = """([view, colours, alpha, tol]) => {
  const img = document.querySelector('.dinoseg-view-' + view).parentElement.querySelector('img');
  const before = window.__snapshots[view];
  if (!img || !img.naturalWidth || img.naturalWidth !== before.width || img.naturalHeight !== before.height)
    return null;
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const ctx = canvas.getContext('2d'); ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(0, 0, canvas.width, canvas.height).data, b = before.data;
  const hits = colours.map(() => 0);
  for (let p = 0; p < d.length; p += 4) {
    if (Math.abs(d[p] - b[p]) + Math.abs(d[p + 1] - b[p + 1]) + Math.abs(d[p + 2] - b[p + 2]) <= 6) continue;
    for (let k = 0; k < colours.length; k++) {
      const c = colours[k];
      let ok = true;
      for (let ch = 0; ch < 3 && ok; ch++) ok = Math.abs(d[p + ch] - (alpha * c[ch] + (1 - alpha) * b[p + ch])) <= tol;
      if (ok) { hits[k]++; break; }
    }
  }
  return hits;
}"""

SLICE_VIEWS = ("Red", "Yellow", "Green")  # axial, sagittal, coronal


def view_pixels(page, view, colours=(), tol=0):
    return page.evaluate(VIEW_PIXELS_JS, [view, [list(c) for c in colours], tol])


def changed_fraction(a, b) -> float:
    """Share of the signature pixels whose grey value differs by more than 8 (1.0 when the size changed)."""
    if a is None or b is None or len(a["signature"]) != len(b["signature"]):
        return 1.0
    diff = sum(1 for x, y in zip(a["signature"], b["signature"]) if abs(x - y) > 8)
    return diff / max(1, len(a["signature"]))


def poll(page, check, timeout: float, what: str):
    """Call ``check()`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        page.wait_for_timeout(200)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what} (last value: {last!r})")


def still_picture(page, view, timeout: float = 30):
    """The view's pixels once two reads 0.3 s apart agree (the frames after a change have arrived)."""
    previous = view_pixels(page, view)

    def settled():
        nonlocal previous
        page.wait_for_timeout(300)
        current = view_pixels(page, view)
        same = changed_fraction(previous, current) == 0
        previous = current
        return current if same else None

    return poll(page, settled, timeout, f"the {view} view to settle")


def text(page, selector) -> str:
    loc = page.locator(selector)
    return loc.inner_text() if loc.count() else ""


def shot(page, name: str):
    """A small PNG of the page for the README (DINOSEG_WEB_SCREENSHOTS=folder; else the test's temp folder)."""
    folder = os.environ.get("DINOSEG_WEB_SCREENSHOTS")
    if not folder:
        return
    from PIL import Image

    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path))
    image = Image.open(path).convert("RGB")
    image = image.resize((image.width * 2 // 3, image.height * 2 // 3), Image.LANCZOS)
    image.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)


def segment_colours() -> list[tuple[int, int, int]]:
    meta = json.loads((DEMO_MODEL / "model.json").read_text())
    return [tuple(label["color"]) for label in meta["labels"]]


def test_page_loads_and_shows_the_sample(server, browser_page, timings):
    page = browser_page
    t0 = time.monotonic()
    page.goto(server.url)
    page.wait_for_selector("#load-button")
    # the four views exist as <img> elements before anything is loaded
    poll(page, lambda: all(view_pixels(page, v) for v in (*SLICE_VIEWS, "ThreeD")), 60, "the four views")
    timings["page_load_s"] = time.monotonic() - t0
    timings["server_ready_s"] = server.ready_s
    empty = view_pixels(page, "Red")
    assert empty["lit"] < 0.01 * empty["width"] * empty["height"], "the axial view shows something before loading"

    t1 = time.monotonic()
    page.click("#load-button")
    poll(page, lambda: "CT (128, 128, 64) + PET (SUV)" in text(page, "#case-name"), 60, "the case name")

    def sample_shown():
        pixels = [view_pixels(page, v) for v in SLICE_VIEWS]
        return all(p and p["lit"] > 0.15 * p["width"] * p["height"] for p in pixels)

    poll(page, sample_shown, 60, "the CT and PET in the three slice views")
    timings["open_sample_s"] = time.monotonic() - t1
    timings["page_load_to_sample_shown_s"] = time.monotonic() - t0
    # the PET is fused over the CT (warm PET colours, not only grey) and its SUV colour bar is shown
    axial = page.evaluate("""() => {
      const img = document.querySelector('.dinoseg-view-Red').parentElement.querySelector('img');
      const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
      const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
      const d = ctx.getImageData(0, 0, c.width, c.height).data; let warm = 0;
      for (let p = 0; p < d.length; p += 4) if (d[p] > d[p + 2] + 40) warm++;
      return warm; }""")
    assert axial > 500, f"no PET colours over the CT in the axial view ({axial} warm pixels)"
    assert page.locator("#suv-colour-bar").is_visible()
    assert "SUV" in text(page, "#suv-colour-bar")
    shot(page, "web_sample.png")


def test_segment_shows_the_segments_in_2d_and_3d(server, browser_page, timings):
    page = browser_page
    colours = segment_colours()
    page.wait_for_function("!document.querySelector('#segment-button').disabled")
    assert "demo-petct-organs-lesions (CT+PET)" in text(page, "#dinoseg-panel")
    for view in SLICE_VIEWS:
        page.evaluate(SNAPSHOT_JS, view)
    three_d_before = view_pixels(page, "ThreeD")

    t0 = time.monotonic()
    page.click("#segment-button")
    poll(page, lambda: page.locator("#cancel-button").is_enabled(), 30, "the Cancel button while segmenting")

    def segment_colours_appear():
        hits = {v: page.evaluate(SEGMENT_FILL_JS, [v, [list(c) for c in colours], 0.5, 8]) for v in SLICE_VIEWS}
        return hits if all(h and sum(h) > 300 for h in hits.values()) else None

    gained = poll(page, segment_colours_appear, CHILD_TIMEOUT, "the segment colours in the three slice views")
    timings["segment_to_display_s"] = time.monotonic() - t0
    print(f"segment-filled pixels per view and segment: {gained}")
    # the three slices through the chest show at least three of the model's segments, each in its colour
    shown = {k for hits in gained.values() for k, n in enumerate(hits) if n > 50}
    assert len(shown) >= 3, gained

    poll(page, lambda: changed_fraction(three_d_before, view_pixels(page, "ThreeD")) > 0.05, 60,
         "the segment surfaces in the 3D view")
    # the model's names (and colours) are the segments', listed under the progress bar; the lesion table is there
    poll(page, lambda: page.locator(".lesion-row").count() > 0, 30, "the lesion table")
    legend = text(page, "#segment-legend")
    for name in ("lesion", "liver", "spleen", "heart"):
        assert name in legend
    # each segment carries the model's SNOMED-CT terminology (shown as the legend's tooltip)
    liver_code = next(label["terminology"]["type"][1] for label in json.loads((DEMO_MODEL / "model.json").read_text())
                      ["labels"] if label["name"] == "liver")
    titles = page.locator("#segment-legend span[title]").evaluate_all("spans => spans.map(s => s.title)")
    assert any(f"SCT^{liver_code}^" in title for title in titles), titles
    header = text(page, "#lesion-table")
    for column in ("SUVmax", "SUVpeak", "SUVmean", "MTV", "TLG"):
        assert column in header
    assert "total" in text(page, "#lesion-total")
    assert not page.locator("#error").count() or not page.locator("#error").is_visible()
    shot(page, "web_segmented.png")


def test_lesion_row_click_moves_the_slices(server, browser_page):
    page = browser_page
    rows = page.locator(".lesion-row")
    assert rows.count() >= 2
    for index in (1, 0):
        before = view_pixels(page, "Red")
        rows.nth(index).click()
        poll(page, lambda: page.locator(".lesion-row").nth(index).get_attribute("style") and
             "rgba(100" in (page.locator(".lesion-row").nth(index).get_attribute("style") or ""), 30,
             "the clicked row to be selected")
        poll(page, lambda: changed_fraction(before, view_pixels(page, "Red")) > 0.05, 30,
             f"the axial view to move to lesion row {index + 1}")
        assert f"Lesion {index + 1}:" in text(page, "#status")


def _point_voxel(page) -> str:
    return text(page, "#cosine-point")


def test_cosine_map_follows_the_point(server, browser_page, timings):
    page = browser_page
    t0 = time.monotonic()
    page.click("#cosine-button")
    poll(page, lambda: "Click in a slice view" in text(page, "#cosine-point"), CHILD_TIMEOUT,
         "the features, then the point placing mode")
    timings["features_s"] = time.monotonic() - t0
    box = page.locator(".dinoseg-view-Red").locator("xpath=..").locator("img").bounding_box()
    x, y = box["x"] + 0.45 * box["width"], box["y"] + 0.5 * box["height"]
    page.mouse.move(x - 10, y)
    page.mouse.move(x, y)
    page.mouse.click(x, y)
    first = poll(page, lambda: "voxel" in _point_voxel(page) and _point_voxel(page), 30, "the cosine map at the point")
    poll(page, lambda: page.locator("#cosine-colour-bar").is_visible(), 10, "the cosine colour bar")
    # let the view settle on the map, then drag the point: the map follows it
    pixels_a = still_picture(page, "Red")
    shot(page, "web_cosine.png")
    page.mouse.move(x + 3, y)
    page.mouse.move(x, y)
    page.mouse.down()
    for k in range(1, 11):
        page.mouse.move(x + 10 * k, y + 5 * k)
        page.wait_for_timeout(150)  # a user's drag: the server gets each move (the view throttles events)
    page.mouse.up()
    second = poll(page, lambda: _point_voxel(page) != first and "voxel" in _point_voxel(page) and _point_voxel(page),
                  30, "the point to follow the drag")
    poll(page, lambda: changed_fraction(pixels_a, view_pixels(page, "Red")) > 0.05, 30,
         "the cosine map to change with the dragged point")
    # a new click places the point elsewhere: the map follows again
    pixels_b = view_pixels(page, "Red")
    page.click("#cosine-button")
    poll(page, lambda: "Click in a slice view" in text(page, "#cosine-point"), 30, "the point placing mode again")
    page.mouse.click(box["x"] + 0.6 * box["width"], box["y"] + 0.35 * box["height"])
    poll(page, lambda: _point_voxel(page) not in (first, second) and "voxel" in _point_voxel(page), 30,
         "the point at the new click")
    poll(page, lambda: changed_fraction(pixels_b, view_pixels(page, "Red")) > 0.05, 30,
         "the cosine map to change with the clicked point")


def test_pca_map_overlay(server, browser_page):
    """The PCA map of the same features (computed for the cosine map) replaces the cosine map at once."""
    page = browser_page
    before = still_picture(page, "Red")
    page.click("#pca-button")
    poll(page, lambda: text(page, "#status").startswith("PCA map"), 60, "the PCA map")
    poll(page, lambda: changed_fraction(before, view_pixels(page, "Red")) > 0.05, 30, "the PCA overlay in the axial view")
    assert "principal components" in text(page, "#dinoseg-panel")
    assert not page.locator("#cosine-colour-bar").count()


def test_save_and_add_to_training_set(server, browser_page):
    page = browser_page
    page.click("#save-button")
    poll(page, lambda: text(page, "#status").startswith("Saved"), 60, "the saved segmentation")
    out = server.output_dir / "sample_segmentation.nii.gz"
    sidecar = server.output_dir / "sample_segmentation.labels.json"
    assert out.is_file() and out.stat().st_size > 0
    labels = json.loads(sidecar.read_text())
    assert labels["format"] == "dinomed-labels/1" and labels["model"] == "demo-petct-organs-lesions"
    by_name = {entry["name"]: entry for entry in labels["labels"]}
    model_labels = json.loads((DEMO_MODEL / "model.json").read_text())["labels"]
    for label in model_labels:
        assert by_name[label["name"]]["value"] == label["value"]
        assert by_name[label["name"]]["color"] == list(label["color"])
    assert sum(entry["voxels"] for entry in labels["labels"]) > 0

    page.click("#add-case-button")
    poll(page, lambda: text(page, "#status").startswith("Added case_0000"), 60, "the case in the training set")
    dataset = json.loads((server.output_dir / "training_set" / "dataset.json").read_text())
    assert dataset["numTraining"] == 1 and dataset["channel_names"] == {"0": "CT", "1": "PET"}
    assert (server.output_dir / "training_set" / "labelsTr" / "case_0000.nii.gz").is_file()


def test_correct_with_the_segment_editor_then_save_and_recompute(server, browser_page):
    """Paint with trame-slicer's segment editor (active segment: the first, "lesion"); the saved label map and
    the recomputed lesion table both include the painted voxels."""
    page = browser_page
    sidecar = server.output_dir / "sample_segmentation.labels.json"
    voxels_before = {e["name"]: e["voxels"] for e in json.loads(sidecar.read_text())["labels"]}
    total_before = text(page, "#lesion-total")
    page.locator(".v-navigation-drawer button:has(.mdi-brush)").nth(1).click()  # the toolbar's Paint effect
    # the views are centred on lesion 1 (the last row clicked): stroke through the tissue beside it
    box = page.locator(".dinoseg-view-Red").locator("xpath=..").locator("img").bounding_box()
    x, y = box["x"] + 0.58 * box["width"], box["y"] + 0.5 * box["height"]
    before = view_pixels(page, "Red")
    page.mouse.move(x, y)
    poll(page, lambda: changed_fraction(before, view_pixels(page, "Red")) > 0.001, 30,
         "the paint brush outline under the mouse (Paint active)")
    before = still_picture(page, "Red")
    page.mouse.down()
    for k in range(1, 13):
        page.mouse.move(x + 0.012 * box["width"] * k, y)
        page.wait_for_timeout(100)  # a user's stroke: the server gets each move
    page.mouse.up()
    poll(page, lambda: changed_fraction(before, view_pixels(page, "Red")) > 0.005, 30, "the painted stroke")
    # the stroke's first frames can be the brush feedback while the server still applies the stroke on mouse-up:
    # save once the view has settled (a CI run saved before the stroke was in the segmentation)
    still_picture(page, "Red")
    page.click("#save-button")
    poll(page, lambda: json.loads(sidecar.read_text())["labels"][0]["voxels"] > voxels_before["lesion"], 60,
         f"the painted voxels in the saved lesion label (page status: {text(page, '#status')!r})")
    page.click("#recompute-button")
    poll(page, lambda: text(page, "#status").startswith("Lesion table recomputed"), CHILD_TIMEOUT,
         "the recomputed lesion table")
    assert text(page, "#lesion-total") != total_before


def test_cancel_leaves_no_process(server, browser_page):
    page = browser_page
    assert server.dinomed_children() == []
    page.click("#show-pet-button")
    page.click("#segment-button")
    children = poll(page, server.dinomed_children, 60, "the dinomed child to start")
    assert any("dinomed" in " ".join(c.cmdline()) for c in children)
    poll(page, lambda: page.locator("#cancel-button").is_enabled(), 30, "the Cancel button")
    page.click("#cancel-button")
    poll(page, lambda: "cancelled" in text(page, "#status"), 60, "the cancelled status")
    poll(page, lambda: server.dinomed_children() == [] or None, 30, "no dinomed process left")
    assert page.locator("#segment-button").is_enabled()
    # the previous result is still shown and usable
    assert page.locator(".lesion-row").count() > 0


def test_reload_lists_the_users_models_and_shows_the_views(server, browser_page):
    """A model folder dropped into the user's models folder is listed after a reload (the views come back)."""
    import shutil

    target = server.tmp / "models" / "my_ct_model"
    shutil.copytree(REPO_ROOT / "Resources" / "Models" / "demo_ct_organs", target)
    meta = json.loads((target / "model.json").read_text())
    meta["name"] = "my-ct-model"
    (target / "model.json").write_text(json.dumps(meta))
    page = browser_page
    page.reload()
    page.wait_for_selector("#load-button")
    poll(page, lambda: all((lambda p: p and p["lit"] > 0.15 * p["width"] * p["height"])(view_pixels(page, v))
                           for v in SLICE_VIEWS), 60, "the slice views after the reload")
    page.locator(".v-select:has(#model-select)").click()
    poll(page, lambda: "my-ct-model (CT)" in page.locator(".v-overlay-container").inner_text(), 30,
         "the user's model in the model list")
    page.keyboard.press("Escape")


def test_open_ct_only_from_the_server_folder(server, browser_page):
    """A CT (no PET) typed as a path in the server folder: shown, and the CT-only model is picked."""
    import shutil

    from conftest import REPO_ROOT as root

    case = server.tmp / "case1"
    case.mkdir(exist_ok=True)
    shutil.copy(root / "Resources" / "SampleData" / "ct.nii.gz", case / "ct.nii.gz")
    page = browser_page
    page.fill("#ct-path", "case1/ct.nii.gz")
    page.locator("#ct-path").press("Tab")
    before = view_pixels(page, "Red")
    page.click("#load-button")
    poll(page, lambda: text(page, "#case-name").strip() == "CT (128, 128, 64)", 60, "the CT-only case")
    poll(page, lambda: changed_fraction(before, view_pixels(page, "Red")) > 0.05, 30, "the CT alone in the views")
    assert "demo-ct-organs (CT)" in text(page, "#dinoseg-panel")
    assert page.locator(".lesion-row").count() == 0  # the previous case's results are gone
    assert not page.locator("#suv-colour-bar").count()


def test_open_ct_and_pet_dicom_folders(server, browser_page):
    """A CT DICOM series and a PET DICOM series (with the SUV tags) from the server folder: the PET is turned
    into SUV by a watched ``dinomed suv`` child and fused over the CT."""
    import subprocess

    case = server.tmp / "dicom_case"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "core_lib" / "src"))
    subprocess.run([os.environ["DINOSEG_DINOMED_PYTHON"], "-m", "dinomed", "phantom", "--out", str(case), "--dicom",
                    "--shape", "32,64,64", "--seed", "3"], check=True, env=env, capture_output=True, timeout=300)
    page = browser_page
    page.fill("#ct-path", "dicom_case/ct_dicom/")
    page.locator("#ct-path").press("Tab")
    page.fill("#pet-path", "dicom_case/pet_dicom/")
    page.locator("#pet-path").press("Tab")
    page.click("#load-button")
    poll(page, lambda: text(page, "#case-name").strip().endswith("+ PET (SUV)"), CHILD_TIMEOUT,
         "the PET DICOM series in SUV")
    assert "(64, 64, 32)" in text(page, "#case-name")
    poll(page, lambda: page.locator("#suv-colour-bar").count() and page.locator("#suv-colour-bar").is_visible(), 30,
         "the SUV colour bar")
    assert not page.locator("#error").count() or not page.locator("#error").is_visible()
