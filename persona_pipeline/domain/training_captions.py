"""Training-photo captions in the persona's caption format.

A LoRA caption starts with `<trigger> <class>` and then describes only what varies between photos:
framing, pose/action, clothing, background, lighting. It never describes the identity itself (face,
eyes, hair, skin, ethnicity, age, body, names): whatever the caption leaves out is what the LoRA
binds to the trigger word, so naming the identity would spread it over ordinary words instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

FIELD_NAMES: tuple[str, ...] = ("framing", "pose", "clothing", "background", "lighting")


class CaptionFieldsError(ValueError):
    """A caption payload that lacks a field or carries a non-string one."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class CaptionFields:
    framing: str
    pose: str
    clothing: str
    background: str
    lighting: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "CaptionFields":
        """Fields from a mapping (extra keys are ignored); a missing or non-string field is an
        error naming the field."""
        if not isinstance(data, dict):
            raise CaptionFieldsError("", f"caption fields must be a JSON object, got {type(data).__name__}")
        values = {}
        for name in FIELD_NAMES:
            if name not in data:
                raise CaptionFieldsError(name, f"caption field {name!r} is missing")
            if not isinstance(data[name], str):
                raise CaptionFieldsError(name, f"caption field {name!r} must be a string, got {type(data[name]).__name__}")
            values[name] = data[name]
        return cls(**values)

    def map(self, fn) -> "CaptionFields":
        """The same fields with `fn` applied to each."""
        return CaptionFields(**{name: fn(getattr(self, name)) for name in FIELD_NAMES})


# Vocabularies of the offline open_clip captioner: each photo gets the closest phrase of each list.
# Clothing has none on purpose: zero-shot garment and colour guesses are often wrong, and a wrong
# clothing tag teaches the LoRA a false association; the offline captioner leaves clothing empty.
FRAMING_VOCAB: list[str] = [
    "extreme close-up", "close-up portrait", "head and shoulders portrait", "half-body shot",
    "three-quarter shot", "full-body shot", "wide shot", "selfie", "mirror selfie", "over-the-shoulder shot",
    "shot from below", "shot from above",
]
POSE_VOCAB: list[str] = [
    "standing", "sitting", "walking", "lying down", "leaning against a wall", "arms raised", "arms down",
    "arms crossed", "hands on hips", "looking at the camera", "looking away", "smiling at the camera",
    "laughing", "holding a cup", "dancing",
]
BACKGROUND_VOCAB: list[str] = [
    "city street", "beach", "forest", "park", "sunset rooftop", "cafe", "living room", "bedroom",
    "kitchen", "office", "gym", "studio backdrop", "mountains", "snowy landscape", "poolside",
]
LIGHTING_VOCAB: list[str] = [
    "soft daylight", "bright sunlight", "golden hour light", "overcast light", "dim evening light",
    "night city lights", "neon light", "studio lighting", "candlelight", "backlit", "window light",
]
VOCABULARIES: dict[str, list[str]] = {
    "framing": FRAMING_VOCAB, "pose": POSE_VOCAB, "background": BACKGROUND_VOCAB, "lighting": LIGHTING_VOCAB,
}


