"""Procedural faces: a parametric 68-point landmark model, expressions, 3-D pose and a PIL renderer.

Geometry lives in "face units": the eye centres sit at (-0.5, 0) and (+0.5, 0), so the inter-ocular
distance (IOD) is 1 and y grows downwards, as in images. The proportions follow the insightface
112x112 template (mouth corners 1.16 IOD below the eyes, 0.83 IOD apart; nose tip 0.57 below), so
dlib's 68-point predictor, trained on real faces, finds these faces too. Point order is dlib's
(iBUG 300-W): jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, outer lips 48-59, inner lips 60-67.

Expressions are exaggerated on purpose: the synthetic data must be learnable at 48x48 by a tiny
network in a few epochs, so every class differs from every other in at least two strong cues
(mouth shape, brow shape, eye opening, teeth, asymmetry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from ranray.config import CLASS_NAMES

# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """What stays the same across all pictures of one person."""

    face_width: float  # half-width of the jaw at eye level, in IOD
    chin: float  # chin depth below the eyes
    jaw_round: float  # 0: pointed chin, 1: square jaw
    forehead: float  # forehead height above the eyes
    eye_size: float  # eye width multiplier
    brow_thick: float  # brow line width, in IOD
    brow_height: float  # brow distance above the eye centres
    nose_len: float  # nose tip below the eyes
    nose_width: float  # nostril half-width
    mouth_width: float  # mouth half-width
    lip_thick: float  # lip height
    mouth_y: float  # mouth corners below the eyes
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    lips: tuple[int, int, int]
    iris: tuple[int, int, int]
    hair_style: int  # 0 bald, 1 short, 2 long, 3 fringe


@dataclass(frozen=True)
class Expression:
    """Deformations applied to the neutral geometry (all 0 / 1 for neutral)."""

    mouth_width: float = 0.0  # added to the mouth half-width
    mouth_curve: float = 0.0  # corner height relative to the lip centre; negative: corners up (smile)
    mouth_open: float = 0.0  # gap between the inner lips
    mouth_drop: float = 0.0  # whole mouth moves down (sad, surprise)
    corner_left: float = 0.0  # extra lift of the image-left corner (asymmetric: contempt)
    upper_lip_raise: float = 0.0  # upper lip raised on the image-left side (disgust)
    teeth: float = 0.0  # 0..1, how much of the opening shows teeth
    brow_raise: float = 0.0  # positive: brows move up
    brow_inner: float = 0.0  # positive: inner ends up (sad, fear); negative: inner ends down (anger)
    brow_squeeze: float = 0.0  # inner ends move towards the midline
    eye_open: float = 1.0  # eyelid opening multiplier
    nose_wrinkle: float = 0.0  # nostrils lifted (disgust)
    cheek: float = 0.0  # nasolabial fold strength (smile, disgust)
    smirk_fold: float = 0.0  # a fold on the lifted side only (contempt)


# The 8 classes in ranray.config.CLASS_NAMES order. Strengths are scaled per sample (0.75..1.2).
EXPRESSIONS: dict[str, Expression] = {
    "neutral": Expression(),
    "happiness": Expression(mouth_width=0.2, mouth_curve=-0.3, mouth_open=0.18, teeth=1.0,
                            eye_open=0.7, cheek=1.2),
    "surprise": Expression(mouth_width=-0.16, mouth_open=0.55, mouth_drop=0.12, brow_raise=0.24,
                           eye_open=1.55),
    "sadness": Expression(mouth_width=-0.03, mouth_curve=0.2, mouth_drop=0.04, brow_inner=0.2,
                          brow_raise=-0.02, eye_open=0.75),
    "anger": Expression(mouth_width=-0.12, mouth_curve=0.05, brow_raise=-0.12, brow_inner=-0.2,
                        brow_squeeze=0.09, eye_open=0.62),
    "disgust": Expression(mouth_curve=0.1, mouth_open=0.1, upper_lip_raise=0.16, teeth=0.6,
                          brow_raise=-0.08, brow_inner=-0.06, eye_open=0.7, nose_wrinkle=0.08,
                          cheek=0.7),
    "fear": Expression(mouth_width=0.16, mouth_curve=0.07, mouth_open=0.2, teeth=0.4, brow_raise=0.16,
                       brow_inner=0.12, brow_squeeze=0.07, eye_open=1.45),
    "contempt": Expression(mouth_width=0.02, corner_left=0.4, eye_open=0.6, smirk_fold=1.0),
}
assert tuple(EXPRESSIONS) == CLASS_NAMES

# Expressions whose deformation is one-sided; the side is drawn at random per face so that a
# horizontal flip (a standard augmentation) maps a face onto another valid face of its class.
ASYMMETRIC = {"contempt", "disgust"}


def scale_expression(expr: Expression, strength: float) -> Expression:
    """Interpolate between neutral (0) and the full expression (1) or beyond."""
    neutral = Expression()
    values = {}
    for name in expr.__dataclass_fields__:
        a, b = getattr(neutral, name), getattr(expr, name)
        values[name] = a + strength * (b - a)
    return Expression(**values)


@dataclass(frozen=True)
class Pose:
    yaw: float = 0.0  # degrees, positive turns the face to the image right
    pitch: float = 0.0
    roll: float = 0.0


# ---------------------------------------------------------------------------------------------
# Landmark geometry
# ---------------------------------------------------------------------------------------------


def _eye(cx: float, width: float, height: float) -> np.ndarray:
    """Six dlib eye points: left corner, two upper lid, right corner, two lower lid (clockwise).

    dlib starts the image-left eye at its outer corner and the image-right eye at its inner
    corner; both run left-to-right along the upper lid, so one order fits both eyes.
    """
    h = width / 2
    xs = np.array([-h, -h / 3, h / 3, h, h / 3, -h / 3])
    ys = np.array([0.0, -height, -height, 0.0, height * 0.9, height * 0.9])
    return np.stack([cx + xs, ys], axis=1)


def neutral_and_expression(ident: Identity, expr: Expression, flip_side: bool) -> np.ndarray:
    """The 68 landmarks (x, y) in face units for an identity showing an expression."""
    side = -1.0 if flip_side else 1.0  # which mouth corner the asymmetric cues act on
    pts = np.zeros((68, 2))

    # Jaw 0..16: from the image-left temple round the chin to the image-right temple.
    t = np.linspace(-1.0, 1.0, 17)
    ang = t * math.pi / 2
    w = ident.face_width
    xs = w * np.sin(ang) * (1.0 - 0.12 * (1 - ident.jaw_round) * np.cos(ang) ** 4)
    ys = 0.1 + (ident.chin - 0.1) * np.cos(ang) ** (0.75 + 0.5 * ident.jaw_round)
    pts[0:17] = np.stack([xs, ys], axis=1)

    # Brows 17..21 (image-left, outer to inner) and 22..26 (image-right, inner to outer).
    bx = np.linspace(-0.88, -0.16, 5)
    arch = -0.07 * np.sin(np.linspace(0.15, math.pi - 0.35, 5))
    inner_w = np.linspace(0.0, 1.0, 5) ** 1.5  # weight of the inner-end deformation
    by = -ident.brow_height - expr.brow_raise + arch - expr.brow_inner * inner_w
    bxl = bx + expr.brow_squeeze * inner_w
    pts[17:22] = np.stack([bxl, by], axis=1)
    pts[22:27] = np.stack([-bxl[::-1], by[::-1]], axis=1)

    # Nose: bridge 27..30 down the midline, nostril base 31..35.
    pts[27:31] = np.stack([np.zeros(4), np.linspace(0.02, ident.nose_len, 4)], axis=1)
    nw = ident.nose_width
    base = ident.nose_len + 0.1 - expr.nose_wrinkle
    pts[31:36] = np.stack([np.linspace(-nw, nw, 5),
                           base + np.array([-0.04, 0.0, 0.02, 0.0, -0.04])], axis=1)

    # Eyes 36..41 (image-left) and 42..47 (image-right).
    ew = 0.36 * ident.eye_size
    eh = 0.065 * ident.eye_size * expr.eye_open
    pts[36:42] = _eye(-0.5, ew, eh)
    pts[42:48] = _eye(0.5, ew, eh)

    pts[48:68] = _mouth(ident, expr, side)
    return pts


def _mouth(ident: Identity, expr: Expression, side: float) -> np.ndarray:
    """Outer lips 48..59 and inner lips 60..67."""
    mw = max(0.18, ident.mouth_width + expr.mouth_width)
    my = ident.mouth_y + expr.mouth_drop
    lip = ident.lip_thick * (0.55 if expr.mouth_width < -0.08 and expr.mouth_open < 0.05 else 1.0)
    op = expr.mouth_open
    # Corner heights: the smile curve lifts both; contempt lifts one (side picks which).
    left_lift = -expr.mouth_curve + expr.corner_left * (side > 0)
    right_lift = -expr.mouth_curve + expr.corner_left * (side < 0)
    cl = np.array([-mw - 0.25 * expr.corner_left * (side > 0), my - left_lift])
    cr = np.array([mw + 0.25 * expr.corner_left * (side < 0), my - right_lift])
    centre_y = my
    raise_l = expr.upper_lip_raise * (1.0 if side > 0 else 0.35)
    raise_r = expr.upper_lip_raise * (0.35 if side > 0 else 1.0)

    def lerp_x(f: float) -> float:
        return cl[0] + (cr[0] - cl[0]) * f

    def curve_y(f: float) -> float:
        # A parabola through both corners and the lip centre, so corners up gives a U shape.
        corner_y = cl[1] + (cr[1] - cl[1]) * f
        bow = 4 * f * (1 - f)
        return corner_y * (1 - bow) + centre_y * bow

    up_inner = [curve_y(f) - op / 2 - (raise_l * (1 - f) + raise_r * f) * 4 * f * (1 - f)
                for f in (0.25, 0.5, 0.75)]
    lo_inner = [curve_y(f) + op / 2 for f in (0.75, 0.5, 0.25)]
    outer = np.array([
        cl,
        [lerp_x(0.17), up_inner[0] - lip * 0.9],
        [lerp_x(0.35), up_inner[1] - lip * 1.1 + 0.02],
        [lerp_x(0.5), up_inner[1] - lip * 0.85],
        [lerp_x(0.65), up_inner[1] - lip * 1.1 + 0.02],
        [lerp_x(0.83), up_inner[2] - lip * 0.9],
        cr,
        [lerp_x(0.8), lo_inner[0] + lip * 1.0],
        [lerp_x(0.65), lo_inner[1] + lip * 1.2],
        [lerp_x(0.5), lo_inner[1] + lip * 1.3],
        [lerp_x(0.35), lo_inner[1] + lip * 1.2],
        [lerp_x(0.2), lo_inner[2] + lip * 1.0],
    ])
    inner = np.array([
        [cl[0] + 0.05, cl[1]],
        [lerp_x(0.25), up_inner[0]],
        [lerp_x(0.5), up_inner[1]],
        [lerp_x(0.75), up_inner[2]],
        [cr[0] - 0.05, cr[1]],
        [lerp_x(0.75), lo_inner[0]],
        [lerp_x(0.5), lo_inner[1]],
        [lerp_x(0.25), lo_inner[2]],
    ])
    return np.concatenate([outer, inner])


def depth(pts: np.ndarray, ident: Identity) -> np.ndarray:
    """A z for every landmark from an ellipsoidal head, with the nose standing out."""
    cy = ident.chin / 2 - 0.2
    rx, ry = ident.face_width * 1.05, (ident.chin + ident.forehead) / 2 + 0.1
    inside = 1 - (pts[:, 0] / rx) ** 2 - ((pts[:, 1] - cy) / ry) ** 2
    z = 0.9 * np.sqrt(np.clip(inside, 0.0, None))
    z[27:31] += np.linspace(0.1, 0.45, 4)
    z[31:36] += np.array([0.15, 0.22, 0.28, 0.22, 0.15])
    z[36:48] -= 0.08  # eyes sit in their sockets
    return z


def rotate(pts: np.ndarray, z: np.ndarray, pose: Pose, centre_y: float) -> np.ndarray:
    """Rotate the 3-D points about the head centre and project orthographically."""
    yaw, pitch, roll = (math.radians(a) for a in (pose.yaw, pose.pitch, pose.roll))
    cy_, sy_ = math.cos(yaw), math.sin(yaw)
    cp, sp = math.cos(pitch), math.sin(pitch)
    cr, sr = math.cos(roll), math.sin(roll)
    ry = np.array([[cy_, 0, sy_], [0, 1, 0], [-sy_, 0, cy_]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    p3 = np.stack([pts[:, 0], pts[:, 1] - centre_y, z], axis=1)
    out = p3 @ (rz @ rx @ ry).T
    return np.stack([out[:, 0], out[:, 1] + centre_y], axis=1)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

SKIN_TONES = np.array([[255, 224, 196], [241, 194, 160], [224, 172, 130], [198, 140, 100],
                       [161, 110, 75], [120, 80, 55], [90, 60, 42]], dtype=float)
HAIR_COLOURS = np.array([[20, 15, 10], [60, 40, 25], [110, 75, 40], [170, 130, 80], [200, 180, 140],
                         [120, 120, 120], [150, 60, 30]], dtype=float)


def _rgb(a: np.ndarray) -> tuple[int, int, int]:
    r, g, b = np.clip(a, 0, 255).astype(int)
    return int(r), int(g), int(b)


def sample_identity(rng: np.random.Generator) -> Identity:
    skin = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.92, 1.05, 3)
    hair = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] * rng.uniform(0.85, 1.15)
    lips = skin * np.array([0.78, 0.5, 0.5]) + rng.uniform(-10, 10, 3)
    iris = np.array([70, 50, 30]) * rng.uniform(0.4, 1.6) + rng.uniform(-15, 15, 3)
    return Identity(
        face_width=rng.uniform(0.95, 1.15), chin=rng.uniform(1.75, 2.05), jaw_round=rng.uniform(0, 1),
        forehead=rng.uniform(1.1, 1.4), eye_size=rng.uniform(0.9, 1.12), brow_thick=rng.uniform(0.06, 0.11),
        brow_height=rng.uniform(0.3, 0.4), nose_len=rng.uniform(0.5, 0.64), nose_width=rng.uniform(0.17, 0.24),
        mouth_width=rng.uniform(0.38, 0.46), lip_thick=rng.uniform(0.06, 0.1), mouth_y=rng.uniform(1.1, 1.22),
        skin=_rgb(skin), hair=_rgb(hair), lips=_rgb(lips), iris=_rgb(iris), hair_style=int(rng.integers(4)),
    )


@dataclass(frozen=True)
class Occluder:
    kind: str  # a key of OCCLUDERS
    seed: int


@dataclass(frozen=True)
class FaceSpec:
    """Everything needed to draw one face deterministically."""

    identity: Identity
    label: int
    strength: float
    flip_side: bool
    pose: Pose
    occluder: Occluder | None
    light_angle: float
    light_strength: float
    brightness: float
    contrast: float
    noise: float
    background_seed: int
    wild: bool = False

    @property
    def expression(self) -> Expression:
        return scale_expression(EXPRESSIONS[CLASS_NAMES[self.label]], self.strength)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


HULL_RING = 16  # points per ring of the skull cap (the head silhouette's convex hull)


@dataclass
class Rendered:
    image: Image.Image  # RGB
    landmarks: np.ndarray  # (68, 2) in output pixel coordinates


def _poly(draw: ImageDraw.ImageDraw, pts: np.ndarray, **kw) -> None:
    draw.polygon([tuple(p) for p in pts], **kw)


def _line(draw: ImageDraw.ImageDraw, pts: np.ndarray, width: int, fill) -> None:
    draw.line([tuple(p) for p in pts], fill=fill, width=max(1, width), joint="curve")


def _shade(c: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return _rgb(np.array(c, dtype=float) * f)


def face_transform(size: int, spec: FaceSpec, rng: np.random.Generator) -> tuple[float, np.ndarray]:
    """Pixels per IOD and the image position of the face-unit origin (the eye midpoint).

    Clean crops place the face as FER2013 does (the face fills the frame, eyes ~37% down);
    in-the-wild images put a smaller face anywhere in the frame.
    """
    if spec.wild:
        iod = size * rng.uniform(0.12, 0.2)
        # Keep the whole head (1.4 IOD of forehead, 2 IOD of chin, 1.2 IOD of cheek) in the frame.
        origin = np.array([rng.uniform(1.3 * iod, size - 1.3 * iod), rng.uniform(1.6 * iod, size - 2.1 * iod)])
        return iod, origin
    iod = size * rng.uniform(0.27, 0.31)
    origin = np.array([size * (0.5 + rng.uniform(-0.04, 0.04)), size * (0.37 + rng.uniform(-0.03, 0.03))])
    return iod, origin


def render(spec: FaceSpec, size: int, supersample: int = 4) -> Rendered:
    """Draw the face at `size` x `size` (RGB); the landmarks are its ground truth."""
    rng = np.random.default_rng(spec.background_seed)
    big = size * supersample
    iod, origin = face_transform(size, spec, rng)
    ident, expr = spec.identity, spec.expression

    pts = neutral_and_expression(ident, expr, spec.flip_side)
    head_cy = ident.chin / 2 - 0.2
    outline = _head_outline(ident)
    z_all = np.concatenate([depth(pts, ident), _head_depth(outline, ident)])
    rot = rotate(np.concatenate([pts, outline]), z_all, spec.pose, head_cy)
    pts_r, outline_r = rot[:68], convex_hull(np.concatenate([rot[68:], rot[:17]]))

    def to_px(p: np.ndarray) -> np.ndarray:
        return (p * iod + origin) * supersample

    img = background(big, spec, rng)
    draw = ImageDraw.Draw(img)
    _draw_head(draw, to_px(outline_r), to_px(pts_r), ident, iod * supersample, spec)
    _draw_features(img, to_px(pts_r), ident, expr, iod * supersample, spec)
    if spec.occluder is not None:
        _draw_occluder(img, to_px(pts_r), iod * supersample, spec.occluder, ident)
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    landmarks = pts_r * iod + origin
    img = _lighting(img, spec, landmarks)  # smooth, so the small image is enough
    img = _noise(img, spec.noise, rng)
    return Rendered(image=img, landmarks=landmarks)


def _head_outline(ident: Identity) -> np.ndarray:
    """Points on the upper head (an ellipsoid cap above the jaw line), all around, for the silhouette."""
    a, b = np.meshgrid(np.linspace(0, 2 * math.pi, HULL_RING, endpoint=False), np.linspace(0.0, math.pi / 2, 5))
    w, top = ident.face_width, ident.forehead + 0.1
    x = w * np.cos(a) * np.cos(b)
    y = 0.1 - top * np.sin(b)
    return np.stack([x.ravel(), y.ravel()], axis=1)


def _head_depth(outline: np.ndarray, ident: Identity) -> np.ndarray:
    a = np.linspace(0, 2 * math.pi, HULL_RING, endpoint=False)
    zs = 0.9 * np.sin(a)  # front (+z) and back (-z) of the skull at every height
    ring_radius = np.sqrt(np.clip(1 - ((outline[:, 1] - 0.1) / (ident.forehead + 0.1)) ** 2, 0, 1))
    return np.tile(zs, len(outline) // HULL_RING) * ring_radius


def convex_hull(pts: np.ndarray) -> np.ndarray:
    """Andrew's monotone chain; the head silhouette under any pose is convex enough."""
    p = sorted(map(tuple, pts))

    def half(seq):
        out: list[tuple[float, float]] = []
        for q in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (q[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (q[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(q)
        return out

    lower, upper = half(p), half(reversed(p))
    return np.array(lower[:-1] + upper[:-1])


def background(big: int, spec: FaceSpec, rng: np.random.Generator) -> Image.Image:
    """A gradient, and for in-the-wild scenes clutter (rectangles, ellipses, lines)."""
    base = rng.uniform(40, 220, 3)
    grad = rng.uniform(-60, 60, 3)
    column = np.clip(base + grad * np.linspace(0, 1, big)[:, None], 0, 255).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(np.broadcast_to(column[:, None, :], (big, big, 3))), "RGB")
    if spec.wild:
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(8, 20))):
            col = tuple(int(c) for c in rng.integers(0, 256, 3))
            x0, y0 = rng.uniform(0, big, 2)
            w, h = rng.uniform(big * 0.03, big * 0.35, 2)
            shape = rng.integers(3)
            if shape == 0:
                draw.rectangle([x0, y0, x0 + w, y0 + h], fill=col)
            elif shape == 1:
                draw.ellipse([x0, y0, x0 + w, y0 + h], fill=col)
            else:
                draw.line([x0, y0, x0 + w, y0 + h], fill=col, width=int(rng.integers(2, 12)))
    return img


def _draw_head(draw: ImageDraw.ImageDraw, outline: np.ndarray, pts: np.ndarray, ident: Identity,
               iod: float, spec: FaceSpec) -> None:
    skin, hair = ident.skin, ident.hair
    chin = pts[8]
    # Neck and shoulders first, so the jaw line stays visible against them.
    neck_w = 0.55 * iod
    draw.rectangle([chin[0] - neck_w, chin[1] - 0.6 * iod, chin[0] + neck_w, chin[1] + 2 * iod],
                   fill=_shade(skin, 0.75))
    draw.ellipse([chin[0] - 2.2 * iod, chin[1] + 0.7 * iod, chin[0] + 2.2 * iod, chin[1] + 3.5 * iod],
                 fill=_shade(hair, 0.6) if ident.hair_style % 2 else (60, 70, 110))
    if ident.hair_style == 2:  # long hair falls behind the face, down to the jaw
        x0, x1 = outline[:, 0].min(), outline[:, 0].max()
        pad = 0.25 * iod
        draw.ellipse([x0 - pad, outline[:, 1].min() - pad, x1 + pad, chin[1] + 0.4 * iod], fill=hair)
    _poly(draw, outline, fill=skin)
    if ident.hair_style in (1, 2, 3):
        # Hair covers the top of the skull down to a line above the brows.
        line_y = outline[:, 1].min() + (0.45 + 0.25 * (ident.hair_style == 3)) * iod
        cap = outline[outline[:, 1] < line_y]
        if len(cap) >= 3:
            _poly(draw, convex_hull(cap), fill=hair)
    # The jaw line shadow gives the HOG detector the face border it looks for.
    _line(draw, pts[0:17], int(0.03 * iod), _shade(skin, 0.7))


def _draw_features(img: Image.Image, pts: np.ndarray, ident: Identity, expr: Expression, iod: float,
                   spec: FaceSpec) -> None:
    draw = ImageDraw.Draw(img)
    skin = ident.skin
    brow_col = _shade(ident.hair, 0.8) if sum(ident.hair) < 450 else _shade(skin, 0.45)
    # Nasolabial folds: smiles and disgust deepen the lines from the nose wings to the mouth.
    lifted = (31, 48) if not spec.flip_side else (35, 54)  # the side contempt's corner goes up
    for wing, corner in ((31, 48), (35, 54)):
        strength = expr.cheek + (expr.smirk_fold if (wing, corner) == lifted else 0.0)
        if strength > 0.05:
            a, b = pts[wing], pts[corner]
            mid = (a + b) / 2 + np.array([(a[0] - pts[33][0]) * 0.4, 0])
            _line(draw, np.array([a + (a - pts[33]) * 0.3, mid, b + (b - pts[51]) * 0.15]),
                  int(0.035 * iod * strength), _shade(skin, 0.72))
    for a, b in ((17, 22), (22, 27)):
        _line(draw, pts[a:b], int(ident.brow_thick * iod), brow_col)
    # Nose: a shaded bridge side and dark nostrils.
    _line(draw, pts[27:31] + np.array([0.06 * iod, 0]), int(0.03 * iod), _shade(skin, 0.82))
    _line(draw, pts[31:36], int(0.035 * iod), _shade(skin, 0.6))
    r = 0.045 * iod
    for i in (32, 34):
        c = pts[i] + np.array([0, -0.02 * iod])
        draw.ellipse([c[0] - r * 1.3, c[1] - r, c[0] + r * 1.3, c[1] + r], fill=_shade(skin, 0.35))
    for lo, hi in ((36, 42), (42, 48)):
        _draw_eye(img, pts[lo:hi], ident, iod)
    _draw_mouth(img, pts, ident, expr, iod)


def _draw_eye(img: Image.Image, eye: np.ndarray, ident: Identity, iod: float) -> None:
    draw = ImageDraw.Draw(img)
    opening = (eye[4:6, 1].mean() - eye[1:3, 1].mean())
    # Eye socket shadow, then the white, the iris clipped to the lids, and a dark upper lid.
    centre = eye.mean(axis=0)
    sw, sh = 0.28 * iod, 0.14 * iod
    draw.ellipse([centre[0] - sw, centre[1] - sh * 1.3, centre[0] + sw, centre[1] + sh],
                 fill=_shade(ident.skin, 0.85))
    if opening < 0.015 * iod:
        _line(draw, eye[[0, 1, 2, 3]], int(0.035 * iod), (30, 20, 20))
        return
    mask = Image.new("L", img.size, 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in eye], fill=255)
    layer = Image.new("RGB", img.size, (235, 235, 230))
    ld = ImageDraw.Draw(layer)
    r = 0.085 * iod
    ld.ellipse([centre[0] - r, centre[1] - r, centre[0] + r, centre[1] + r], fill=ident.iris)
    rp = r * 0.45
    ld.ellipse([centre[0] - rp, centre[1] - rp, centre[0] + rp, centre[1] + rp], fill=(10, 10, 10))
    img.paste(layer, (0, 0), mask)
    _line(draw, eye[[0, 1, 2, 3]], int(0.04 * iod), (25, 18, 18))
    _line(draw, eye[[3, 4, 5, 0]], int(0.015 * iod), _shade(ident.skin, 0.55))


