"""The DINOSeg web app: trame-slicer's slice/3D views and segment editor around a DINOSeg panel.

Everything that touches data goes through the same Qt-free ``DINOSegLib`` the Slicer module uses (loading
PET/CT, fusion, ``dinomed segment`` / ``dinomed features`` child processes, segmentation nodes with the
model's terminology, the lesion table, PCA and cosine maps, the training-set export). This file only builds
the page, forwards clicks and ticks the running job from the server's event loop (no thread touches MRML).

Run: ``python -m dinoseg_web --dinomed-python /path/to/main/venv/bin/python`` (``make web`` does it).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
for _path in (REPO_ROOT / "DINOSeg",):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from trame.app import TrameApp  # noqa: E402
from trame.widgets import html  # noqa: E402
from trame.widgets.vuetify3 import (  # noqa: E402
    VAlert, VBtn, VCard, VCardText, VCardTitle, VCombobox, VDivider, VProgressLinear, VSelect, VSlider,
    VTextField,
)
from trame_server.utils.asynchronous import create_task  # noqa: E402
from trame_slicer import module as trame_slicer_module  # noqa: E402
from trame_slicer.app.logic.segmentation import SegmentEditorLogic  # noqa: E402
from trame_slicer.app.ui import (  # noqa: E402
    ControlButton, ViewerLayout, create_vertical_slice_view_gutter_ui, create_vertical_view_gutter_ui,
)
from trame_slicer.app.ui.segmentation import (  # noqa: E402
    SegmentEditorToolbarUI, SegmentEditorUI, SegmentEditorUndoRedoUI,
)
from trame_slicer.core import LayoutManager, SlicerApp  # noqa: E402
from trame_slicer.rca_view import register_rca_factories  # noqa: E402

from DINOSegLib import display, features, lesions, training_set  # noqa: E402
from DINOSegLib.jobs import Job, JobState  # noqa: E402
from DINOSegLib.logic import DEVICES, DINOSegLogic  # noqa: E402
from DINOSegLib.models import (  # noqa: E402
    BUNDLED_MODELS_DIR, SAMPLE_DATA_DIR, add_models_listener, read_model_info, user_models_dir,
)
from DINOSegLib.segmentation import add_labelmap_node, labelmap_array_from_segmentation  # noqa: E402
from DINOSegLib.volumes import write_volume  # noqa: E402

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
LABELS_FORMAT = "dinomed-labels/1"  # the sidecar of ``dinomed segment`` (dinomed/inference/segment.py)
SAMPLE = "Bundled sample PET/CT"
PANEL = "DINOSegPanel"


def default_models_dir() -> Path:
    """The user's own model folders (never the extension's): $DINOSEG_MODELS_DIR, else the per-user folder the
    Slicer module uses with Slicer's settings in their Linux place (``~/.config/slicer.org/DINOSeg/Models``),
    so that a model registered in Slicer on this computer is listed here too."""
    env = os.environ.get("DINOSEG_MODELS_DIR")
    if env:
        return Path(env)
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return user_models_dir(Path(config) / "slicer.org")


def list_server_files(data_dir: Path, depth: int = 2) -> list[str]:
    """Volume files and DICOM folders under ``data_dir`` (relative paths), for the CT/PET pickers."""
    found: list[str] = []
    if not data_dir.is_dir():
        return found

    def walk(folder: Path, level: int):
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            return
        files = [e for e in entries if e.is_file()]
        if any(e.suffix.lower() in (".dcm", ".ima") for e in files):
            found.append(str(folder.relative_to(data_dir)) + "/")
        for e in files:
            if e.name.lower().endswith(VOLUME_SUFFIXES):
                found.append(str(e.relative_to(data_dir)))
        if level < depth:
            for e in entries:
                if e.is_dir() and not e.name.startswith("."):
                    walk(e, level + 1)

    walk(data_dir, 0)
    return found[:500]


def colour_bar_css(scene, color_node_id: str, steps: int = 12) -> str:
    """The CSS gradient of a colour node's lookup table (the PET colour map), for the SUV colour bar."""
    node = scene.GetNodeByID(color_node_id)
    table = node.GetLookupTable() if node is not None else None
    if table is None:
        return "linear-gradient(to right, black, white)"
    low, high = table.GetRange()
    stops = []
    for i in range(steps + 1):
        rgb = [0.0, 0.0, 0.0]
        table.GetColor(low + (high - low) * i / steps, rgb)
        r, g, b = rgb
        stops.append(f"rgb({int(r * 255)},{int(g * 255)},{int(b * 255)}) {100 * i / steps:.0f}%")
    return "linear-gradient(to right, " + ", ".join(stops) + ")"