# --- Identity ----------------------------------------------------------------------------------
# Patterns for phrases that describe who the person is rather than the photo. They are narrow on
# purpose, so that photo words stay: "eyes closed" is a pose, "black jacket" is clothing, "old town"
# is a background, "skin-tight dress" is clothing, "hand on chin" is a pose. Colour, age, build and
# ethnicity words therefore only count next to a person noun or a body part.
_PERSON = r"(?:woman|women|man|men|girl|boy|person|lady|guy|female|male|model|adult|teen)"
_COLOUR = r"(?:blonde?|brunette|black|brown|red|auburn|ginger|grey|gray|silver|white|dark|light|golden|platinum|blue|green|hazel|amber)"
IDENTITY_PATTERNS: dict[str, str] = {
    # Hair: any mention of hair (colour, length, style all belong to the identity), hair-colour nouns.
    "hair": r"\bhair(?:ed|style|styles|cut|do)?\b|\b(?:blonde?|brunette|redhead(?:ed)?)\b|\bponytail\b|\bbangs\b|\bbraids?\b",
    # Eyes: colour only; "eyes closed" or "looking at the camera" are poses.
    "eye colour": rf"\b{_COLOUR}[- ]eyed\b|\b{_COLOUR}\s+eyes\b|\beye colou?r\b",
    # Face: shape and fixed features, not expression or direction.
    "face": r"\b(?:round|oval|square|heart[- ]shaped|angular|chubby|narrow|long|slim|thin|full|soft|sharp)\s+(?:face|jaw|jawline|cheeks|lips|nose|features)\b"
            r"|\bface shape\b|\bfacial (?:features|structure)\b|\b(?:freckles?|freckled|dimples?|cheekbones?|jawline|birthmarks?|moles?|wrinkles?|beard|bearded|moustache|mustache)\b",
    # Skin: tone and complexion ("skin-tight" is clothing).
    "skin": r"\bskin\b(?!-tight| tight)|\bcomplexion\b|\b(?:tanned|pale|fair|olive|dark|light)[- ]skinned\b|\bskin[- ]?tone\b",
    # Ethnicity: unambiguous words alone, adjectives of origin or colour only before a person noun
    # ("japanese garden" and "black dress" stay).
    "ethnicity": r"\b(?:ethnicity|ethnic|race|racial|caucasian|biracial|mixed[- ]race|hispanic|latina|latino|latinx)\b"
                 rf"|\b(?:asian|african|african[- ]american|european|indian|arab|middle[- ]eastern|east[- ]asian|south[- ]asian"
                 rf"|japanese|chinese|korean|black|white|nordic|scandinavian|slavic|mediterranean)\s+{_PERSON}\b",
    # Age: numbers of years, decades of life, age words before a person noun ("old town" stays).
    "age": r"\b\d{1,2}[- ]?(?:years?|yrs?)[- ]old\b|\baged? \d{1,2}\b|\b(?:middle[- ]aged|elderly|teenage|teenager)\b"
           r"|\bin (?:her|his|their) (?:early |mid[- ]?|late )?(?:teens|twenties|thirties|forties|fifties|sixties|[2-6]0s)\b"
           rf"|\b(?:young|younger|old|older|youthful|mature)\s+{_PERSON}\b",
    # Body type: build words before a person noun or build word ("short dress" and "tall grass" stay).
    "body": r"\bbody (?:type|shape)\b|\bphysique\b|\b(?:curvy|voluptuous|plus[- ]size|overweight|petite)\b"
            rf"|\b(?:slim|slender|thin|skinny|fat|chubby|muscular|athletic|stocky|tall|short|toned|fit)\s+(?:{_PERSON}|build|figure|body|frame)\b",
    # Names and likenesses: "named Mira", "looks like <celebrity>", attractiveness judgements.
    "name": r"\b(?:named|called)\s+[A-Z]\w*|\b(?:resembl\w*|looks like|lookalike|look-alike)\b"
            rf"|\b(?:beautiful|attractive|pretty|handsome|gorgeous|cute)\s+{_PERSON}\b",
}
_IDENTITY_RE = [(kind, re.compile(pattern, re.IGNORECASE)) for kind, pattern in IDENTITY_PATTERNS.items()]
# Connectors inside one comma segment, so "smiling with blue eyes" keeps "smiling" and
# "soft daylight on her pale skin" keeps "soft daylight".
_CLAUSE_RE = re.compile(r"\s+(?:with|and|who has|having|showing|on|of|in)\s+", re.IGNORECASE)


def _name_patterns(names: Iterable[str]) -> list[re.Pattern[str]]:
    return [re.compile(rf"\b{re.escape(n.strip())}\b", re.IGNORECASE) for n in names if n and n.strip()]


def find_identity_terms(text: str, names: Iterable[str] = ()) -> list[str]:
    """The identity phrases in `text` (empty list = clean). `names` are words that must never
    appear either, such as the persona's own name."""
    found = [m.group(0) for _, pattern in _IDENTITY_RE for m in pattern.finditer(text)]
    found += [m.group(0) for pattern in _name_patterns(names) for m in pattern.finditer(text)]
    return found


def strip_identity(text: str, names: Iterable[str] = ()) -> str:
    """`text` without the comma-separated segments that describe identity. Inside a segment the
    clean part before the first offending clause (`with`, `and`, `on`, `of`...) is kept ("smiling
    with blue eyes" -> "smiling"); a segment that offends from its start is dropped whole."""
    names = list(names)
    kept = []
    for segment in re.split(r"[,;]", text):
        segment = segment.strip()
        if not segment:
            continue
        if not find_identity_terms(segment, names):
            kept.append(segment)
            continue
        end = 0
        for clause in _CLAUSE_RE.finditer(segment):
            if find_identity_terms(segment[end:clause.start()], names):
                break
            end = clause.start()
        else:
            end = end if find_identity_terms(segment[end:], names) else len(segment)
        prefix = segment[:end].strip()
        if prefix and not find_identity_terms(prefix, names):
            kept.append(prefix)
    return ", ".join(kept)


# --- Composition -------------------------------------------------------------------------------


def _lower_first(phrase: str) -> str:
    # Keep acronyms ("LED lights", "NYC street"): lower only a first word that is not all capitals.
    first = phrase.split(" ", 1)[0]
    if len(first) > 1 and first.isupper():
        return phrase
    return phrase[:1].lower() + phrase[1:]


def normalise_field(text: str) -> str:
    """One field as caption segments: whitespace collapsed, empty segments and trailing
    periods dropped, first letter of each segment lower-cased."""
    segments = []
    for segment in re.split(r"[,;]", " ".join(text.split())):
        segment = segment.strip().rstrip(".").strip()
        if segment:
            segments.append(_lower_first(segment))
    return ", ".join(segments)


def compose_training_caption(trigger_word: str, class_word: str, fields: CaptionFields) -> str:
    """`"<trigger> <class>, framing, pose, clothing, background, lighting"`, skipping empty fields,
    e.g. `"m1ra woman, close-up portrait, smiling at the camera, wearing a yellow jacket, city
    street, soft daylight"`."""
    head = " ".join(w for w in (trigger_word.strip(), class_word.strip()) if w)
    parts = [head] if head else []
    parts += [p for p in (normalise_field(getattr(fields, name)) for name in FIELD_NAMES) if p]
    return ", ".join(parts)
