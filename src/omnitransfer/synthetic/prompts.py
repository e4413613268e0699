"""Prompt grammar: lower-case sentences over a fixed vocabulary, so a word-level tokenizer covers them all.

Every sentence is a template below filled with words from the lexicon or the phrase tables here;
`VOCABULARY` is computed from exactly those, so no prompt can contain a word outside it.
Temporal tasks name their movement or effect in both prompts; for appearance tasks the target
prompt describes only the new content (the look must come from the reference), while the
reference prompt captions the reference, naming its subject or style.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from .lexicon import ACCESSORIES, BACKGROUND_PATTERNS, COLORS, FILL_PATTERNS, SHAPES

# Fillers of slots: articles ({a}) and movement words.
ARTICLES = ("a", "an")
DIRECTION_WORDS = ("left", "right", "up", "down", "and")
ZOOM_WORDS = ("in", "out")
TURN_WORDS = ("clockwise", "counterclockwise")

# Phrase tables, one entry per kind of each task (tests check they cover every kind).
CAMERA_MOVES = {
    "pan": "pans {direction}",
    "zoom": "zooms {zoom}",
    "rotate": "rolls {turn}",
    "pan+zoom": "pans {direction} and zooms {zoom}",
    "zoom+rotate": "zooms {zoom} and rolls {turn}",
    "orbit": "orbits {turn}",
}
MOTION_MOVES = {
    "walk": "walks {direction}",
    "wave": "waves",
    "jump": "jumps",
    "clap": "claps and moves {direction}",
    "dance": "dances in a circle",
}
EFFECT_NAMES = {
    "flash": "flash",
    "wipe": "wipe",
    "dissolve": "dissolve",
    "fade": "fade",
    "shake": "shake",
    "sparkle": "sparkle",
    "hue": "color cycle",
    "blur": "blur",
    "ripple": "ripple",
    "vignette": "vignette",
}
STYLE_NAMES = {
    "palette": "palette",
    "posterize": "poster",
    "ink": "ink",
    "tint": "tinted",
    "pixelate": "pixel",
    "emboss": "embossed",
    "halftone": "halftone",
    "neon": "neon",
}

# Sentence templates; {slots} are filled with the words above or with other templates.
OBJECT = "{a} {color} {shape}"
BACKGROUND = "a {pattern} {color} background"
FIELD = "a {pattern} {color} field"
PAIR = "{first} and {second}"
SCENE = "{objects} over {background}"
CAMERA = "the camera {move} across {field}"
CAMERA_WITH = "the camera {move} across {field} with {objects}"
MOTION = "a {color} {shape} figure {move} over {background}"
EFFECT = "{scene} with a {effect} effect"
CONTENT = "{object} moves {direction} over {background}"
STYLE = "{content} in the {style} style"
SUBJECT = "a {fill} {color} {shape} with {a} {accessory_color} {accessory}"
ID_REFERENCE = "{subject} turns around over {background}"
ID_TARGET = "the subject moves {direction} over {background}"


def _words(*texts: str) -> set[str]:
    return {w for text in texts for w in re.sub(r"\{\w+\}", " ", text).split()}


VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        _words(OBJECT, BACKGROUND, FIELD, PAIR, SCENE, CAMERA, CAMERA_WITH, MOTION, EFFECT, CONTENT, STYLE)
        | _words(SUBJECT, ID_REFERENCE, ID_TARGET, *DIRECTION_WORDS, *ZOOM_WORDS, *TURN_WORDS)
        | _words(*CAMERA_MOVES.values(), *MOTION_MOVES.values(), *EFFECT_NAMES.values(), *STYLE_NAMES.values())
        | _words(*COLORS, *SHAPES, *BACKGROUND_PATTERNS.values(), *FILL_PATTERNS.values(), *ACCESSORIES, *ARTICLES)
    )
)


def direction(dx: float, dy: float) -> str:
    """Compass words for a direction in image coordinates (y down): "right", "left and up", ..."""
    norm = math.hypot(dx, dy) or 1.0
    horizontal = ("right" if dx > 0 else "left") if abs(dx) >= 0.38 * norm else ""
    vertical = ("down" if dy > 0 else "up") if abs(dy) >= 0.38 * norm else ""
    return " and ".join(w for w in (horizontal, vertical) if w)


def _article(word: str) -> str:
    return ARTICLES[word[0] in "aeiou"]


def obj(color: str, shape: str) -> str:
    return OBJECT.format(a=_article(color), color=color, shape=shape)


def objects(pairs: Sequence[tuple[str, str]]) -> str:
    """ "a red star and a blue ring" from the first two distinct (color, shape) pairs; "" for none."""
    phrases = [obj(c, s) for c, s in dict.fromkeys(pairs)][:2]
    return PAIR.format(first=phrases[0], second=phrases[1]) if len(phrases) == 2 else "".join(phrases)


def background(pattern: str, color: str) -> str:
    return BACKGROUND.format(pattern=BACKGROUND_PATTERNS[pattern], color=color)


def scene(pairs: Sequence[tuple[str, str]], pattern: str, color: str) -> str:
    """Objects over a background, or just the background when there are no objects."""
    where = background(pattern, color)
    return SCENE.format(objects=objects(pairs), background=where) if pairs else where


def camera(family: str, words: dict[str, str], pattern: str, color: str, pairs: Sequence[tuple[str, str]]) -> str:
    move = CAMERA_MOVES[family].format(**words)
    field = FIELD.format(pattern=BACKGROUND_PATTERNS[pattern], color=color)
    if pairs:
        return CAMERA_WITH.format(move=move, field=field, objects=objects(pairs))
    return CAMERA.format(move=move, field=field)


def motion(kind: str, words: dict[str, str], color: str, shape: str, pattern: str, bg_color: str) -> str:
    move = MOTION_MOVES[kind].format(**words)
    return MOTION.format(color=color, shape=shape, move=move, background=background(pattern, bg_color))


def effect(kind: str, scene_text: str) -> str:
    return EFFECT.format(scene=scene_text, effect=EFFECT_NAMES[kind])


def content(color: str, shape: str, where: str, pattern: str, bg_color: str) -> str:
    """ "a red star moves left over a striped blue background" (where = direction words)."""
    return CONTENT.format(object=obj(color, shape), direction=where, background=background(pattern, bg_color))


def style(kind: str, content_text: str) -> str:
    return STYLE.format(content=content_text, style=STYLE_NAMES[kind])


def subject(fill: str, color: str, shape: str, accessory_color: str, accessory: str) -> str:
    return SUBJECT.format(
        fill=FILL_PATTERNS[fill],
        color=color,
        shape=shape,
        a=_article(accessory_color),
        accessory_color=accessory_color,
        accessory=accessory,
    )


def id_reference(subject_text: str, pattern: str, color: str) -> str:
    return ID_REFERENCE.format(subject=subject_text, background=background(pattern, color))


def id_target(where: str, pattern: str, color: str) -> str:
    return ID_TARGET.format(direction=where, background=background(pattern, color))
