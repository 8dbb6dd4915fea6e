"""The vocabulary of the synthetic world: shapes, colours, sizes, printed words, fonts.

Everything a scene can contain is named here, once; the renderer, the task writer, the
evaluator and the expert-pretraining targets all index these tuples.
"""
from __future__ import annotations

from pathlib import Path

SHAPES: tuple[str, ...] = ("circle", "square", "rectangle", "triangle", "star", "hexagon", "ellipse", "cross")


def plural(noun: str) -> str:
    """English plural of a name ending in one of the world's shapes ("small red cross" -> "... crosses")."""
    return noun + ("es" if noun.endswith(("x", "s", "sh", "ch")) else "s")


PLURALS: dict[str, str] = {s: plural(s) for s in SHAPES}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 220, 30),
    "orange": (245, 140, 20), "purple": (130, 40, 170), "pink": (250, 130, 190), "brown": (120, 70, 30),
    "black": (15, 15, 15), "white": (250, 250, 250), "gray": (128, 128, 128), "cyan": (30, 210, 220),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

SIZES: tuple[str, ...] = ("small", "medium", "large")
# Object side as a fraction of the scene's long side, per size class (low, high).
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.06, 0.09), "medium": (0.11, 0.15), "large": (0.18, 0.24)}

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                 "nine", "ten")

# Common English words; none is a colour, shape, size or number word (checked by a test).
WORDS: tuple[str, ...] = tuple("""
able about above after again air all also always animal answer apple area art ask away baby back
bag ball bank base bath bear beat bed bell best bird boat body bone book box bread bridge bring
build bus cake call camp car card care cat chair change city class clock cloud coat cold come
cook corn cup dance dark day deep desk dog door down draw dream dress drink drive duck early earth
east easy eat egg end face fall farm fast field fire fish flag floor flower fly food foot forest
free friend frog fruit game garden gate gift girl glass goat gold good grass great ground group
hair hand happy hat head heart help hill home honey horse hot house idea iron island jump key
king kite lake lamp land late leaf learn left letter light line lion long love low map market
milk moon morning mother mountain mouse music name near nest new night north nose ocean open
page paint paper park party path pen piano picture plane plant play pool rain read river road
rock roof room rope run salt sand school sea seed ship shoe shop sing sky sleep snow song south
space spring stone story street summer sun swim table tea tent tiger time town toy train tree
truck under water wave west wheel wind window winter wolf wood word work world write year zoo
""".split())

# Fonts: the training renderer draws with TRAIN_FONTS; the held-out renderer with HELDOUT_FONTS,
# so evaluation also measures generalisation over typefaces. Debian packages: fonts-dejavu-core,
# fonts-liberation2 (train), fonts-freefont-ttf (held out).
_FONT_ROOT = Path("/usr/share/fonts/truetype")
TRAIN_FONTS: tuple[str, ...] = (
    "dejavu/DejaVuSans.ttf", "dejavu/DejaVuSans-Bold.ttf", "dejavu/DejaVuSerif.ttf",
    "dejavu/DejaVuSerif-Bold.ttf", "dejavu/DejaVuSansMono.ttf", "dejavu/DejaVuSansCondensed.ttf",
    "liberation2/LiberationSans-Regular.ttf", "liberation2/LiberationSerif-Regular.ttf",
    "liberation2/LiberationMono-Regular.ttf", "liberation2/LiberationSans-Bold.ttf",
)
HELDOUT_FONTS: tuple[str, ...] = (
    "freefont/FreeSans.ttf", "freefont/FreeSerif.ttf", "freefont/FreeMono.ttf", "freefont/FreeSansBold.ttf",
)


def font_paths(names: tuple[str, ...]) -> list[Path]:
    """The installed fonts among `names`; a clear error when none is installed."""
    found = [_FONT_ROOT / n for n in names if (_FONT_ROOT / n).is_file()]
    if not found:
        raise FileNotFoundError(f"none of the fonts {names} is installed under {_FONT_ROOT} "
                                "(apt-get install fonts-dejavu-core fonts-liberation2 fonts-freefont-ttf)")
    return found


def object_name(size: str, colour: str, shape: str) -> str:
    return f"{size} {colour} {shape}"