def _draw_mouth(img: Image.Image, pts: np.ndarray, ident: Identity, expr: Expression, iod: float) -> None:
    draw = ImageDraw.Draw(img)
    outer, inner = pts[48:60], pts[60:68]
    _poly(draw, outer, fill=ident.lips)
    gap = inner[5:8, 1].mean() - inner[1:4, 1].mean()
    if gap > 0.03 * iod:
        _poly(draw, inner, fill=(45, 15, 20))
        if expr.teeth > 0.05:
            # Upper teeth: the top part of the opening, clipped to it.
            mask = Image.new("L", img.size, 0)
            ImageDraw.Draw(mask).polygon([tuple(p) for p in inner], fill=255)
            band = Image.new("L", img.size, 0)
            top = inner[1:4, 1].min()
            ImageDraw.Draw(band).rectangle([0, 0, img.size[0], top + gap * (0.35 + 0.4 * expr.teeth)],
                                           fill=255)
            img.paste(Image.new("RGB", img.size, (240, 238, 225)), (0, 0), ImageChops.multiply(mask, band))
    else:
        _line(draw, np.concatenate([inner[[0]], inner[1:4], inner[[4]]]), int(0.03 * iod), (60, 20, 25))


def _draw_occluder(img: Image.Image, pts: np.ndarray, iod: float, occ: Occluder, ident: Identity) -> None:
    rng = np.random.default_rng(occ.seed)
    OCCLUDERS[occ.kind](ImageDraw.Draw(img), pts, iod, rng, ident)


