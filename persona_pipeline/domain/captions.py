"""Caption and hashtag rules shared by training captions and post captions.

Post captions (docs/rules.md#captions-and-hashtags): a length band per persona, the phrases repeated in its recent
captions (sent to the caption model as phrases to avoid), template captions when no model is
configured, hashtags picked by the persona's size mix, and Instagram's limits (docs/rules.md#graph-api-limits), checked in one
place: `validate_post_text`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence


class TemplateError(ValueError):
    pass


_FIELD_RE = re.compile(r"{(\w+)}")


def fill(template: str, values: dict[str, str], *, what: str) -> str:
    """Fill `{name}` fields; an unknown field is an error naming it (never left in the output)."""
    missing = sorted({name for name in _FIELD_RE.findall(template) if name not in values})
    if missing:
        raise TemplateError(f"{what}: unknown placeholder(s) {', '.join('{' + m + '}' for m in missing)} in {template!r}; "
                            f"known: {', '.join(sorted(values))}")
    return _FIELD_RE.sub(lambda m: str(values[m.group(1)]), template)


def training_caption(trigger_word: str, body: str) -> str:
    """A training caption that starts with the trigger word exactly once."""
    text = " ".join(body.split())
    if text == trigger_word or text.startswith(trigger_word + " ") or text.startswith(trigger_word + ","):
        return text
    return f"{trigger_word}, {text}" if text else trigger_word


def hashtags_for_post(targets: list[str], avoid: list[str], max_per_post: int, offset: int = 0) -> list[str]:
    """Up to `max_per_post` target hashtags, never an avoided one, rotating by `offset` so that
    consecutive posts do not all carry the same tags."""
    avoided = {a.lower() for a in avoid}
    usable = [t for t in dict.fromkeys(targets) if t.lower() not in avoided]
    if not usable or max_per_post <= 0:
        return []
    start = offset % len(usable)
    rotated = usable[start:] + usable[:start]
    return [f"#{t}" for t in rotated[:max_per_post]]


CAPTION_MAX_CHARS = 2200
MAX_MENTIONS = 20
DEFAULT_MAX_HASHTAGS = 5  # Instagram's limit since December 2025 (30 before); persona.yaml hashtags.max_per_post

# A hashtag needs a letter or underscore: Instagram does not link digit-only tags such as "#1".
HASHTAG_RE = re.compile(r"#\w*[^\W\d]\w*")
# "@" after a word character is an e-mail address, not a mention.
MENTION_RE = re.compile(r"(?<!\w)@\w+")


def validate_post_text(caption: str, hashtags: list[str], max_hashtags: int = DEFAULT_MAX_HASHTAGS) -> list[str]:
    """Problems with a post's text against Instagram's limits (empty list = valid).

    The published text is the caption, a space, then the hashtags; hashtags are counted once each,
    case-insensitively (Instagram treats #Travel and #travel as one tag), whether in the list or
    typed into the caption."""
    problems = []
    full = caption + (" " + " ".join(hashtags) if hashtags else "")
    if len(full) > CAPTION_MAX_CHARS:
        problems.append(f"caption with hashtags is {len(full)} characters; the limit is {CAPTION_MAX_CHARS}")
    tags = {t.strip().lstrip("#").casefold() for t in hashtags if t.strip().lstrip("#")}
    tags |= {t[1:].casefold() for t in HASHTAG_RE.findall(caption)}
    if len(tags) > max_hashtags:
        problems.append(f"{len(tags)} hashtags; the limit is {max_hashtags}")
    mentions = MENTION_RE.findall(full)
    if len(mentions) > MAX_MENTIONS:
        problems.append(f"{len(mentions)} mentions; the limit is {MAX_MENTIONS}")
    return problems


# --- post captions --------------------------------------------------------------------------------

# persona.yaml captions.length: the caption's length in characters, both ends included.
LENGTH_BANDS: dict[str, tuple[int, int]] = {"short": (300, 450), "medium": (450, 700), "long": (700, 1000)}


def length_band(length: str) -> tuple[int, int]:
    """(min, max) characters of a band name; an unknown name is a ValueError listing the known ones."""
    try:
        return LENGTH_BANDS[length]
    except KeyError:
        raise ValueError(f"unknown caption length {length!r}; known: {', '.join(LENGTH_BANDS)}") from None


def in_band(caption: str, length: str) -> bool:
    low, high = length_band(length)
    return low <= len(caption) <= high


def tidy_caption(text: str) -> str:
    """Spaces trimmed at line ends, at most one blank line in a row, no blank lines around the text
    (line breaks are kept: Instagram shows them as paragraphs)."""
    lines = [" ".join(line.split()) for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def strip_hashtags(text: str) -> str:
    """The caption without hashtags (ours are added separately), tidied."""
    return tidy_caption(HASHTAG_RE.sub("", text))


STOP_WORDS = frozenset("""
a about above after again all also am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
him his how i if in into is it it's its just me more most my no nor not now of off on once only or other our
ours out over own same she should so some such than that the their theirs them then there these they this
those through to too under until up very was we were what when where which while who whom why will with would
you your yours yourself i'm you're we're that's
""".split())
# Phrases never cross these: sentence and clause punctuation, line breaks, dashes, quotes, brackets.
_SEGMENT_BREAK_RE = re.compile(r"[.!?;:,()\[\]{}\"“”«»…\n\r\t—–|/]+|\s-\s")
_WORD_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_URL_RE = re.compile(r"https?://\S+|www\.\S+")


def _segments(caption: str) -> list[list[str]]:
    """Lowercase word runs of a caption; hashtags, mentions and links break a run and are not words."""
    text = caption.replace("’", "'").casefold()
    text = _URL_RE.sub("\n", text)
    text = re.sub(r"[#@]\w+", "\n", text)
    return [words for part in _SEGMENT_BREAK_RE.split(text) if (words := _WORD_RE.findall(part))]


def repeated_phrases(captions: Sequence[str], min_words: int = 2, max_words: int = 4, min_count: int = 2,
                     limit: int = 20) -> list[str]:
    """Phrases of `min_words`..`max_words` words found in at least `min_count` of `captions`.

    Counted once per caption (a phrase repeated inside one caption is that caption's style, not a
    habit across posts), case-insensitively, within a sentence or clause; hashtags, mentions and
    links are ignored, and phrases made only of stop words ("and the", "it is") are left out. A
    phrase inside a longer one found in exactly as many captions adds nothing and is dropped. Order: most
    captions first, then longer first, then alphabetical, so the result is the same for the same
    captions in any order. At most `limit` phrases.
    """
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words} and {max_words}")
    counts: Counter[tuple[str, ...]] = Counter()
    for caption in captions:
        seen: set[tuple[str, ...]] = set()
        for words in _segments(caption):
            for size in range(min_words, max_words + 1):
                for start in range(len(words) - size + 1):
                    seen.add(tuple(words[start:start + size]))
        counts.update(gram for gram in seen if not all(w in STOP_WORDS for w in gram))
    frequent = {gram: n for gram, n in counts.items() if n >= max(1, min_count)}
    ordered = sorted(frequent, key=lambda g: (-frequent[g], -len(g), " ".join(g)))
    kept: list[tuple[str, ...]] = []
    for gram in ordered:
        if any(frequent[longer] == frequent[gram] and _contains(longer, gram) for longer in frequent
               if len(longer) > len(gram)):
            continue
        kept.append(gram)
        if len(kept) >= limit:
            break
    return [" ".join(gram) for gram in kept]


def _contains(longer: tuple[str, ...], shorter: tuple[str, ...]) -> bool:
    return any(longer[i:i + len(shorter)] == shorter for i in range(len(longer) - len(shorter) + 1))


# Shares of the post's hashtags by tag size (broad : medium : niche) for persona.yaml hashtags.size_mix.
SIZE_MIXES: dict[str, tuple[int, int, int]] = {"balanced": (1, 1, 1), "niche_heavy": (1, 1, 3), "broad_reach": (3, 1, 1)}
# Who gets a slot the shares leave tied (and who fills in first when a group runs short).
_SIZE_PRIORITY: dict[str, tuple[str, ...]] = {"balanced": ("medium", "niche", "broad"),
                                              "niche_heavy": ("niche", "medium", "broad"),
                                              "broad_reach": ("broad", "medium", "niche")}
_GROUPS = ("broad", "medium", "niche")


def _clean_tag(tag: str, what: str) -> str:
    clean = tag.strip().lstrip("#")
    if not re.fullmatch(r"\w+", clean):
        raise ValueError(f"{what} hashtag {tag!r} must be letters, digits or underscores")
    return clean


def size_quotas(size_mix: str, slots: int) -> dict[str, int]:
    """How many of `slots` hashtags each size group gets: largest remainder of the mix's shares,
    ties to the mix's priority order. 5 slots: balanced 1/2/2, niche_heavy 1/1/3, broad_reach 3/1/1
    (broad/medium/niche)."""
    if size_mix not in SIZE_MIXES:
        raise ValueError(f"unknown hashtag size_mix {size_mix!r}; known: {', '.join(SIZE_MIXES)}")
    shares = dict(zip(_GROUPS, SIZE_MIXES[size_mix]))
    total = sum(shares.values())
    quotas = {g: slots * s // total for g, s in shares.items()}
    priority = _SIZE_PRIORITY[size_mix]
    by_remainder = sorted(_GROUPS, key=lambda g: (-(slots * shares[g] % total), priority.index(g)))
    for group in by_remainder[:slots - sum(quotas.values())]:
        quotas[group] += 1
    return quotas


def select_hashtags(*, broad: list[str], medium: list[str], niche: list[str], avoid: list[str],
                    size_mix: str, max_per_post: int, offset: int) -> list[str]:
    """At most `max_per_post` "#tag" strings mixed by tag size (persona.yaml hashtags).

    `broad` are the big tags, `medium` the persona's targets, `niche` the small community ones.
    Shares (broad : medium : niche): balanced 1:1:1, niche_heavy 1:1:3, broad_reach 3:1:1; see
    `size_quotas`. A group with too few tags leaves its slots to the others in the mix's priority
    order. Within a group the window of tags moves on by the group's count with each `offset`
    (the post's number), so consecutive posts carry different tags while every tag gets its turn.
    Never an avoided tag; tags are compared case-insensitively, a tag listed in two groups counts in
    the first of broad, medium, niche, and keeps the spelling it was first given. Output order:
    broad, medium, niche.
    """
    avoided = {_clean_tag(t, "avoided").casefold() for t in avoid}
    seen: set[str] = set()
    usable: dict[str, list[str]] = {}
    for group, tags in zip(_GROUPS, (broad, medium, niche)):
        usable[group] = []
        for tag in tags:
            clean = _clean_tag(tag, group)
            key = clean.casefold()
            if key in avoided or key in seen:
                continue
            seen.add(key)
            usable[group].append(clean)
    quotas = size_quotas(size_mix, max(0, max_per_post))
    take = {g: min(quotas[g], len(usable[g])) for g in _GROUPS}
    spare = max(0, max_per_post) - sum(take.values())
    for group in _SIZE_PRIORITY[size_mix]:
        extra = min(spare, len(usable[group]) - take[group])
        take[group] += extra
        spare -= extra
    out: list[str] = []
    for group in _GROUPS:
        tags, count = usable[group], take[group]
        if count:
            start = offset * count % len(tags)
            out.extend(f"#{t}" for t in (tags[start:] + tags[:start])[:count])
    return out


def template_caption(templates: list[str], values: dict[str, str], index: int, *, what: str) -> str:
    """Template `index` (cycling) of persona.yaml captions.templates, filled from `values`
    ({pillar}, {theme}, {guidelines}, {name}). Every template is checked, not just the chosen one,
    so a typo fails on the first post. An unknown placeholder, an empty result or one over
    Instagram's 2,200 characters is a TemplateError naming `what`."""
    if not templates:
        raise TemplateError(f"{what}: no caption templates")
    for template in templates:
        fill(template, values, what=what)
    caption = tidy_caption(fill(templates[index % len(templates)], values, what=what))
    if not caption:
        raise TemplateError(f"{what}: template {index % len(templates)} {templates[index % len(templates)]!r} "
                            f"fills to an empty caption")
    if len(caption) > CAPTION_MAX_CHARS:
        raise TemplateError(f"{what}: template {index % len(templates)} fills to {len(caption)} characters; "
                            f"the limit is {CAPTION_MAX_CHARS}")
    return caption