def colour_bar(element_id: str, shown_when: str, gradient: str, labels: tuple[str, str, str]):
    """A colour bar under the overlay slider: the ``gradient`` state variable's CSS over three captions (low end,
    what the colours mean, high end), shown while the JavaScript condition ``shown_when`` holds."""
    with html.Div(v_if=(shown_when,), id=element_id):
        html.Div(style=(f"{{background: {gradient}, height: '12px', borderRadius: '2px'}}",))
        with html.Div(style="display:flex; justify-content: space-between;", classes="text-caption"):
            for label in labels:
                html.Span(label)


def _marked(populate_view_ui):
    """trame-slicer's view gutter plus a hidden marker naming the view (Red = axial, Yellow = sagittal, Green =
    coronal, the 3D view), so that a page script or a test finds a view's <img> without relying on the layout."""

    def populate(server, view_id, view):
        populate_view_ui(server, view_id, view)
        html.Span(classes=f"dinoseg-view dinoseg-view-{view.get_singleton_tag()}", style="display: none;")

    return populate


def _fmt(value, digits: int = 2) -> str:
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


class DINOSegWebApp(TrameApp):
    def __init__(self, server=None, *, dinomed_python: str, data_dir: Path, models_dir: Path, output_dir: Path,
                 rca_encoder: str | None = None, suv_max: float = 10.0):
        super().__init__(server)
        self.server.enable_module(trame_slicer_module)
        self.data_dir = Path(data_dir).resolve()
        self.models_dir = Path(models_dir)
        self.output_dir = Path(output_dir)
        self.suv_max = suv_max
        self.slicer_app = SlicerApp()
        self.scene = self.slicer_app.scene
        register_rca_factories(self.slicer_app.view_manager, self.server, rca_encoder=rca_encoder,
                               slice_view_ui_f=_marked(create_vertical_slice_view_gutter_ui),
                               three_d_view_ui_f=_marked(create_vertical_view_gutter_ui))
        self.layout_manager = LayoutManager(self.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout_dict(LayoutManager.default_grid_configuration())
        self.layout_manager.set_layout("Quad View")
        self.segment_editor_logic = SegmentEditorLogic(self.server, self.slicer_app)
        self.lib = DINOSegLogic(self.scene, python=dinomed_python, models_dirs=[self.models_dir, Path(BUNDLED_MODELS_DIR)])

        self.ct = self.pet = self.seg = self.table = self.model_info = None
        self.pca_node = None
        self.grid = None  # the FeatureGrid of the current CT (cached features)
        self.follower = None
        self.point = None
        self.job: Job | None = None  # the running dinomed child (DINOSegLib.jobs.Job)
        self._case_nodes: list = []
        self._segment_clicked_at = None
        self._feature_cache = Path(tempfile.mkdtemp(prefix="dinoseg-web-features-"))

        self._init_state()
        self._build_ui()
        self.refresh_models()
        self.state.change("pet_opacity")(self.on_pet_opacity)
        self.server.controller.on_client_connected.add(self._on_client_connected)
        self._remove_models_listener = add_models_listener(lambda _path: self._refresh_models_now())

    def _on_client_connected(self, *_):
        """A page opened (or reloaded) later gets the current frames (the views push images only on render)
        and the model folders as they are now."""
        for view in self.slicer_app.view_manager.get_views():
            view.schedule_render()
        self._refresh_models_now()

    def _refresh_models_now(self):
        with self.state:
            self.refresh_models()

    # -- state ----------------------------------------------------------------------------------------
    def _init_state(self):
        s = self.state
        s.trame__title = "DINOSeg"
        s.ct_path = SAMPLE
        s.pet_path = ""
        s.server_files = [SAMPLE] + list_server_files(self.data_dir)
        s.data_dir = str(self.data_dir)
        s.case_loaded = False
        s.case_name = ""
        s.pet_loaded = False
        s.pet_opacity = 0.5
        s.overlay = "PET"
        s.suv_max = self.suv_max
        s.suv_bar = "linear-gradient(to right, black, white)"
        s.cosine_bar = "linear-gradient(to right, black, white)"
        s.models = []
        s.model = None
        s.devices = list(DEVICES)
        s.device = "auto"
        s.job_running = False
        s.job_kind = ""
        s.progress = 0
        s.progress_text = ""
        s.status = "Open the sample or a CT (+ PET) from the server folder."
        s.error = ""
        s.lesion_rows = []
        s.lesion_total = None
        s.selected_lesion = -1
        s.segmented = False
        s.segments = []
        s.features_ready = False
        s.picking_point = False
        s.cosine_point = ""
        s.save_path = ""
        s.dataset_dir = str(self.output_dir / "training_set")
        s.case_id = ""
        s.timings = {}
        s.is_drawer_visible = True
        s.active_tool = PANEL
        s.is_volume_loaded = False
        s.child_pid = 0

    def _set(self, **values):
        """Set state from a callback outside trame's own handlers (timers, VTK observers) and push it."""
        with self.state:
            for key, value in values.items():
                self.state[key] = value

    # -- UI -------------------------------------------------------------------------------------------
    def _build_ui(self):
        with ViewerLayout(self.server, title="DINOSeg", is_drawer_visible=True) as self.layout:
            self.layout.drawer.width = 430
            with self.layout.drawer:
                self._build_panel()
                self.editor_ui = SegmentEditorUI(v_if=(f"active_tool === '{SegmentEditorUI.__name__}'",))
            with self.layout.toolbar:
                self._tool_button("DINOSeg", "mdi-brain", PANEL)
                self._tool_button("Segment editor", "mdi-brush", SegmentEditorUI.__name__)
                SegmentEditorToolbarUI(editor_ui=self.editor_ui)
            with self.layout.undo_redo:
                SegmentEditorUndoRedoUI(editor_ui=self.editor_ui,
                                        v_if=(f"active_tool === '{SegmentEditorUI.__name__}'",))
            with self.layout.content:
                self.layout_manager.initialize_layout_grid(self.layout)
        self.segment_editor_logic.set_ui(self.editor_ui)

    def _tool_button(self, name: str, icon: str, tool: str):
        def toggle():
            visible = not self.state.is_drawer_visible or self.state.active_tool != tool
            self.state.is_drawer_visible = visible
            self.state.active_tool = tool if visible else None

        ControlButton(name=name, icon=icon, click=toggle, active=(f"active_tool === '{tool}'",),
                      disabled=(f"'{tool}' !== '{PANEL}' && !segmented",), classes="mt-1")

    def _build_panel(self):
        with html.Div(v_if=(f"active_tool === '{PANEL}'",), id="dinoseg-panel",
                      style="overflow-y: auto; height: 100%; font-size: 13px;"):
            VAlert(v_if=("error",), text=("error",), type="error", density="compact", closable=True,
                   id="error", classes="ma-2", click_close="error = ''")
            # -- data ------------------------------------------------------------------------------------
            with VCard(variant="flat"):
                VCardTitle("1. PET/CT", classes="text-subtitle-1")
                with VCardText():
                    html.Div("Server folder: {{ data_dir }}", classes="text-caption mb-1")
                    VCombobox(label="CT (volume file or DICOM folder)", v_model=("ct_path",), items=("server_files",),
                              density="compact", hide_details=True, id="ct-path", classes="mb-2")
                    VCombobox(label="PET in SUV (volume file) or PET DICOM folder; empty: CT only",
                              v_model=("pet_path",), items=("server_files",), density="compact",
                              hide_details=True, clearable=True, id="pet-path", classes="mb-2",
                              disabled=("ct_path === 'Bundled sample PET/CT'",))
                    VBtn("Open", click=self.on_load, id="load-button", color="primary", size="small",
                         disabled=("job_running",))
                    html.Div("{{ case_name }}", id="case-name", classes="text-caption mt-1")
                    with html.Div(v_if=("case_loaded",), classes="mt-2"):
                        VSlider(label="Overlay", v_model=("pet_opacity",), min=0, max=1, step=0.05,
                                density="compact", hide_details=True, id="pet-opacity")
                        colour_bar("suv-colour-bar", "overlay === 'PET' && pet_loaded", "suv_bar",
                                   ("0", "PET fused over CT: SUV (g/ml)", "{{ suv_max }}"))
                        colour_bar("cosine-colour-bar", "overlay === 'Cosine similarity'", "cosine_bar",
                                   ("-1", "cosine similarity to the point (< 0 hidden)", "1"))
                        html.Div("PCA map: the features' first three principal components as RGB",
                                 v_if=("overlay.startsWith('PCA')",), classes="text-caption")
            VDivider()
            # -- model and segmentation ------------------------------------------------------------------
            with VCard(variant="flat"):
                VCardTitle("2. Segment", classes="text-subtitle-1")
                with VCardText():
                    VSelect(label="Model (bundled and yours)", v_model=("model",), items=("models",),
                            item_title="title", item_value="path", density="compact", hide_details=True,
                            id="model-select", classes="mb-2")
                    html.Div(f"Your models folder: {self.models_dir}", classes="text-caption mb-2")
                    VSelect(label="Device", v_model=("device",), items=("devices",), density="compact",
                            hide_details=True, id="device-select", classes="mb-2")
                    VBtn("Segment", click=self.on_segment, id="segment-button", color="primary", size="small",
                         disabled=("!case_loaded || job_running || !model",), classes="mr-2")
                    VBtn("Cancel", click=self.on_cancel, id="cancel-button", size="small", color="error",
                         disabled=("!job_running",))
                    VProgressLinear(model_value=("progress",), height=14, classes="mt-2", id="progress",
                                    color="primary", indeterminate=("job_running && progress === 0",))
                    html.Div("{{ progress_text }}", classes="text-caption", id="progress-text")
                    html.Div("{{ status }}", classes="text-caption", id="status")
                    with html.Div(v_if=("segments.length",), classes="mt-1", id="segment-legend"):
                        with html.Span(v_for="s in segments", key="s.name", classes="mr-2 text-caption"):
                            html.Span(style=("{display:'inline-block', width:'10px', height:'10px', "
                                             "background: s.color, marginRight: '3px'}",))
                            html.Span("{{ s.name }}", title=("s.terminology",))
            VDivider()
            # -- lesion table ----------------------------------------------------------------------------
            with VCard(variant="flat", v_if=("lesion_rows.length",)):
                VCardTitle("PET lesions (click a row to go there)", classes="text-subtitle-1")
                with VCardText():
                    with html.Table(id="lesion-table", style="width:100%; border-collapse: collapse;",
                                    classes="text-caption"):
                        with html.Tr():
                            for head in ("#", "Label", "SUVmax", "SUVpeak", "SUVmean", "MTV ml", "TLG g"):
                                html.Th(head, style="text-align:right; padding: 0 3px;")
                        with html.Tr(v_for="(row, i) in lesion_rows", key="i", click=(self.on_lesion_row, "[i]"),
                                     classes="lesion-row",
                                     style=("{cursor: 'pointer', background: i === selected_lesion ? "
                                            "'rgba(100,150,255,0.3)' : 'transparent'}",)):
                            for key in ("lesion", "name", "suv_max", "suv_peak", "suv_mean", "mtv_ml", "tlg"):
                                html.Td(f"{{{{ row.{key} }}}}", style="text-align:right; padding: 0 3px;")
                        with html.Tr(v_if=("lesion_total",), id="lesion-total",
                                     style="font-weight: bold; border-top: 1px solid grey;"):
                            for key in ("lesion", "name", "suv_max", "suv_peak", "suv_mean", "mtv_ml", "tlg"):
                                html.Td(f"{{{{ lesion_total.{key} }}}}", style="text-align:right; padding: 0 3px;")
                    VBtn("Recompute after corrections", click=self.on_recompute_lesions, size="x-small",
                         variant="tonal", classes="mt-1", disabled=("job_running",), id="recompute-button")
            VDivider()
            # -- features --------------------------------------------------------------------------------
            with VCard(variant="flat"):
                VCardTitle("3. What the model sees", classes="text-subtitle-1")
                with VCardText():
                    VBtn("PCA map", click=self.on_pca, id="pca-button", size="small", classes="mr-2",
                         disabled=("!case_loaded || job_running || !model",))
                    VBtn("Cosine map: pick a point", click=self.on_pick_point, id="cosine-button", size="small",
                         disabled=("!case_loaded || job_running || !model",), classes="mr-2")
                    VBtn("PET", click=self.on_show_pet, size="small", variant="tonal", id="show-pet-button",
                         disabled=("!case_loaded",))
                    html.Div("{{ picking_point ? 'Click in a slice view to place the point; drag it to move the "
                             "map.' : '' }} {{ cosine_point }}", classes="text-caption mt-1", id="cosine-point")
            VDivider()
            # -- save and training set -------------------------------------------------------------------
            with VCard(variant="flat", v_if=("segmented",)):
                VCardTitle("4. Correct, save, add to the training set", classes="text-subtitle-1")
                with VCardText():
                    html.Div("Correct with the segment editor (brush icon, left).", classes="text-caption mb-1")
                    VTextField(label="Save as (NIfTI; a .labels.json sidecar beside it)", v_model=("save_path",),
                               density="compact", hide_details=True, id="save-path", classes="mb-1")
                    VBtn("Save", click=self.on_save, size="small", id="save-button", classes="mb-2")
                    VTextField(label="Training set folder (nnU-Net layout)", v_model=("dataset_dir",),
                               density="compact", hide_details=True, id="dataset-dir", classes="mb-1")
                    VTextField(label="Case id (empty: next free)", v_model=("case_id",), density="compact",
                               hide_details=True, id="case-id", classes="mb-1")
                    VBtn("Add this case to the training set", click=self.on_add_case, size="small",
                         id="add-case-button")

    # -- models ---------------------------------------------------------------------------------------
    def refresh_models(self):
        items = []
        for folder in self.lib.available_models():
            try:
                info = read_model_info(folder)
            except ValueError as exc:
                self.state.error = str(exc)
                continue
            bundled = Path(folder).resolve().parent == Path(BUNDLED_MODELS_DIR).resolve()
            items.append({"title": f"{info.name} ({'+'.join(info.inputs)}){' - bundled' if bundled else ''}",
                          "path": str(folder), "needs_pet": info.needs_pet})
        self.state.models = items
        if items and self.state.model not in [i["path"] for i in items]:
            self.state.model = items[0]["path"]

    # -- loading --------------------------------------------------------------------------------------
    def _resolve(self, value: str) -> Path:
        path = Path(value.strip())
        return path if path.is_absolute() else self.data_dir / path

    def _clear_case(self):
        self._stop_follower()
        for node in self._case_nodes:
            if node is not None and self.scene.GetNodeByID(node.GetID()) is node:
                self.scene.RemoveNode(node)
        self._case_nodes = []
        self.ct = self.pet = self.seg = self.table = self.pca_node = self.grid = self.point = None
        s = self.state
        s.lesion_rows, s.lesion_total, s.selected_lesion = [], None, -1
        s.segmented, s.segments, s.features_ready, s.cosine_point, s.picking_point = False, [], False, "", False

    def on_load(self):
        s = self.state
        s.error = ""
        try:
            if s.ct_path == SAMPLE or not s.ct_path:
                ct_path, pet_path = Path(SAMPLE_DATA_DIR) / "ct.nii.gz", Path(SAMPLE_DATA_DIR) / "pet.nii.gz"
            else:
                ct_path = self._resolve(s.ct_path)
                pet_path = self._resolve(s.pet_path) if s.pet_path else None
            for path in (ct_path, pet_path):
                if path is not None and not path.exists():
                    raise FileNotFoundError(f"{path} does not exist")
            self._clear_case()
            s.server_files = [SAMPLE] + list_server_files(self.data_dir)
            t0 = time.monotonic()
            self.ct = self.lib.load_ct(ct_path)
            self._case_nodes.append(self.ct)
            stem = "sample" if s.ct_path == SAMPLE else ct_path.name.split(".")[0]
            s.save_path = str(self.output_dir / f"{stem}_segmentation.nii.gz")
            if pet_path is not None and self.lib.is_dicom_path(pet_path):
                # PET DICOM -> SUV (decay-corrected body-weight SUV) in a dinomed child, with progress
                self._show_case(t0)
                task = self.lib.start_pet_suv(pet_path)

                def done(task):
                    self.pet = self.lib.finish_pet_suv(task)
                    self._case_nodes.append(self.pet)
                    self._show_case(t0)

                self._start("PET to SUV", task, done)
                return
            if pet_path is not None:
                self.pet = self.lib.load_pet(pet_path)
                self._case_nodes.append(self.pet)
            self._show_case(t0)
        except Exception as exc:  # shown to the user as one line
            s.error = f"Could not open the PET/CT: {exc}"

    def _show_case(self, t0: float):
        """CT (and PET fused over it) in every slice view, views fitted, the colour bars ready."""
        s = self.state
        display.show_pet_ct(self.scene, self.ct, self.pet, opacity=s.pet_opacity, suv_max=self.suv_max)
        self.slicer_app.display_manager.reset_views()
        s.suv_bar = colour_bar_css(self.scene, display.PET_COLOR_NODE_ID)
        s.cosine_bar = colour_bar_css(self.scene, "vtkMRMLColorTableNodeRainbow")
        s.pet_loaded = self.pet is not None
        s.overlay = "PET"
        s.case_loaded = True
        s.is_volume_loaded = True
        s.case_name = (f"{self.ct.GetName()} {tuple(self.ct.GetImageData().GetDimensions())}"
                       + (f" + {self.pet.GetName()}" if self.pet is not None else ""))
        s.status = f"Loaded in {time.monotonic() - t0:.1f} s."
        self._pick_model_for_inputs()

    def _pick_model_for_inputs(self):
        """Prefer a model whose inputs match what was loaded (PET/CT model with a PET, CT model without)."""
        current = next((m for m in self.state.models if m["path"] == self.state.model), None)
        has_pet = self.pet is not None
        if current is not None and current["needs_pet"] == has_pet:
            return
        for m in self.state.models:
            if m["needs_pet"] == has_pet:
                self.state.model = m["path"]
                return

    def on_pet_opacity(self, pet_opacity, **_):
        if self.ct is None:
            return
        if self.state.overlay == "PET":
            display.show_pet_ct(self.scene, self.ct, self.pet, opacity=float(pet_opacity), suv_max=self.suv_max)
        else:
            for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
                self.scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode").SetForegroundOpacity(float(pet_opacity))

    def on_show_pet(self):
        self._stop_follower()
        if self.ct is not None:
            display.show_pet_ct(self.scene, self.ct, self.pet, opacity=self.state.pet_opacity, suv_max=self.suv_max)
            self.state.overlay = "PET"

    # -- jobs -----------------------------------------------------------------------------------------
    def _start(self, kind: str, task, on_done):
        """Watch ``task.job`` (a started :class:`Job`) and call ``on_done(task)`` when it succeeded."""
        self.job = task.job
        s = self.state
        s.job_running, s.job_kind, s.progress, s.error = True, kind, 0, ""
        s.progress_text = f"{kind}: starting dinomed…"
        s.child_pid = self.job.pid or 0
        create_task(self._watch(task, kind, on_done))

    async def _watch(self, task, kind: str, on_done):
        """Tick the child from the server's loop (MRML stays on this thread) until it ends."""
        job = task.job
        while True:
            for event in job.tick():
                if event.get("event") in ("log", "error") and event.get("message"):
                    self._set(status=str(event["message"])[:300])
            fraction = job.fraction or 0.0
            self._set(progress=round(100 * fraction, 1), progress_text=f"{kind}: {job.progress[2]} {100 * fraction:.0f}%")
            if job.finished:
                break
            await asyncio.sleep(0.1)
        if job is not self.job:
            return
        self.job = None
        if job.state in (JobState.CANCELLED, JobState.STOPPED):
            self._set(job_running=False, job_kind="", progress=0, progress_text="", child_pid=0,
                      status=f"{kind}: cancelled.")
            return
        try:
            with self.state:
                on_done(task)
                self.state.progress = 100
        except Exception as exc:
            self._set(error=f"{kind} failed: {exc}")
        finally:
            self._set(job_running=False, job_kind="", child_pid=0)

    def on_cancel(self):
        if self.job is not None:
            self.job.cancel()
            self.state.status = "Cancelling…"

    # -- segmentation ---------------------------------------------------------------------------------
    def on_segment(self):
        s = self.state
        s.error = ""
        try:
            info = read_model_info(s.model)
            pet = self.pet if info.needs_pet or (self.pet is not None and info.lesion_labels) else None
            self._segment_clicked_at = time.monotonic()
            task = self.lib.start_segmentation(self.ct, info.path, pet=pet, device=s.device)
            self.model_info = info
            self._start("Segmentation", task, self._on_segmented)
        except Exception as exc:
            s.error = f"Could not start the segmentation: {exc}"

    def _on_segmented(self, task):
        for node in (self.seg, self.table):
            if node is not None and self.scene.GetNodeByID(node.GetID()) is node:
                self.scene.RemoveNode(node)
        result = self.lib.finish_segmentation(task)
        self.seg, self.table = result.segmentation, result.lesion_table
        self._case_nodes += [n for n in (self.seg, self.table) if n is not None]
        editor = self.slicer_app.segmentation_editor
        editor.set_active_segmentation(self.seg, self.ct)
        editor.set_surface_representation_enabled(True)
        for view in self.slicer_app.view_manager.get_threed_views():
            view.reset_view()
        s = self.state
        s.segments = self._segment_legend()
        s.segmented = True
        self._fill_lesion_table()
        took = time.monotonic() - self._segment_clicked_at
        s.timings = {**s.timings, "segment_server_s": round(took, 2)}
        s.status = (f"Segmented with {task.model.name}: {len(s.segments)} segments"
                    + (f", {len(s.lesion_rows)} lesions" if self.table is not None else "") + f" ({took:.1f} s).")

    def _segment_legend(self) -> list[dict]:
        segmentation = self.seg.GetSegmentation()
        legend = []
        for i in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(i)
            r, g, b = segment.GetColor()
            tag = segment.GetTerminology() if hasattr(segment, "GetTerminology") else ""
            legend.append({"name": segment.GetName(), "color": f"rgb({int(r * 255)},{int(g * 255)},{int(b * 255)})",
                           "rgb": [int(round(r * 255)), int(round(g * 255)), int(round(b * 255))],
                           "terminology": tag if isinstance(tag, str) else ""})
        return legend

    def _fill_lesion_table(self):
        s = self.state
        if self.table is None:
            s.lesion_rows, s.lesion_total = [], None
            return
        values = lesions.table_values(self.table)
        n = self.table.GetTable().GetNumberOfRows()
        rows, total = [], None
        for r in range(n):
            row = {"row": r, "lesion": str(values.get("lesion", [""] * n)[r]), "name": str(values.get("name", [""] * n)[r])}
            for key, digits in (("suv_max", 2), ("suv_peak", 2), ("suv_mean", 2), ("mtv_ml", 2), ("tlg", 1)):
                row[key] = _fmt(values[key][r], digits) if key in values else ""
            if row["lesion"] == "total":
                total = row
            else:
                rows.append(row)
        s.lesion_rows, s.lesion_total, s.selected_lesion = rows, total, -1

    def on_lesion_row(self, index):
        index = int(index)
        row = self.state.lesion_rows[index]
        try:
            ras = lesions.lesion_centroid_ras(self.table, int(row["row"]))
            lesions.jump_slices_to(self.scene, ras)
            self.state.selected_lesion = index
            self.state.status = (f"Lesion {row['lesion']}: SUVmax {row['suv_max']}, centroid RAS "
                                 f"({ras[0]:.1f}, {ras[1]:.1f}, {ras[2]:.1f}) mm")
        except Exception as exc:
            self.state.error = f"Could not go to the lesion: {exc}"

    def on_recompute_lesions(self):
        if self.seg is None or self.pet is None:
            self.state.error = "The lesion table needs a segmentation and a PET"
            return
        try:
            self.table = self.lib.recompute_lesion_table(self.seg, self.pet, self.ct, self.model_info,
                                                         table_node=self.table)
            self._fill_lesion_table()
            self.state.status = "Lesion table recomputed from the segmentation as it is now."
        except Exception as exc:
            self.state.error = f"Could not recompute the lesion table: {exc}"

    # -- features -------------------------------------------------------------------------------------
    def _start_features(self, pca: bool, then):
        s = self.state
        s.error = ""
        try:
            info = read_model_info(s.model)
            pet = self.pet if info.needs_pet else None
            task = self.lib.start_features(self.ct, model_dir=info.path, pet=pet, pca=pca,
                                           cache_dir=self._feature_cache)

            def done(task):
                pca_node, self.grid = self.lib.finish_features(task)
                self.state.features_ready = True
                if pca_node is not None:
                    if self.pca_node is not None and self.scene.GetNodeByID(self.pca_node.GetID()) is self.pca_node:
                        self.scene.RemoveNode(self.pca_node)
                    self.pca_node = pca_node
                    self._case_nodes.append(pca_node)
                then()

            self._start("Features", task, done)
        except Exception as exc:
            s.error = f"Could not compute the features: {exc}"

    def on_pca(self):
        def show():
            self._stop_follower()
            display.show_overlay(self.scene, self.pca_node, opacity=self.state.pet_opacity)
            self.state.overlay = "PCA map of the model's features"
            self.state.status = "PCA map: the first three principal components of the features as RGB."

        if self.pca_node is not None:
            show()
        else:
            self._start_features(pca=True, then=show)

    def on_pick_point(self):
        if self.grid is None:
            self._start_features(pca=True, then=self._place_point)
        else:
            self._place_point()

    def _place_point(self):
        import slicer

        if self.follower is None:
            self.follower = features.CosineMapFollower(self.scene, self.ct, self.grid)
        if self.point is None or self.scene.GetNodeByID(self.point.GetID()) is not self.point:
            self.point = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Similarity point")
            self.point.SetMaximumNumberOfControlPoints(1)
            self.point.CreateDefaultDisplayNodes()
            self._case_nodes.append(self.point)
            self.follower.follow(self.point)
            for event in (slicer.vtkMRMLMarkupsNode.PointModifiedEvent,
                          slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent):
                self.point.AddObserver(event, self._on_point_moved)
        else:
            self.point.RemoveAllControlPoints()
        self.slicer_app.markups_logic.place_node(self.point, persistent=False)
        self.state.picking_point = True
        self.state.status = "Click in a slice view: the cosine-similarity map follows the point."

    def _on_point_moved(self, caller, event):
        if self.follower is None or self.follower.volume is None or self.follower.point_index is None:
            return
        if self.state.overlay != "Cosine similarity":
            display.show_overlay(self.scene, self.follower.volume, opacity=max(0.5, self.state.pet_opacity))
            if self.follower.volume not in self._case_nodes:
                self._case_nodes.append(self.follower.volume)
        i, j, k = (int(round(v)) for v in self.follower.point_index)
        self._set(overlay="Cosine similarity", picking_point=False,
                  cosine_point=f"Cosine map to voxel (i, j, k) = ({i}, {j}, {k})")

    def _stop_follower(self):
        if self.follower is not None:
            self.follower.stop()
        self.follower = None
        if self.point is not None and self.scene.GetNodeByID(self.point.GetID()) is self.point:
            self.scene.RemoveNode(self.point)
        self.point = None
        self.state.picking_point = False
        self.state.cosine_point = ""
        try:
            self.slicer_app.markups_logic.disable_place_mode()
        except RuntimeError:
            pass

    # -- save, training set ---------------------------------------------------------------------------
    def _label_values(self) -> dict[str, int]:
        """Segment name -> label value: the model's values, the next free ones for segments the user added."""
        known = {label.name: label.value for label in (self.model_info.labels if self.model_info else [])}
        values, used = {}, set(known.values())
        segmentation = self.seg.GetSegmentation()
        for i in range(segmentation.GetNumberOfSegments()):
            name = segmentation.GetNthSegment(i).GetName()
            if name in known:
                values[name] = known[name]
            else:
                value = max(used | {0}) + 1
                used.add(value)
                values[name] = value
        return values

    def on_save(self):
        s = self.state
        try:
            out = Path(s.save_path).expanduser()
            if not out.name.endswith((".nii.gz", ".nii")):
                raise ValueError(f"{out}: expected a NIfTI file name ending in .nii.gz or .nii")
            values = self._label_values()
            array = labelmap_array_from_segmentation(self.seg, self.ct, values)
            node = add_labelmap_node(self.scene, array.astype("uint8" if max(values.values(), default=0) < 256
                                                               else "uint16"), self.ct, "__dinoseg_web_save__")
            try:
                write_volume(node, out)
            finally:
                display_node = node.GetDisplayNode()
                self.scene.RemoveNode(node)
                if display_node is not None:
                    self.scene.RemoveNode(display_node)
            sidecar = out.with_name(out.name[: -len(".nii.gz") if out.name.endswith(".nii.gz") else -len(".nii")]
                                    + ".labels.json")
            labels = []
            model_labels = {label.name: label for label in (self.model_info.labels if self.model_info else [])}
            for legend in self._segment_legend():
                entry = {"value": values[legend["name"]], "name": legend["name"], "color": legend["rgb"],
                         "lesion": bool(model_labels[legend["name"]].lesion) if legend["name"] in model_labels else False}
                label = model_labels.get(legend["name"])
                if label is not None and (label.category or label.type):
                    entry["terminology"] = {"category": list(label.category or ()), "type": list(label.type or ())}
                entry["voxels"] = int((array == entry["value"]).sum())
                labels.append(entry)
            doc = {"format": LABELS_FORMAT, "model": self.model_info.name if self.model_info else None,
                   "background": 0, "labels": labels, "edited_in": "DINOSeg web"}
            tmp = sidecar.with_name(f".{sidecar.name}.tmp")
            tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, sidecar)
            s.status = f"Saved {out} and {sidecar.name}."
        except Exception as exc:
            s.error = f"Could not save: {exc}"

    def on_add_case(self):
        s = self.state
        try:
            dataset = Path(s.dataset_dir).expanduser()
            case_id = s.case_id.strip() or training_set.next_case_id(dataset)
            written = training_set.add_case(dataset, case_id, self.ct, self.seg, self.pet)
            s.status = f"Added {case_id} to {dataset}: {', '.join(p.name for p in written.values())}"
            s.case_id = ""
        except Exception as exc:
            s.error = f"Could not add the case: {exc}"

    def shutdown(self):
        self._remove_models_listener()
        if self.job is not None:
            self.job.cancel()
        shutil.rmtree(self._feature_cache, ignore_errors=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dinoseg_web", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine "
                        "only; reach a remote server through an SSH tunnel)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--dinomed-python", default=os.environ.get("DINOSEG_DINOMED_PYTHON"),
                        help="the Python (with torch and dinomed) that runs the dinomed children")
    parser.add_argument("--data-dir", default=os.environ.get("DINOSEG_DATA_DIR", os.getcwd()),
                        help="the server folder whose volumes and DICOM folders the page offers")
    parser.add_argument("--models-dir", default=str(default_models_dir()), help="your model folders")
    parser.add_argument("--output-dir", default=os.environ.get("DINOSEG_OUTPUT_DIR",
                                                               os.path.join(os.path.expanduser("~"), "dinoseg_output")),
                        help="default folder for saved segmentations and the training set")
    parser.add_argument("--suv-max", type=float, default=10.0, help="top of the PET colour bar (SUV)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    python = args.dinomed_python
    if not python:
        sys.exit("dinoseg_web: error: --dinomed-python is required (the project's main venv Python, which has "
                 "torch and dinomed; `make web` passes it)")
    if not os.path.isfile(python):
        sys.exit(f"dinoseg_web: error: --dinomed-python {python} does not exist")
    # the children import dinomed from this checkout when it has one (the main venv may point elsewhere)
    core_src = REPO_ROOT / "core_lib" / "src"
    if core_src.is_dir():
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(core_src), os.environ.get("PYTHONPATH")) if p)
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkOSOpenGLRenderWindow")
    app = DINOSegWebApp(dinomed_python=python, data_dir=Path(args.data_dir), models_dir=Path(args.models_dir),
                        output_dir=Path(args.output_dir), rca_encoder=os.environ.get("RCA_ENCODER") or None,
                        suv_max=args.suv_max)
    print(f"DINOSeg web: open http://{args.host}:{args.port}/ in a browser", flush=True)
    try:
        app.server.start(host=args.host, port=args.port, open_browser=False)
    finally:
        app.shutdown()