def _sunglasses(draw, pts, iod, rng, ident) -> None:
    col = tuple(int(c) for c in rng.integers(0, 60, 3))
    for lo, hi in ((36, 42), (42, 48)):
        c = pts[lo:hi].mean(axis=0)
        w, h = 0.3 * iod, 0.22 * iod
        draw.ellipse([c[0] - w, c[1] - h, c[0] + w, c[1] + h], fill=col)
    _line(draw, np.array([pts[39], pts[42]]), int(0.05 * iod), col)
    _line(draw, np.array([pts[36], pts[0]]), int(0.05 * iod), col)
    _line(draw, np.array([pts[45], pts[16]]), int(0.05 * iod), col)


def _mask(draw, pts, iod, rng, ident) -> None:
    col = tuple(int(c) for c in rng.choice([[225, 235, 245], [120, 170, 220], [40, 40, 50], [230, 230, 230]]))
    top = pts[29]
    poly = np.concatenate([pts[2:15], [pts[14] * 0.5 + top * 0.5 + [0, -0.05 * iod]],
                           [top + [0, -0.05 * iod]], [pts[2] * 0.5 + top * 0.5 + [0, -0.05 * iod]]])
    _poly(draw, poly, fill=col)
    for y in (0.35, 0.6):
        a = pts[3] * (1 - y) + pts[29] * y
        b = pts[13] * (1 - y) + pts[29] * y
        _line(draw, np.array([a, b]), int(0.02 * iod), _shade(col, 0.85))


