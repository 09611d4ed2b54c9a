"""The toy world's held-out identities and styles, and the identity-style pairs the replicated study trains.

Every pair is trained with the same two trigger words (``zkc`` for its identity, ``qrv`` for its style), unseen in
pretraining, so that the pairs differ only in the concepts they teach: each pair is an independent replicate of the
study and no two pairs are ever combined. ``zkc``/``qrv`` is the toy study's own pair (:data:`DEFAULT_PAIR`).
"""

from __future__ import annotations

from dataclasses import dataclass

from bwl.toy.world import (
    ATTRIBUTES,
    HELD_OUT_SHAPE,
    HELD_OUT_STYLE,
    IDENTITY,
    REPLICATE_SHAPES,
    REPLICATE_STYLES,
    Character,
    identity_set,
    style_set,
)


@dataclass(frozen=True)
class ToyIdentity:
    """A held-out character: its name and its look (a held-out shape, a color, a hat and eyes)."""

    name: str
    shape: str
    color: str
    hat: str
    eyes: str

    @property
    def look(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "hat": self.hat, "eyes": self.eyes}

    def images(self, count: int = 20) -> list[tuple[Character, int]]:
        return identity_set(count, look=self.look)

    def own_tags(self) -> list[str]:
        """The tags that describe the identity itself, which the trigger carries (manual caption correction)."""
        return [t for t in self.images(1)[0][0].tags() if t != "flat" and not t.endswith(" background")]


@dataclass(frozen=True)
class ToyStyle:
    """A held-out rendering: its name and its texture on the 4 px grid."""

    name: str
    texture: str

    def images(self, count: int = 20) -> list[tuple[Character, int]]:
        return style_set(count, texture=self.texture)

    def own_tags(self) -> list[str]:
        return [self.texture]


IDENTITIES: dict[str, ToyIdentity] = {i.name: i for i in (
    ToyIdentity("zkc", HELD_OUT_SHAPE, IDENTITY["color"], IDENTITY["hat"], IDENTITY["eyes"]),
    ToyIdentity("star", REPLICATE_SHAPES[0], "purple", "tophat", "sleepy"),
    ToyIdentity("heart", REPLICATE_SHAPES[1], "green", "none", "round"),
)}
STYLES: dict[str, ToyStyle] = {s.name: s for s in (
    ToyStyle("qrv", HELD_OUT_STYLE),
    ToyStyle("dots", REPLICATE_STYLES[0]),
    ToyStyle("hatch", REPLICATE_STYLES[1]),
)}


@dataclass(frozen=True)
class ConceptPair:
    """One identity and one style, trained and combined together: one replicate of the study."""

    identity: ToyIdentity
    style: ToyStyle

    @property
    def name(self) -> str:
        return f"{self.identity.name}+{self.style.name}"

    @property
    def is_default(self) -> bool:
        """The toy study's own pair: its adapters, data folders and cells are the toy study's."""
        return self == DEFAULT_PAIR

    def concept_id(self, concept: str) -> str:
        """The adapter key's ``concept_id`` for ``identity`` or ``style`` ("" for the default pair's)."""
        if self.is_default:
            return ""
        return self.identity.name if concept == "identity" else self.style.name

    def __str__(self) -> str:
        return self.name


def parse_pair(text: str) -> ConceptPair:
    """``"star+dots"``: an identity and a style of the registry."""
    identity, _, style = text.partition("+")
    if identity not in IDENTITIES or style not in STYLES:
        raise ValueError(f"unknown concept pair {text!r}: write <identity>+<style> with an identity of "
                         f"{', '.join(IDENTITIES)} and a style of {', '.join(STYLES)}")
    return ConceptPair(IDENTITIES[identity], STYLES[style])


DEFAULT_PAIR = ConceptPair(IDENTITIES["zkc"], STYLES["qrv"])
REPLICATE_PAIRS: tuple[ConceptPair, ...] = (DEFAULT_PAIR, parse_pair("star+dots"), parse_pair("heart+hatch"))


def check_registry() -> None:
    """Every registered concept uses values the world draws and the probes read."""
    for identity in IDENTITIES.values():
        for key, value in identity.look.items():
            if value not in ATTRIBUTES[key]:
                raise ValueError(f"identity {identity.name}: {key}={value!r} is not one of {ATTRIBUTES[key]}")
    for style in STYLES.values():
        if style.texture not in ATTRIBUTES["style"]:
            raise ValueError(f"style {style.name}: texture {style.texture!r} is not one of {ATTRIBUTES['style']}")
