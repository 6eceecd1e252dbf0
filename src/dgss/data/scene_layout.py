"""Procedural street-scene layout: where the 19 classes are, their base colours and their depth.

A pinhole camera looks down a straight street: the ground plane meets the horizon row at a vanishing
point, the road and sidewalks widen linearly below it, building facades stand on the sidewalk's
outer edge, and every object standing at ground row ``yb`` is scaled by its distance, so sizes,
positions and occlusions follow one perspective. Objects are painted far to near (painter's
algorithm) into three aligned H x W maps: ``label`` (uint8 train ids), ``colour_index`` (rows of a
small palette of surface colours, 0..255 before lighting) and ``depth`` (float32, 1 = bottom row of
the ground, larger is farther). Light sources are collected for the night rendering.

All work is a few dozen whole-image numpy operations on 2-D maps plus small slice assignments per
object (3-channel fancy indexing is several times slower, so colours stay indices until the end):
a 128 x 256 layout takes about a millisecond.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["LayoutStats", "STREET", "WIDE_ANGLE", "Scene", "build_scene", "OBJECT_STYLES"]

(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON, RIDER,
 CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(19)

# Base colours (RGB) of the background classes; objects pick their own.
_BASE_COLOURS = np.array([
    (92, 90, 96), (152, 144, 138), (150, 128, 110), (170, 160, 146), (126, 114, 96), (112, 112, 118),
    (38, 40, 36), (200, 40, 40), (72, 112, 46), (128, 150, 74), (150, 186, 226), (0, 0, 0),
    (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0)], np.float32)
_VEHICLE_COLOURS = np.array([(235, 235, 232), (30, 32, 36), (128, 130, 134), (176, 30, 30),
                             (36, 60, 140), (190, 192, 196), (90, 30, 20), (210, 170, 40)], np.float32)
# "visible" objects (the DG testbed's world): each heavy vehicle type has its own liveries and parts.
_BUS_COLOURS = np.array([(214, 172, 30), (200, 60, 36), (40, 140, 90)], np.float32)  # yellow, red, green
_CARGO_COLOURS = np.array([(226, 226, 220), (186, 178, 160)], np.float32)  # white, beige box
_TRAIN_COLOURS = np.array([(188, 192, 200), (60, 90, 170)], np.float32)  # silver, blue
_SIGN_COLOURS = np.array([(200, 36, 36), (30, 80, 170), (230, 200, 30), (240, 240, 240)], np.float32)


@dataclass(frozen=True)
class LayoutStats:
    """Ranges the layout is drawn from (fractions of the image height H / width W)."""

    horizon: tuple[float, float] = (0.36, 0.46)  # horizon row / H
    road_half_width: tuple[float, float] = (0.30, 0.48)  # at the bottom row, / W
    sidewalk_width: tuple[float, float] = (0.12, 0.24)  # at the bottom row, / W
    # facade height relative to the camera height (at 1 its top is on the horizon row)
    building_height: tuple[float, float] = (0.45, 1.3)
    block_width: tuple[float, float] = (0.06, 0.16)  # / W
    object_scale: float = 1.0
    cars: tuple[int, int] = (1, 5)
    people: tuple[int, int] = (1, 5)


STREET = LayoutStats()
# How objects look. "plain": cars, trucks, buses and trains share one box shape and one colour set (truck
# and bus differ by a few percent in aspect ratio: no model can tell them apart), and traffic-sign panels
# are thinner than an 8-px token; the demo world and the SSL pool render these. "visible" (the DG testbed,
# where every class must be visible; docs/testbed.md): a bus has a livery and a row of side windows,
# a truck a low cab in front of a tall light cargo box, a train a long silver or blue body with a window
# row and a stripe, and sign panels are SIGN_SCALE_VISIBLE times larger.
OBJECT_STYLES = ("plain", "visible")
SIGN_SCALE_VISIBLE = 1.8
# A lower, wider camera in a denser, narrower street: other geometry statistics.
WIDE_ANGLE = LayoutStats(horizon=(0.54, 0.64), road_half_width=(0.14, 0.24), sidewalk_width=(0.20, 0.32),
                         building_height=(0.9, 2.2), block_width=(0.03, 0.08), object_scale=1.4,
                         cars=(3, 8), people=(3, 8))


@dataclass
class Scene:
    label: np.ndarray  # H x W uint8 train ids
    colour_index: np.ndarray  # H x W uint16 rows of ``palette``
    palette: np.ndarray  # N x 3 float32 RGB 0..255 (before lighting)
    depth: np.ndarray  # H x W float32
    horizon: int
    lights: list = field(default_factory=list)  # (y, x, radius px, (r, g, b) strength)

    def albedo(self) -> np.ndarray:
        """3 x H x W float32 surface colours (channel-first: cheap to shade with H x W maps)."""
        return np.stack([np.take(self.palette[:, c], self.colour_index) for c in range(3)])


class _Painter:
    """Paints boxes and ellipses into the aligned maps, clipped to the image.

    Colours are rows of a palette that grows as objects are painted; the per-pixel colour is an
    index into it, so painting touches only 2-D maps and the colour image is one lookup at the end.
    """

    def __init__(self, label: np.ndarray, depth: np.ndarray, rng: np.random.Generator) -> None:
        self.label, self.depth = label, depth
        self.h, self.w = label.shape
        self.colour_index = np.zeros(label.shape, np.uint16)
        self._bases: list = []
        self._amounts: list = []
        self._rng = rng

    def colour(self, base, jitter: float = 0.0) -> int:
        """Index of a new palette colour: ``base`` RGB plus uniform noise of +-``jitter`` per channel."""
        self._bases.append(base)
        self._amounts.append(jitter)
        return len(self._bases) - 1

    def palette(self) -> np.ndarray:
        bases = np.asarray(self._bases, np.float32).reshape(-1, 3)
        noise = self._rng.uniform(-1.0, 1.0, bases.shape).astype(np.float32)
        return np.clip(bases + noise * np.asarray(self._amounts, np.float32)[:, None], 0, 255)

    def box(self, y0, y1, x0, x1, cls, colour: int, depth) -> bool:
        y0, y1 = max(int(y0 + 0.5), 0), min(int(y1 + 0.5), self.h)
        x0, x1 = max(int(x0 + 0.5), 0), min(int(x1 + 0.5), self.w)
        if y1 <= y0 or x1 <= x0:
            return False
        self.label[y0:y1, x0:x1] = cls
        self.colour_index[y0:y1, x0:x1] = colour
        self.depth[y0:y1, x0:x1] = depth
        return True

    def ellipse(self, cy, cx, ry, rx, cls, colour: int, depth, ring: float = 0.0) -> None:
        ry, rx = max(ry, 0.6), max(rx, 0.6)
        y0, y1 = max(int(cy - ry), 0), min(int(cy + ry) + 1, self.h)
        x0, x1 = max(int(cx - rx), 0), min(int(cx + rx) + 1, self.w)
        if y1 <= y0 or x1 <= x0:
            return
        yy = (np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy) / ry
        xx = (np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx) / rx
        r2 = yy * yy + xx * xx
        mask = r2 <= 1.0
        if ring > 0:  # a wheel: keep only the rim
            mask &= r2 >= (1.0 - ring) ** 2
        self.label[y0:y1, x0:x1][mask] = cls
        self.colour_index[y0:y1, x0:x1][mask] = colour
        self.depth[y0:y1, x0:x1][mask] = depth


def _background(rng: np.random.Generator, h: int, w: int, st: LayoutStats) -> tuple[_Painter, dict]:
    """Sky, ground (road, sidewalk, terrain) and the skyline of buildings, parks, walls and fences."""
    horizon = int(h * rng.uniform(*st.horizon))
    span = h - horizon
    vx = w * rng.uniform(0.42, 0.58)
    road = w * rng.uniform(*st.road_half_width)
    outer = road + w * rng.uniform(*st.sidewalk_width)
    rows = np.arange(h, dtype=np.float32)[:, None]
    dx = np.abs(np.arange(w, dtype=np.float32)[None, :] + 0.5 - vx)  # 1 x W
    t = np.clip((rows - horizon) / span, 0.0, None)  # H x 1: 0 at the horizon, 1 at the bottom

    label = np.full((h, w), SKY, np.uint8)
    ground = dx < outer * t
    label[ground] = SIDEWALK
    label[dx < road * t] = ROAD
    if rng.random() < 0.75:  # a grass verge on one side, between sidewalk and facades
        side = np.sign(np.arange(w) + 0.5 - vx)[None, :] == rng.choice([-1, 1])
        label[ground & side & (dx > (road + (outer - road) * rng.uniform(0.3, 0.6)) * t)] = TERRAIN
    distance = 1.0 / np.maximum(t, 1.0 / span)  # H x 1, 1 at the bottom row
    depth = np.full((h, w), 1e3, np.float32)
    np.copyto(depth, np.broadcast_to(distance, (h, w)), where=ground)
    paint = _Painter(label, depth, rng)
    for cls in range(19):  # palette rows 0..18: the class colours of the background
        paint.colour(_BASE_COLOURS[cls], 10.0)
    paint.colour_index[:] = label
    # A dashed centre line: painted road that is still labelled road, as in Cityscapes.
    marking = (dx < np.minimum(road * t * 0.03 + 0.25, road * t)) & ((distance * 4.0) % 1.0 < 0.45)
    paint.colour_index[marking] = paint.colour((228, 226, 215), 8.0)

    # Facades stand on the ground's outer edge: column x meets it at row y_edge(x).
    y_edge = horizon + dx[0] / outer * span  # W
    block_label = np.full(w, SKY, np.uint8)
    block_colour = np.zeros(w, np.uint16)
    heights = np.zeros(w, np.float32)
    x = 0
    while x < w:
        width = max(2, int(w * rng.uniform(*st.block_width)))
        kind = (BUILDING, VEGETATION, SKY)[int(np.searchsorted([0.8, 0.93], rng.random()))]
        block_label[x: x + width] = kind
        block_colour[x: x + width] = paint.colour(_BASE_COLOURS[kind], 28.0)
        heights[x: x + width] = rng.uniform(*st.building_height) * (0.5 if kind == VEGETATION else 1.0)
        x += width
    top = y_edge - (np.minimum(y_edge, 4 * h) - horizon) * heights
    standing = (rows >= top[None, :]) & ~ground & (block_label != SKY)[None, :]
    np.copyto(label, np.broadcast_to(block_label, (h, w)), where=standing)
    np.copyto(paint.colour_index, np.broadcast_to(block_colour, (h, w)), where=standing)
    facade_depth = span / np.maximum(y_edge - horizon, 1.0)
    np.copyto(depth, np.broadcast_to(facade_depth, (h, w)), where=standing)

    # Low walls and fences in front of some facades.
    for cls in (WALL, FENCE):
        if rng.random() < 0.7:
            x0 = int(rng.integers(0, w - 4))
            x1 = min(w, x0 + int(w * rng.uniform(0.08, 0.3)))
            band_top = y_edge[x0:x1] - (np.minimum(y_edge[x0:x1], 4 * h) - horizon) * rng.uniform(0.08, 0.16)
            mask = (rows >= band_top[None, :]) & (rows < y_edge[None, x0:x1]) & ~ground[:, x0:x1]
            label[:, x0:x1][mask] = cls
            paint.colour_index[:, x0:x1][mask] = paint.colour(_BASE_COLOURS[cls], 15.0)
    geometry = dict(horizon=horizon, span=span, vx=vx, road=road, outer=outer)
    return paint, geometry


def build_scene(rng: np.random.Generator, size: tuple[int, int], st: LayoutStats = STREET,
                objects: str = "plain") -> Scene:
    """A random street scene of ``size`` = (H, W) drawn with the ranges of ``st``; ``objects``: one of
    ``OBJECT_STYLES`` ("plain" draws exactly what it always drew)."""
    if objects not in OBJECT_STYLES:
        raise ValueError(f"unknown objects style {objects!r} (valid: {', '.join(OBJECT_STYLES)})")
    sign_scale = SIGN_SCALE_VISIBLE if objects == "visible" else 1.0
    h, w = size
    paint, g = _background(rng, h, w, st)
    horizon, span, vx, road, outer = g["horizon"], g["span"], g["vx"], g["road"], g["outer"]
    walk = (outer - road) / road  # sidewalk width in road-half-width units
    side = lambda: 1.0 if rng.random() < 0.5 else -1.0  # noqa: E731

    placed = []  # (t: ground row as a fraction of the span below the horizon, lateral u, kind)
    n_cars = int(rng.integers(st.cars[0], st.cars[1] + 1))
    placed += [(rng.uniform(0.12, 1.05), rng.uniform(-0.75, 0.75), CAR) for _ in range(n_cars)]
    n_people = int(rng.integers(st.people[0], st.people[1] + 1))
    placed += [(rng.uniform(0.1, 1.0), side() * (1.05 + walk * rng.uniform(0.1, 0.8)), PERSON)
                for _ in range(n_people)]
    for kind, probability, lateral in ((TRUCK, 0.5, 0.6), (BUS, 0.5, 0.6), (TRAIN, 0.4, 0.15),
                                       (MOTORCYCLE, 0.6, 0.85), (BICYCLE, 0.6, 0.9)):
        if rng.random() < probability:
            placed.append((rng.uniform(0.1, 0.6), rng.uniform(-lateral, lateral), kind))
    for _ in range(int(rng.integers(2, 6))):  # poles carrying lamps, signs or lights
        placed.append((rng.uniform(0.1, 0.95), side() * (1.0 + walk * rng.uniform(0.05, 0.3)), POLE))
    for _ in range(int(rng.integers(0, 4))):
        placed.append((rng.uniform(0.15, 0.9), side() * (1.0 + walk * rng.uniform(0.5, 0.95)), VEGETATION))

    lights: list = []
    for t, u, kind in sorted(placed, key=lambda o: o[0]):  # far to near
        yb = horizon + t * span
        ppu = road * t * st.object_scale  # pixels per road-half-width unit at that distance
        if objects == "visible" and kind in (TRUCK, BUS, TRAIN):
            _paint_heavy_vehicle(paint, rng, lights, kind, yb, vx + u * road * t, ppu, 1.0 / t)
        else:
            _paint_object(paint, rng, lights, kind, yb, vx + u * road * t, ppu, 1.0 / t, sign_scale)
    return Scene(label=paint.label, colour_index=paint.colour_index, palette=paint.palette(),
                 depth=paint.depth, horizon=horizon, lights=lights)


def _paint_object(p: _Painter, rng: np.random.Generator, lights: list, kind: int, yb: float, x: float,
                  ppu: float, d: float, sign_scale: float = 1.0) -> None:
    """Paint one object standing at ground row ``yb``, centred at column ``x``, ``ppu`` pixels per unit."""
    if kind in (CAR, TRUCK, BUS, TRAIN):
        width, height = {CAR: (0.55, 0.42), TRUCK: (0.72, 0.95), BUS: (0.78, 0.92), TRAIN: (0.9, 1.1)}[kind]
        width, height = max(width * ppu, 2.0), max(height * ppu, 2.0)
        base = _VEHICLE_COLOURS[int(rng.integers(len(_VEHICLE_COLOURS)))]
        if not p.box(yb - height, yb, x - width / 2, x + width / 2, kind, p.colour(base, 12.0), d):
            return
        band = (0.15, 0.5) if kind == CAR else (0.1, 0.45)  # windscreen / window band
        p.box(yb - height * (1 - band[0]), yb - height * (1 - band[1]), x - width * 0.42, x + width * 0.42, kind,
              p.colour(base * 0.25 + 20.0, 5.0), d)
        wheel, tyre = max(height * 0.12, 1.0), p.colour((22, 22, 24), 4.0)
        for side in (-1, 1):
            p.box(yb - wheel, yb, x + side * width * 0.42 - wheel, x + side * width * 0.42 + wheel, kind, tyre, d)
            lights.append((yb - height * 0.3, x + side * width * 0.36, max(width * 0.05, 0.8), (2.2, 0.2, 0.1)))
    elif kind == PERSON:
        width, height = max(0.16 * ppu, 1.0), max(0.5 * ppu, 3.0)
        p.box(yb - height * 0.45, yb, x - width * 0.4, x + width * 0.4, PERSON, p.colour((40, 40, 55), 15.0), d)
        p.box(yb - height * 0.85, yb - height * 0.45, x - width / 2, x + width / 2, PERSON,
              p.colour((130, 130, 130), 90.0), d)
        p.ellipse(yb - height * 0.92, x, height * 0.08, width * 0.38, PERSON, p.colour((205, 160, 130), 25.0), d)
    elif kind in (MOTORCYCLE, BICYCLE):
        length, radius = max(0.5 * ppu, 3.0), max(0.1 * ppu, 1.0)
        tyre = p.colour((25, 25, 25), 4.0)
        for side in (-1, 1):
            p.ellipse(yb - radius, x + side * (length / 2 - radius), radius, radius, kind, tyre, d,
                      ring=0.0 if kind == MOTORCYCLE else 0.35)
        frame = p.colour((30, 30, 34) if kind == MOTORCYCLE else (70, 60, 90), 20.0)
        p.box(yb - radius * (2.6 if kind == MOTORCYCLE else 2.0), yb - radius * (1.0 if kind == MOTORCYCLE else 1.6),
              x - length * 0.35, x + length * 0.35, kind, frame, d)
        if rng.random() < 0.8:  # ridden
            rider_h = 0.42 * ppu
            top = yb - radius * 2.2 - rider_h
            p.box(top + rider_h * 0.2, yb - radius * 1.8, x - length * 0.12, x + length * 0.12, RIDER,
                  p.colour((130, 130, 130), 90.0), d)
            p.ellipse(top + rider_h * 0.1, x, rider_h * 0.11, max(length * 0.1, 0.8), RIDER,
                      p.colour((90, 90, 95), 20.0), d)
        lights.append((yb - radius * 2.2, x + length * 0.45, max(radius * 0.4, 0.8), (2.0, 1.9, 1.6)))
    elif kind == POLE:
        height, width = (1.6 + 0.8 * rng.random()) * ppu, max(0.035 * ppu, 1.0)
        top = yb - height
        p.box(top, yb, x - width / 2, x + width / 2, POLE, p.colour(_BASE_COLOURS[POLE], 15.0), d)
        carried = rng.random()
        if carried < 0.45:
            size = max(0.18 * ppu * sign_scale, 2.0 * sign_scale)
            colour = p.colour(_SIGN_COLOURS[int(rng.integers(len(_SIGN_COLOURS)))], 10.0)
            if rng.random() < 0.5:
                p.ellipse(top + size / 2, x, size / 2, size / 2, SIGN, colour, d)
            else:
                p.box(top, top + size, x - size / 2, x + size / 2, SIGN, colour, d)
        elif carried < 0.8:
            bw, bh = max(0.09 * ppu, 1.5), max(0.26 * ppu, 3.0)
            p.box(top, top + bh, x - bw / 2, x + bw / 2, LIGHT, LIGHT, d)  # palette row LIGHT: its class colour
            lamp = int(rng.integers(3))
            tint = ((2.5, 0.3, 0.2), (2.5, 1.8, 0.3), (0.3, 2.5, 0.9))[lamp]
            lights.append((top + bh * (lamp + 0.5) / 3, x, max(bw * 0.5, 0.8), tint))
        else:  # a street lamp: the head stays pole, its light matters at night
            lights.append((top, x, max(0.1 * ppu, 1.0), (2.4, 2.0, 1.3)))
    elif kind == VEGETATION:
        trunk_h, crown = 0.9 * ppu, max(0.45 * ppu * (0.7 + 0.6 * rng.random()), 1.5)
        half = max(0.04 * ppu, 0.6)
        p.box(yb - trunk_h, yb, x - half, x + half, VEGETATION, p.colour((80, 62, 48), 10.0), d)
        p.ellipse(yb - trunk_h - crown * 0.6, x, crown, crown * 0.9, VEGETATION, p.colour(_BASE_COLOURS[VEGETATION], 22.0), d)


def _paint_heavy_vehicle(p: _Painter, rng: np.random.Generator, lights: list, kind: int, yb: float, x: float,
                         ppu: float, d: float) -> None:
    """A truck, bus or train as the "visible" object style draws it, standing at ground row ``yb``."""
    facing = 1.0 if rng.random() < 0.5 else -1.0  # which end is the front
    wheel_colour = p.colour((22, 22, 24), 4.0)
    if kind == TRUCK:  # a low cab with a windscreen, then a tall light cargo box
        width, height = max(0.95 * ppu, 3.0), max(0.95 * ppu, 3.0)
        left, right = x - width / 2, x + width / 2
        cab_w = width * 0.3
        cab0, cab1 = (right - cab_w, right) if facing > 0 else (left, left + cab_w)
        box0, box1 = (left, right - cab_w * 1.05) if facing > 0 else (left + cab_w * 1.05, right)
        if not p.box(yb - height, yb - height * 0.12, box0, box1, TRUCK,
                     p.colour(_CARGO_COLOURS[int(rng.integers(len(_CARGO_COLOURS)))], 10.0), d):
            return
        cab = _VEHICLE_COLOURS[int(rng.integers(len(_VEHICLE_COLOURS)))]
        p.box(yb - height * 0.62, yb - height * 0.12, cab0, cab1, TRUCK, p.colour(cab, 12.0), d)
        p.box(yb - height * 0.58, yb - height * 0.38, cab0 + cab_w * 0.15, cab1 - cab_w * 0.15, TRUCK,
              p.colour(cab * 0.25 + 20.0, 5.0), d)
        p.box(yb - height * 0.12, yb - height * 0.06, left, right, TRUCK, p.colour((40, 40, 44), 6.0), d)  # chassis
        wheels = (-0.38, -0.2, 0.38)
    elif kind == BUS:  # a livery, a row of side windows split by pillars and a light stripe
        width, height = max(1.1 * ppu, 3.0), max(0.8 * ppu, 3.0)
        livery = _BUS_COLOURS[int(rng.integers(len(_BUS_COLOURS)))]
        if not _windowed_body(p, BUS, yb, x, width, height, (livery, 14.0, 0.08), ((34, 40, 52), 6.0),
                              5, (0.85, 0.5), (0.05, 0.9, 0.78), ((235, 235, 230), 8.0, 0.3, 0.24), d):
            return
        wheels = (-0.35, 0.35)
    else:  # TRAIN: long, silver or blue, a window row and a red stripe
        width, height = max(1.8 * ppu, 4.0), max(0.9 * ppu, 3.0)
        body = _TRAIN_COLOURS[int(rng.integers(len(_TRAIN_COLOURS)))]
        if not _windowed_body(p, TRAIN, yb, x, width, height, (body, 8.0, 0.1), ((30, 34, 44), 5.0),
                              8, (0.82, 0.6), (0.04, 0.92, 0.6), ((200, 40, 40), 10.0, 0.48, 0.38), d):
            return
        wheels = (-0.42, -0.3, 0.3, 0.42)
    radius = max(height * 0.1, 1.0)
    for u in wheels:
        p.box(yb - 2 * radius, yb, x + u * width - radius, x + u * width + radius, kind, wheel_colour, d)
    lights.append((yb - height * 0.25, x + facing * width * 0.47, max(width * 0.03, 0.8), (2.2, 2.0, 1.5)))


def _windowed_body(p: _Painter, kind: int, yb: float, x: float, width: float, height: float, body: tuple,
                   glass: tuple, n: int, rows: tuple, spacing: tuple, stripe: tuple, d: float) -> bool:
    """A bus's or train's body: ``body`` (colour, jitter, bottom gap as a fraction of the height), ``n``
    windows of ``glass`` (colour, jitter) between heights ``rows`` (top, bottom: fractions above the
    ground row), spaced by ``spacing`` (margin, span, filled share: fractions of the width), and a
    ``stripe`` (colour, jitter, top, bottom). False when the body lies outside the image."""
    left = x - width / 2
    if not p.box(yb - height, yb - height * body[2], left, x + width / 2, kind, p.colour(body[0], body[1]), d):
        return False
    pane = p.colour(glass[0], glass[1])
    margin, span, filled = spacing
    for i in range(n):
        p.box(yb - height * rows[0], yb - height * rows[1], left + width * (margin + span * i / n),
              left + width * (margin + span * (i + filled) / n), kind, pane, d)
    p.box(yb - height * stripe[2], yb - height * stripe[3], left, x + width / 2, kind, p.colour(stripe[0], stripe[1]), d)
    return True