def _hand(draw, pts, iod, rng, ident) -> None:
    skin = _shade(ident.skin, rng.uniform(0.85, 1.05))
    target = pts[[51, 57, 48, 54]].mean(axis=0) if rng.random() < 0.6 else pts[36:42].mean(axis=0)
    ang = rng.uniform(-0.6, 0.6)
    d = np.array([math.sin(ang), -math.cos(ang)])  # finger direction (upwards)
    n = np.array([d[1], -d[0]])
    palm = target - d * 0.5 * iod
    draw.ellipse([palm[0] - 0.55 * iod, palm[1] - 0.5 * iod, palm[0] + 0.55 * iod, palm[1] + 0.5 * iod],
                 fill=skin)
    for k in range(4):
        base = palm + n * (k - 1.5) * 0.24 * iod
        tip = base + d * (0.75 + 0.15 * (k in (1, 2))) * iod
        _line(draw, np.array([base, tip]), int(0.2 * iod), skin)
        _line(draw, np.array([base + n * 0.11 * iod, tip + n * 0.11 * iod]), int(0.02 * iod), _shade(skin, 0.75))
    draw.rectangle([palm[0] - 0.45 * iod, palm[1], palm[0] + 0.45 * iod, palm[1] + 2.5 * iod], fill=skin)


