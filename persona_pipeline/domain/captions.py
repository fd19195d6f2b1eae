"""Caption and hashtag rules shared by training captions and post captions."""

from __future__ import annotations

import re


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


def validate_post_text(caption: str, hashtags: list[str], max_hashtags: int) -> list[str]:
    """Problems with a post's text against Instagram's limits (empty list = valid)."""
    problems = []
    full = caption + (" " + " ".join(hashtags) if hashtags else "")
    if len(full) > CAPTION_MAX_CHARS:
        problems.append(f"caption with hashtags is {len(full)} characters; the limit is {CAPTION_MAX_CHARS}")
    tags = set(hashtags) | set(re.findall(r"#\w+", caption))
    if len(tags) > max_hashtags:
        problems.append(f"{len(tags)} hashtags; the limit is {max_hashtags}")
    mentions = re.findall(r"@\w+", full)
    if len(mentions) > MAX_MENTIONS:
        problems.append(f"{len(mentions)} mentions; the limit is {MAX_MENTIONS}")
    return problems
