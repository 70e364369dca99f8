"""DINOSeg's logic: from scene nodes to a ``dinomed`` child process and back to scene nodes.

``DINOSegLogic`` takes the scene (and optionally a process factory) as arguments, so the same code runs in
Slicer, in a batch script and in the headless tests. A segmentation is two steps so that the GUI stays
live in between: :meth:`start_segmentation` writes the inputs and starts ``dinomed segment``;
:meth:`finish_segmentation` turns the outputs into a segmentation node and a lesion table.
:meth:`segment` does both, blocking.
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
from .process import DinomedProcess
from .segmentation import place_in_study, segmentation_from_labelmap
from .volumes import read_volume, write_volume

DEVICES = ("auto", "cpu", "cuda")


class DINOSegError(RuntimeError):
    """Something the user can fix (missing input, wrong model for the inputs); shown as one line."""


@dataclass
class SegmentationJob:
    """A running ``dinomed segment``: its inputs, the files it will write, and the process."""

    ct: object
    pet: object | None
    model: ModelInfo
    work_dir: Path
    out_path: Path
    stats_path: Path | None
    process: DinomedProcess
    name: str


@dataclass
class SegmentationResult:
    segmentation: object
    lesion_table: object | None = None
    files: dict = field(default_factory=dict)


class DINOSegLogic:
    """Qt-free logic of the DINOSeg module. ``process_factory()`` makes the runner (a
    :class:`~DINOSegLib.process.DinomedProcess` by default; tests pass one with a given Python)."""

    def __init__(self, scene, process_factory: Callable[[], DinomedProcess] | None = None,
                 models_dirs: list[str | os.PathLike] | None = None):
        self.scene = scene
        self.process_factory = process_factory or DinomedProcess
        self.models_dirs = [Path(p) for p in (models_dirs or [BUNDLED_MODELS_DIR])]

    # -- models ---------------------------------------------------------------------------------------
    def available_models(self) -> list[Path]:
        return list_model_folders(*self.models_dirs)

    # -- inputs ---------------------------------------------------------------------------------------
    def load_ct(self, path: str | os.PathLike, name: str | None = None):
        """A CT from a file (NIfTI, NRRD, MHA) or a DICOM series (a file of it, or its folder)."""
        return read_volume(self.scene, _series_file(Path(path)), name=name or "CT")

    def pet_to_suv_command(self, pet_dicom: str | os.PathLike, out_path: str | os.PathLike) -> list[str]:
        """``dinomed suv`` arguments: PET DICOM series to body-weight SUV (issue 3's CLI)."""
        return ["suv", str(pet_dicom), "--out", str(out_path)]

    def load_pet(self, path: str | os.PathLike, name: str | None = None, timeout: float | None = 600):
        """A PET in SUV: a DICOM folder is converted by ``dinomed suv`` in a child process (QIBA SUV, decay
        correction); a NIfTI/NRRD file is taken as already in SUV."""
        path = Path(path)
        if path.is_dir() or path.suffix.lower() in ("", ".dcm", ".ima"):
            work = Path(tempfile.mkdtemp(prefix="dinoseg-suv-"))
            try:
                out = work / "pet_suv.nrrd"
                process = self.process_factory()
                process.start(self.pet_to_suv_command(path if path.is_dir() else path.parent, out))
                process.wait(timeout=timeout)
                process.check()
                node = read_volume(self.scene, out, name=name or "PET (SUV)")
            finally:
                shutil.rmtree(work, ignore_errors=True)
        else:
            node = read_volume(self.scene, path, name=name or "PET (SUV)")
        set_suv_units(node)
        return node

    def load_pet_ct(self, ct_path, pet_path=None):
        """Load a CT and optionally a PET (SUV), and show the PET fused over the CT."""
        ct = self.load_ct(ct_path)
        pet = self.load_pet(pet_path) if pet_path else None
        show_pet_ct(self.scene, ct, pet)
        return ct, pet

    # -- segmentation ---------------------------------------------------------------------------------
    def segment_command(self, model_dir, ct_path, out_path, pet_path=None, stats_path=None, device="auto") -> list[str]:
        """``dinomed segment`` arguments (issue 5's CLI)."""
        if device not in DEVICES:
            raise DINOSegError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
        args = ["segment", "--model", str(model_dir), "--ct", str(ct_path), "--out", str(out_path), "--device", device]
        if pet_path is not None:
            args += ["--pet", str(pet_path)]
        if stats_path is not None:
            args += ["--stats", str(stats_path)]
        return args

    def start_segmentation(self, ct, model_dir, pet=None, device: str = "auto", name: str | None = None,
                           work_dir: str | os.PathLike | None = None) -> SegmentationJob:
        """Write the inputs to a work folder and start ``dinomed segment`` on them (returns at once)."""
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
        process = self.process_factory()
        process.start(self.segment_command(model.path, ct_path, out_path, pet_path, stats_path, device))
        return SegmentationJob(ct=ct, pet=pet, model=model, work_dir=work, out_path=out_path,
                               stats_path=stats_path, process=process,
                               name=name or f"{ct.GetName()} segmentation")

    def finish_segmentation(self, job: SegmentationJob, keep_files: bool = False) -> SegmentationResult:
        """After the child exited: the segmentation node (and lesion table), placed in the CT's study."""
        job.process.wait()
        job.process.check()
        out_path = Path(job.process.artifacts().get("segmentation", job.out_path))
        labelmap = read_volume(self.scene, out_path, labelmap=True, add_to_scene=False)
        seg = segmentation_from_labelmap(self.scene, labelmap, job.model, job.ct, job.name)
        place_in_study(self.scene, seg, job.ct)
        table = None
        stats = job.process.artifacts().get("lesion_table") or job.process.artifacts().get("stats")
        stats_path = Path(stats) if stats else job.stats_path
        if stats_path is not None and stats_path.is_file():
            table = lesion_table_node(self.scene, stats_path, name=f"{job.ct.GetName()} lesions")
            table.SetNodeReferenceID("DINOSeg.Segmentation", seg.GetID())
            place_in_study(self.scene, table, job.ct)
        if not keep_files:
            shutil.rmtree(job.work_dir, ignore_errors=True)
        return SegmentationResult(segmentation=seg, lesion_table=table,
                                  files={"segmentation": out_path, "stats": stats_path})

    def segment(self, ct, model_dir, pet=None, device: str = "auto", timeout: float | None = None, **kwargs) -> SegmentationResult:
        """Segment and wait (scripts, tests)."""
        job = self.start_segmentation(ct, model_dir, pet=pet, device=device, **kwargs)
        try:
            job.process.wait(timeout=timeout)
        except BaseException:
            job.process.cancel()
            raise
        return self.finish_segmentation(job)

    def lesions_command(self, pet_path, seg_path, out_path) -> list[str]:
        """``dinomed lesions`` arguments (issue 3's CLI): statistics of a (corrected) label map."""
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
            process = self.process_factory()
            process.start(self.lesions_command(pet_path, seg_path, out))
            process.wait(timeout=timeout)
            process.check()
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
        """``dinomed features`` arguments (issue 6's CLI). ``extra_args`` e.g. ``["--arch", "vit_tiny",
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
                       work_dir: str | os.PathLike | None = None) -> FeaturesJob:
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
        process = self.process_factory()
        process.start(self.features_command(image_path, model_dir, backbone, layer, pca_path, cache, pet_path, extra_args))
        return FeaturesJob(image=image, work_dir=work, cache_dir=cache, pca_path=pca_path, process=process)

    def finish_features(self, job: "FeaturesJob", keep_files: bool = False):
        """After the child exited: the PCA overlay node (or None) and the cached features (a FeatureGrid)."""
        from .features import load_rgb_overlay, read_feature_cache

        job.process.wait()
        job.process.check()
        artifacts = job.process.artifacts()
        pca_node = None
        if job.pca_path is not None:
            pca_node = load_rgb_overlay(self.scene, artifacts.get("pca", job.pca_path), job.image,
                                        name=f"{job.image.GetName()} PCA map")
        if "features" not in artifacts:
            raise DINOSegError("dinomed features reported no feature cache entry")
        grid = read_feature_cache(artifacts["features"], job.image)
        if not keep_files:
            shutil.rmtree(job.work_dir, ignore_errors=True)
        return pca_node, grid


@dataclass
class FeaturesJob:
    """A running ``dinomed features``: the image, its work folder, the cache and the process."""

    image: object
    work_dir: Path
    cache_dir: Path
    pca_path: Path | None
    process: DinomedProcess


def _series_file(path: Path) -> Path:
    """A DICOM folder is read through one of its files (ITK's archetype reader finds the rest of the series)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DINOSegError(f"the folder {path} holds no files")
        return files[0]
    return path