def _block(draw, pts, iod, rng, ident) -> None:
    for _ in range(int(rng.integers(1, 3))):
        c = pts[rng.integers(17, 68)]
        w, h = rng.uniform(0.35, 0.8, 2) * iod
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.rectangle([c[0] - w / 2, c[1] - h / 2, c[0] + w / 2, c[1] + h / 2], fill=col)


def _half(side: int):
    """A flat card over one half of the face (side -1: image-left), from above the brows to below
    the chin, edge on the nose line: what a turned-away or half-hidden face loses."""
    def draw_half(draw, pts, iod, rng, ident) -> None:
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        edge = pts[27:31, 0].mean() + side * rng.uniform(-0.05, 0.1) * iod
        far = edge + side * 3.0 * iod
        top, bottom = pts[17:27, 1].min() - 0.8 * iod, pts[8, 1] + 0.5 * iod
        draw.rectangle([min(edge, far), top, max(edge, far), bottom], fill=col)
    return draw_half


OCCLUDERS = {"sunglasses": _sunglasses, "mask": _mask, "hand": _hand, "block": _block,
             "half_left": _half(-1), "half_right": _half(1)}
# What `ranray synth` draws from (the kinds it always had, so its datasets keep their bytes).
DEFAULT_OCCLUDERS = ("block", "hand", "mask", "sunglasses")


def _lighting(img: Image.Image, spec: FaceSpec, pts: np.ndarray) -> Image.Image:
    """Directional light (a linear ramp across the image), then brightness and contrast."""
    arr = np.asarray(img, dtype=np.float32)
    h, w = arr.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c = pts.mean(axis=0)
    dx, dy = math.cos(spec.light_angle), math.sin(spec.light_angle)
    ramp = ((xx - c[0]) * dx + (yy - c[1]) * dy) / (0.5 * w)
    arr = arr * (1.0 + spec.light_strength * np.clip(ramp, -1, 1))[..., None]
    arr = (arr - 128.0) * spec.contrast + 128.0 + spec.brightness
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _noise(img: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    if sigma <= 0:
        return img
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, sigma, (img.size[1], img.size[0], 1))
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return out.filter(ImageFilter.GaussianBlur(0.3)) if sigma > 6 else out


