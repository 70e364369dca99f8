"""Stand-in for the PyTorch extension's ``PyTorchUtils`` module (not Slicer's code; its real installTorch has this
signature and runs ``light_the_torch install torch<req> torchvision<req>``): records its arguments in the pip
recorder's log and leaves a CUDA build of torch and torchvision installed, as the extension does."""
import json
import os
from pathlib import Path


class PyTorchUtilsLogic:
    def torchInstalled(self):
        import importlib.metadata

        try:
            importlib.metadata.version("torch")
            return True
        except importlib.metadata.PackageNotFoundError:
            return False

    def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                     torchvisionVersionRequirement=None):
        import pip_recorder

        with Path(os.environ["PIP_RECORDER_LOG"]).open("a") as handle:
            handle.write(json.dumps({"PyTorchUtils.installTorch": {
                "askConfirmation": askConfirmation, "torchVersionRequirement": torchVersionRequirement,
                "torchvisionVersionRequirement": torchvisionVersionRequirement}}) + "\n")
        if os.environ.get("PIP_RECORDER_FAIL") == "1":  # light-the-torch failed: the real call raises
            import subprocess

            raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "light_the_torch", "install", "torch"])
        site = Path(os.environ["PIP_RECORDER_SITE"])
        pip_recorder.write_distribution(site, "torch", "2.9.1+cu128")
        pip_recorder.write_distribution(site, "torchvision", "0.24.1+cu128")
        return object()  # the extension returns the imported torch module
