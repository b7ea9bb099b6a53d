"""torch-fidelity's InceptionV3 feature extractor, loaded from a local file only.

torch-fidelity downloads its weights when no path is given and reads a given path with
``torch.load(weights_only=False)``, which would run pickled code from the file. Here the file is first
read with the safe reader (:func:`rear_ds.models.weights.read_state_dict`: safetensors, or
``torch.load(weights_only=True)``), and torch-fidelity's own load runs with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``
so it cannot unpickle code either. A ``.safetensors`` copy is accepted too. Nothing is ever downloaded.

Features used (torch-fidelity's defaults for each metric): "2048" (pool_3, FID and precision/recall) and
"logits_unbiased" (Inception Score).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Optional

import numpy as np
import torch

from rear_ds.backends import exact_fp32
from rear_ds.models.weights import weights_sha256

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         + INCEPTION_WEIGHTS_FILE)
ENV_VAR = "REAR_INCEPTION_WEIGHTS"
FEATURE_POOL = "2048"
FEATURE_LOGITS = "logits_unbiased"


class InceptionWeightsError(RuntimeError):
    """The Inception weights file is not configured, missing, or not a plain state dict."""


def _where_to_get() -> str:
    return (f"download {INCEPTION_WEIGHTS_FILE} (torch-fidelity's InceptionV3, converted from the TF 2015-12-05 "
            f"graph) from {INCEPTION_WEIGHTS_URL} on a machine with internet access, copy it to the cluster, "
            f"and pass --inception-weights /path/to/{INCEPTION_WEIGHTS_FILE} or set "
            f"{ENV_VAR}=/path/to/{INCEPTION_WEIGHTS_FILE}")


def resolve_inception_weights(path: Optional[str] = None) -> str:
    """The weights path from the argument or ${REAR_INCEPTION_WEIGHTS}; a clear error when missing."""
    path = path or os.environ.get(ENV_VAR, "")
    if not path:
        raise InceptionWeightsError(f"no Inception weights given: {_where_to_get()}")
    if not os.path.isfile(path):
        raise InceptionWeightsError(f"Inception weights file {path!r} does not exist: {_where_to_get()}")
    return path


@contextlib.contextmanager
def _weights_only_torch_load():
    """Force every torch.load inside to weights_only=True (torch's own switch), restoring the env after."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def build_inception(weights_path: Optional[str] = None, device="cpu"):
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (features "2048" and "logits_unbiased") in eval mode."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from rear_ds.models.weights import WeightsError, read_state_dict

    path = resolve_inception_weights(weights_path)
    try:
        state = read_state_dict(path)  # safe reader: refuses pickled code with a clear message
    except WeightsError as e:
        raise InceptionWeightsError(f"Inception weights {path!r} cannot be used: {e}. Expected "
                                    f"{INCEPTION_WEIGHTS_FILE}; {_where_to_get()}") from None
    with contextlib.ExitStack() as stack:
        load_path = path
        if not path.lower().endswith((".pth", ".pt", ".bin")):
            # torch-fidelity only reads torch files: hand it a torch copy of the safely read tensors.
            tmp = stack.enter_context(tempfile.TemporaryDirectory())
            load_path = os.path.join(tmp, INCEPTION_WEIGHTS_FILE)
            torch.save(state, load_path)
        del state
        stack.enter_context(_weights_only_torch_load())
        try:
            model = FeatureExtractorInceptionV3("inception-v3-compat", [FEATURE_POOL, FEATURE_LOGITS],
                                                feature_extractor_weights_path=load_path)
        except RuntimeError as e:  # load_state_dict key/shape mismatch
            raise InceptionWeightsError(f"Inception weights {path!r} do not match torch-fidelity's "
                                        f"InceptionV3 (expected {INCEPTION_WEIGHTS_FILE}): "
                                        f"{str(e).splitlines()[0]}") from None
    return model.to(device).eval()


class InceptionFeatures:
    """Batched feature extraction from uint8 NHWC images (numpy), returning float64 numpy arrays."""

    def __init__(self, weights_path: Optional[str] = None, device=None, batch_size: int = 50):
        self.weights_path = resolve_inception_weights(weights_path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        self.model = build_inception(self.weights_path, self.device)
        self._sha256 = None

    @property
    def weights_sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = weights_sha256(self.weights_path)
        return self._sha256

    def identity(self) -> dict:
        """What determines the features (not the path or device): features stored with another identity are
        never used (:mod:`rear_ds.evaluation.chunk_features`)."""
        import torch_fidelity

        return {"torch_fidelity_version": torch_fidelity.__version__,
                "feature_extractor": "inception-v3-compat (FeatureExtractorInceptionV3)",
                "fid_feature_layer": FEATURE_POOL, "is_feature_layer": FEATURE_LOGITS,
                "inception_weights_sha256": self.weights_sha256}

    def describe(self) -> dict:
        return {"name": "torch-fidelity", **self.identity(), "prc_feature_layer": FEATURE_POOL,
                "inception_weights": os.path.abspath(self.weights_path), "device": str(self.device)}

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> tuple:
        """uint8 (n, H, W, 3) -> (pool (n, 2048), logits_unbiased (n, 1008)), float64."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (n, H, W, 3), got {images.dtype} {images.shape}")
        pools, logits = [], []
        for s in range(0, images.shape[0], self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[s:s + self.batch_size])).permute(0, 3, 1, 2)
            with exact_fp32():  # no TF32: the same features inside a training process as alone, on any GPU
                pool, logit = self.model(x.to(self.device))
            pools.append(pool.double().cpu().numpy())
            logits.append(logit.double().cpu().numpy())
        if not pools:
            return np.zeros((0, 2048)), np.zeros((0, 1008))
        return np.concatenate(pools), np.concatenate(logits)
