"""DINOSeg's logic: from scene nodes to a ``dinomed`` child process and back to scene nodes.

``DINOSegLogic`` takes the scene (and optionally the Python that runs ``dinomed``) as arguments, so the same
code runs in Slicer, in the browser front-end, in a batch script and in the headless tests. Every long step
is two calls so that the GUI stays live in between: ``start_…`` writes the inputs and starts a
:class:`~DINOSegLib.jobs.Job` (the front-end's timer calls ``job.tick()``; ``on_finish`` fires when it
ended); ``finish_…`` turns the outputs into scene nodes. ``segment`` / ``load_pet`` do both, blocking.

A job may outlive its inputs: the scene can be closed, or the CT deleted, while the child runs.
``finish_…`` then raises :class:`InputRemovedError` and adds nothing to the scene (the result is dropped).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .display import set_suv_units, show_pet_ct
from .lesions import lesion_table_node
from .models import BUNDLED_MODELS_DIR, ModelInfo, list_model_folders, read_model_info
from .jobs import Job
from .segmentation import place_in_study, segmentation_from_labelmap
from .volumes import read_volume, write_volume

DEVICES = ("auto", "cpu", "cuda", "mps")  # what dinomed.runtime.resolve_device takes (DINOPretrain offers the same)


class DINOSegError(RuntimeError):
    """Something the user can fix (missing input, wrong model for the inputs); shown as one line."""


class InputRemovedError(DINOSegError):
    """An input node left the scene (scene closed, node deleted) while its job ran: the result is dropped."""


def _in_scene(scene, node) -> bool:
    return node is not None and node.GetScene() is scene and scene.GetNodeByID(node.GetID()) is node


def _require_in_scene(scene, task_title: str, *nodes) -> None:
    for node in nodes:
        if node is not None and not _in_scene(scene, node):
            raise InputRemovedError(f"{task_title}: the input volume was removed from the scene while the job ran; "
                                    "the result was dropped")


@dataclass
class SegmentationJob:
    """A running ``dinomed segment``: its inputs, the files it will write, and the :class:`Job`."""

    ct: object
    pet: object | None
    model: ModelInfo
    work_dir: Path
    out_path: Path
    stats_path: Path | None
    job: Job
    name: str


@dataclass
class SuvJob:
    """A running ``dinomed suv`` (PET DICOM series -> SUV volume)."""

    source: Path
    work_dir: Path
    out_path: Path
    job: Job
    name: str


@dataclass
class SegmentationResult:
    segmentation: object
    lesion_table: object | None = None
    files: dict = field(default_factory=dict)


class DINOSegLogic:
    """Qt-free logic of the DINOSeg module. ``python`` runs ``dinomed`` (default: Slicer's own Python, see
    :func:`~DINOSegLib.jobs.default_python`); ``models_dirs`` are the folders the model list shows."""

    def __init__(self, scene, python: str | None = None, models_dirs: list[str | os.PathLike] | None = None):
        self.scene = scene
        self.python = python
        self.models_dirs = [Path(p) for p in (models_dirs or [BUNDLED_MODELS_DIR])]

    def make_job(self, args, title: str = "", temp_paths=(), on_event: Callable[[dict], None] | None = None,
                 on_finish: Callable[[Job], None] | None = None) -> Job:
        """A (not yet started) :class:`Job` running ``dinomed args`` with this logic's Python."""
        return Job(args, title=title, python=self.python, temp_paths=temp_paths, on_event=on_event,
                   on_finish=on_finish)

    # -- models ---------------------------------------------------------------------------------------
    def available_models(self) -> list[Path]:
        return list_model_folders(*self.models_dirs)

    # -- inputs ---------------------------------------------------------------------------------------
    def load_ct(self, path: str | os.PathLike, name: str | None = None, dicom_loader: Callable | None = None):
        """A CT from a file (NIfTI, NRRD, MHA) or a DICOM series (a file of it, or its folder).

        A DICOM series goes through ``dicom_loader(folder) -> volume node`` when one is given: inside Slicer
        the widget passes one that imports the series into Slicer's DICOM database and loads it with the DICOM
        plugins, so that the CT keeps its DICOM identity (study, series, instance UIDs in the subject hierarchy)
        and a segmentation of it can be exported as DICOM SEG. slicer-core has no DICOM database or plugins,
        so without a loader (scripts, tests, the web app) the series is read by ITK's archetype reader: right
        voxels and geometry, but no DICOM references (DICOM SEG export then needs the CT from the database)."""
        path = Path(path)
        if dicom_loader is not None and self.is_dicom_path(path):
            node = dicom_loader(path if path.is_dir() else path.parent)
            if node is None:
                raise DINOSegError(f"no volume could be loaded from the DICOM series in {path}")
            if name:
                node.SetName(name)
            return node
        return read_volume(self.scene, _series_file(path), name=name or "CT")

    def needs_dinomed_to_load(self, ct_path, pet_path=None) -> bool:
        """Whether loading these files needs ``dinomed`` (a DICOM PET is converted to SUV by ``dinomed suv``);
        a CT, or a PET already in SUV (NIfTI/NRRD), loads in Slicer alone, so no dependency is installed for it."""
        return pet_path is not None and self.is_dicom_path(pet_path)

    def pet_to_suv_command(self, pet_dicom: str | os.PathLike, out_path: str | os.PathLike) -> list[str]:
        """``dinomed suv`` arguments: PET DICOM series to body-weight SUV."""
        return ["suv", str(pet_dicom), "--out", str(out_path)]

    @staticmethod
    def is_dicom_path(path: str | os.PathLike) -> bool:
        """A DICOM folder or a file of a DICOM series (by name: a folder, ``.dcm``/``.ima``, or no suffix)."""
        path = Path(path)
        return path.is_dir() or path.suffix.lower() in ("", ".dcm", ".ima")

    def start_pet_suv(self, pet_dicom: str | os.PathLike, name: str | None = None,
                      on_event: Callable[[dict], None] | None = None,
                      on_finish: Callable[["SuvJob"], None] | None = None) -> SuvJob:
        """Start ``dinomed suv`` on a PET DICOM series (QIBA body-weight SUV, decay corrected); returns at once.
        :meth:`finish_pet_suv` reads the result into the scene."""
        path = Path(pet_dicom)
        source = path if path.is_dir() else path.parent
        work = Path(tempfile.mkdtemp(prefix="dinoseg-suv-"))
        out = work / "pet_suv.nrrd"
        task: SuvJob | None = None
        job = self.make_job(self.pet_to_suv_command(source, out), title="PET to SUV", temp_paths=[work],
                            on_event=on_event, on_finish=(lambda _job: on_finish(task)) if on_finish else None)
        task = SuvJob(source=source, work_dir=work, out_path=out, job=job, name=name or "PET (SUV)")
        job.start()
        return task

    def finish_pet_suv(self, task: SuvJob):
        """The SUV volume node of a finished :meth:`start_pet_suv` (its work folder is removed)."""
        try:
            task.job.wait()
            task.job.check()
            node = read_volume(self.scene, task.job.artifacts.get("suv", task.out_path), name=task.name)
        finally:
            shutil.rmtree(task.work_dir, ignore_errors=True)
        set_suv_units(node)
        return node

    def load_pet(self, path: str | os.PathLike, name: str | None = None, timeout: float | None = 600):
        """A PET in SUV, blocking (scripts, tests): a DICOM folder is converted by ``dinomed suv`` in a child
        process; a NIfTI/NRRD file is taken as already in SUV."""
        path = Path(path)
        if self.is_dicom_path(path):
            task = self.start_pet_suv(path, name=name)
            task.job.wait(timeout=timeout)
            return self.finish_pet_suv(task)
        node = read_volume(self.scene, path, name=name or "PET (SUV)")
        set_suv_units(node)
        return node

    def load_pet_ct(self, ct_path, pet_path=None, opacity: float = 0.5, dicom_loader: Callable | None = None):
        """Load a CT and optionally a PET (SUV), and show the PET fused over the CT at ``opacity`` (blocking;
        the widget loads the PET of a DICOM series with :meth:`start_pet_suv` instead)."""
        ct = self.load_ct(ct_path, dicom_loader=dicom_loader)
        pet = self.load_pet(pet_path) if pet_path else None
        show_pet_ct(self.scene, ct, pet, opacity=opacity)
        return ct, pet

    # -- segmentation ---------------------------------------------------------------------------------
    def segment_command(self, model_dir, ct_path, out_path, pet_path=None, stats_path=None, device="auto") -> list[str]:
        """``dinomed segment`` arguments."""
        if device not in DEVICES:
            raise DINOSegError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
        args = ["segment", "--model", str(model_dir), "--ct", str(ct_path), "--out", str(out_path), "--device", device]
        if pet_path is not None:
            args += ["--pet", str(pet_path)]
        if stats_path is not None:
            args += ["--stats", str(stats_path)]
        return args

    def start_segmentation(self, ct, model_dir, pet=None, device: str = "auto", name: str | None = None,
                           work_dir: str | os.PathLike | None = None,
                           on_event: Callable[[dict], None] | None = None,
                           on_finish: Callable[[SegmentationJob], None] | None = None) -> SegmentationJob:
        """Write the inputs to a work folder and start ``dinomed segment`` on them (returns at once);
        ``on_finish(task)`` is called from ``task.job.tick()`` when the child ended."""
        if ct is None or ct.GetImageData() is None:
            raise DINOSegError("select a CT volume first")
        model = read_model_info(model_dir)
        if model.needs_pet and pet is None:
            raise DINOSegError(f"the model {model.name!r} needs a PET as well as the CT; select a PET volume")
        work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="dinoseg-"))
        work.mkdir(parents=True, exist_ok=True)
        ct_path = write_volume(ct, work / "ct.nrrd")
        pet_path = write_volume(pet, work / "pet.nrrd") if pet is not None else None
        out_path = work / "segmentation.nrrd"
        stats_path = work / "lesions.csv" if pet is not None and model.lesion_labels else None
        task: SegmentationJob | None = None
        job = self.make_job(self.segment_command(model.path, ct_path, out_path, pet_path, stats_path, device),
                            title="Segmentation", temp_paths=[] if work_dir else [work], on_event=on_event,
                            on_finish=(lambda _job: on_finish(task)) if on_finish else None)
        task = SegmentationJob(ct=ct, pet=pet, model=model, work_dir=work, out_path=out_path, stats_path=stats_path,
                               job=job, name=name or f"{ct.GetName()} segmentation")
        job.start()
        return task

    def finish_segmentation(self, task: SegmentationJob, keep_files: bool = False) -> SegmentationResult:
        """After the child exited: the segmentation node (and lesion table), placed in the CT's study.
        :class:`InputRemovedError` (and nothing added) when the CT or PET left the scene meanwhile."""
        job = task.job
        try:
            job.wait()
            job.check()
            _require_in_scene(self.scene, "Segmentation", task.ct, task.pet)
            out_path = Path(job.artifacts.get("segmentation", task.out_path))
            labelmap = read_volume(self.scene, out_path, labelmap=True, add_to_scene=False)
            seg = segmentation_from_labelmap(self.scene, labelmap, task.model, task.ct, task.name)
            place_in_study(self.scene, seg, task.ct)
            table = None
            stats = job.artifacts.get("lesion_table") or job.artifacts.get("stats")
            stats_path = Path(stats) if stats else task.stats_path
            if stats_path is not None and stats_path.is_file():
                table = lesion_table_node(self.scene, stats_path, name=f"{task.ct.GetName()} lesions")
                table.SetNodeReferenceID("DINOSeg.Segmentation", seg.GetID())
                place_in_study(self.scene, table, task.ct)
        finally:
            if not keep_files:
                shutil.rmtree(task.work_dir, ignore_errors=True)
        return SegmentationResult(segmentation=seg, lesion_table=table,
                                  files={"segmentation": out_path, "stats": stats_path})

    def segment(self, ct, model_dir, pet=None, device: str = "auto", timeout: float | None = None, **kwargs) -> SegmentationResult:
        """Segment and wait (scripts, tests)."""
        task = self.start_segmentation(ct, model_dir, pet=pet, device=device, **kwargs)
        try:
            task.job.wait(timeout=timeout)
        except BaseException:
            task.job.cancel()
            raise
        return self.finish_segmentation(task)

    def lesions_command(self, pet_path, seg_path, out_path) -> list[str]:
        """``dinomed lesions`` arguments: statistics of a (corrected) label map."""
        return ["lesions", "--pet", str(pet_path), "--seg", str(seg_path), "--out", str(out_path)]

    def recompute_lesion_table(self, seg_node, pet, reference, model: ModelInfo | None = None, table_node=None,
                               timeout: float | None = 600):
        """Lesion statistics of the segmentation as it is now (after manual corrections): the label map and
        the PET go to ``dinomed lesions`` in a child process; the table node is (re)filled from its CSV."""
        from .segmentation import add_labelmap_node, labelmap_array_from_segmentation

        label_values = None
        if model is not None and model.lesion_labels:
            label_values = {label.name: label.value for label in model.lesion_labels}
        work = Path(tempfile.mkdtemp(prefix="dinoseg-lesions-"))
        labelmap = None
        try:
            labelmap = add_labelmap_node(self.scene, labelmap_array_from_segmentation(seg_node, reference, label_values),
                                         reference, "__dinoseg_lesions__")
            seg_path = write_volume(labelmap, work / "labels.nrrd")
            pet_path = write_volume(pet, work / "pet.nrrd")
            out = work / "lesions.csv"
            job = self.make_job(self.lesions_command(pet_path, seg_path, out), title="Lesion statistics").start()
            job.wait(timeout=timeout)
            job.check()
            return lesion_table_node(self.scene, out, name=f"{reference.GetName()} lesions", node=table_node)
        finally:
            if labelmap is not None:
                display = labelmap.GetDisplayNode()
                self.scene.RemoveNode(labelmap)
                if display is not None:
                    self.scene.RemoveNode(display)
            shutil.rmtree(work, ignore_errors=True)

    # -- features -------------------------------------------------------------------------------------
    def features_command(self, image_path, model_dir=None, backbone=None, layer=None, pca_out=None,
                         cache_dir=None, pet_path=None, extra_args=()) -> list[str]:
        """``dinomed features`` arguments. ``extra_args`` e.g. ``["--arch", "vit_tiny",
        "--random-init"]`` instead of a model or backbone (demos, tests)."""
        if model_dir is not None and backbone is not None:
            raise DINOSegError("choose either a model folder or a backbone checkpoint for the features, not both")
        if model_dir is None and backbone is None and not extra_args:
            raise DINOSegError("choose a model folder or a backbone checkpoint for the features")
        args = ["features", "--image", str(image_path)]
        if model_dir is not None:
            args += ["--model", str(model_dir)]
        elif backbone is not None:
            args += ["--backbone", str(backbone)]
        if pet_path is not None:
            args += ["--pet", str(pet_path)]
        if layer is not None:
            args += ["--layer", str(int(layer))]
        if pca_out is not None:
            args += ["--pca", str(pca_out)]
        if cache_dir is not None:
            args += ["--cache", str(cache_dir)]
        return args + [str(a) for a in extra_args]

    def start_features(self, image, model_dir=None, backbone=None, layer: int | None = None, pet=None,
                       cache_dir: str | os.PathLike | None = None, pca: bool = True, extra_args=(),
                       work_dir: str | os.PathLike | None = None, on_event: Callable[[dict], None] | None = None,
                       on_finish: Callable[["FeaturesJob"], None] | None = None) -> "FeaturesJob":
        """Write the image and start ``dinomed features`` (features cached in ``cache_dir``, by default a
        folder kept for the session, so that the next map of the same image and model is instant)."""
        if image is None or image.GetImageData() is None:
            raise DINOSegError("select an image volume first")
        work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="dinoseg-features-"))
        work.mkdir(parents=True, exist_ok=True)
        cache = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "dinoseg-feature-cache"
        image_path = write_volume(image, work / "image.nrrd")
        pet_path = write_volume(pet, work / "pet.nrrd") if pet is not None else None
        pca_path = work / "pca.nrrd" if pca else None
        task: FeaturesJob | None = None
        job = self.make_job(self.features_command(image_path, model_dir, backbone, layer, pca_path, cache, pet_path,
                                                  extra_args),
                            title="Features", temp_paths=[] if work_dir else [work], on_event=on_event,
                            on_finish=(lambda _job: on_finish(task)) if on_finish else None)
        task = FeaturesJob(image=image, work_dir=work, cache_dir=cache, pca_path=pca_path, job=job)
        job.start()
        return task

    def finish_features(self, task: "FeaturesJob", keep_files: bool = False):
        """After the child exited: the PCA overlay node (or None) and the cached features (a FeatureGrid).
        :class:`InputRemovedError` (and nothing added) when the image left the scene meanwhile."""
        from .features import load_rgb_overlay, read_feature_cache

        job = task.job
        try:
            job.wait()
            job.check()
            _require_in_scene(self.scene, "Features", task.image)
            artifacts = job.artifacts
            if "features" not in artifacts:
                raise DINOSegError("dinomed features reported no feature cache entry")
            grid = read_feature_cache(artifacts["features"], task.image)
            pca_node = None
            if task.pca_path is not None:
                pca_node = load_rgb_overlay(self.scene, artifacts.get("pca", task.pca_path), task.image,
                                            name=f"{task.image.GetName()} PCA map")
        finally:
            if not keep_files:
                shutil.rmtree(task.work_dir, ignore_errors=True)
        return pca_node, grid


@dataclass
class FeaturesJob:
    """A running ``dinomed features``: the image, its work folder, the cache and the :class:`Job`."""

    image: object
    work_dir: Path
    cache_dir: Path
    pca_path: Path | None
    job: Job


def _series_file(path: Path) -> Path:
    """A DICOM folder is read through one of its files (ITK's archetype reader finds the rest of the series)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DINOSegError(f"the folder {path} holds no files")
        return files[0]
    return path
