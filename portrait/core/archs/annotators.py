"""controlnet-aux annotators (kinds "openpose", "midas") from a local lllyasviel/Annotators folder."""

from __future__ import annotations

import contextlib
import warnings

from ..modelfiles import Kind


@contextlib.contextmanager
def quiet_import():
    """controlnet-aux imports every annotator (timm, mediapipe, SAM) and warns about each;
    none of that concerns a user asking for a pose map."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _build_openpose(source):
    """controlnet-aux OpenposeDetector from a local lllyasviel/Annotators folder."""
    with quiet_import():
        from controlnet_aux import OpenposeDetector

    # controlnet-aux's detectors take a device only (`.to(device)`); they stay fp32 on CUDA
    return source.place(OpenposeDetector.from_pretrained(str(source.folder)), cast=False)


def _build_midas(source):
    """controlnet-aux MidasDetector (DPT hybrid) from a local lllyasviel/Annotators folder."""
    with quiet_import():
        from controlnet_aux import MidasDetector

    return source.place(MidasDetector.from_pretrained(str(source.folder)), cast=False)


OPENPOSE = Kind("openpose", _build_openpose)
MIDAS = Kind("midas", _build_midas)
