"""Topic rotation through the `content_plan` asset, on SQLite and PostgreSQL: pillar counts over
many plans follow the weights, each pillar's themes come round without repeats, the rotation
state survives a restart (fresh resources, Dagster instance and database engine), persona.yaml
edits take effect, and the Gemini path (local fake server) is asked for the rotation's themes."""

from __future__ import annotations

from collections import Counter

import dagster as dg
import pytest
import yaml
from sqlalchemy import func, select

from persona_pipeline.assets.content_plan import content_plan
from persona_pipeline.db import models, registry
from persona_pipeline.db.session import get_engine, session_scope
from persona_pipeline.definitions import build_resources
from persona_pipeline.domain.rotation import RotationState, rotate_pillars, take_themes
from persona_pipeline.personas import load_persona
from persona_pipeline.resources.gemini import GeminiClient
from persona_pipeline_tests.conftest import make_settings, write_persona

SLUG = "tester"
WEIGHTS = {"city": 60, "beach": 40}
THEMES = {"city": ["rooftop bar", "tram ride", "market stall", "old bookshop"],
          "beach": ["surf lesson", "beach volleyball", "sunset swim"]}
URGENCY = ["city", "beach"]  # nothing in the library: both exhausted, city has the larger gap


@pytest.fixture(autouse=True)
def _no_gemini_key(monkeypatch):
    """build_resources reads GEMINI_API_KEY: the tests choose Gemini explicitly."""
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)


class Planner:
    """A persona in a fresh database and its content plans."""

    def __init__(self, tmp_path, db_url: str, themes: dict | None = THEMES, **persona):
        self.url = db_url
        self.settings = make_settings(tmp_path, db_url)
        generation = {"prompts_per_plan": 2, **({"themes": themes} if themes else {})}
        self.folder = write_persona(self.settings.datasets_dir, SLUG, photos=0, generation=generation, **persona)
        self.restart()

    def sync(self) -> None:
        with session_scope(self.url) as session:
            registry.sync_persona(session, load_persona(self.folder))

    def restart(self) -> None:
        """What a new process starts with: the database and the persona folder, nothing else — new
        resources, a new Dagster instance, and no pooled database connections."""
        get_engine(self.url).dispose()
        get_engine.cache_clear()
        self.sync()
        self.instance = dg.DagsterInstance.ephemeral()
        self.instance.add_dynamic_partitions("personas", [SLUG])
        self.resources = build_resources(self.settings)

    def configure(self, **generation) -> None:
        """Change persona.yaml's generation section and sync it, as the persona sensor would."""
        path = self.folder / "persona.yaml"
        config = yaml.safe_load(path.read_text())
        config["generation"].update(generation)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.sync()

    def plan(self, gemini: GeminiClient | None = None, raise_on_error: bool = True):
        resources = dict(self.resources, **({"gemini": gemini} if gemini else {}))
        return dg.materialize([content_plan], partition_key=SLUG, instance=self.instance, resources=resources,
                              raise_on_error=raise_on_error)

    def prompts(self) -> list[models.ContentPrompt]:
        """Every prompt planned so far (superseded ones too), in the order they were planned."""
        with session_scope(self.url) as session:
            rows = list(session.scalars(select(models.ContentPrompt).order_by(models.ContentPrompt.id)))
            self.names = {p.id: p.name for p in session.scalars(select(models.ContentPillar))}
            session.expunge_all()
            return rows

    def picks(self) -> list[tuple[str, str]]:
        """(pillar, theme) of every prompt planned so far."""
        rows = self.prompts()
        return [(self.names[r.pillar_id], r.theme) for r in rows]

    def stored_states(self) -> dict[str, RotationState]:
        with session_scope(self.url) as session:
            rows = session.execute(select(models.ContentPillar.name, models.TopicRotation).join(
                models.ContentPillar, models.ContentPillar.id == models.TopicRotation.pillar_id)).all()
            return {name: RotationState(row.credit, row.round, list(row.used_themes)) for name, row in rows}


def reference(plans: int, themes: dict[str, list[str]] = THEMES, weights=WEIGHTS, order=URGENCY,
              per_plan: int = 2) -> list[tuple[str, str]]:
    """What `plans` plans should pick in all, had nothing ever stopped: the pure rotation run on."""
    states: dict[str, RotationState] = {}
    picks = []
    for _ in range(plans):
        for name in rotate_pillars(weights, states, per_plan, order=order):
            picks.append((name, take_themes(themes[name], states[name], 1, f"{SLUG}:{name}")[0]))
    return picks


def metadata(result) -> dict:
    (materialisation,) = result.asset_materializations_for_node("content_plan")
    return {k: v.value for k, v in materialisation.metadata.items()}


def assert_follows_weights(pillars: list[str], weights: dict[str, float]) -> None:
    total = sum(weights.values())
    counts: Counter[str] = Counter()
    for t, name in enumerate(pillars, 1):
        counts[name] += 1
        for other, weight in weights.items():
            assert abs(counts[other] - t * weight / total) < 1, (t, dict(counts))


def assert_cycles(themes: list[str], listed: list[str]) -> None:
    """Each full round of `themes` holds every listed theme once; never the same theme twice in a row."""
    size = len(listed)
    for start in range(0, len(themes) - size + 1, size):
        assert sorted(themes[start:start + size]) == sorted(listed), themes
    assert set(themes) <= set(listed)
    assert all(a != b for a, b in zip(themes, themes[1:])), themes


def test_plans_follow_the_weights_cycle_the_themes_and_continue_after_a_restart(tmp_path, db_url):
    planner = Planner(tmp_path, db_url)
    for _ in range(6):
        planner.plan()
    before_restart = planner.picks()
    planner.restart()
    for _ in range(6):
        planner.plan()
    picks = planner.picks()

    assert picks[:12] == before_restart
    # The restart went on where the last plan stopped: 12 plans pick exactly as one uninterrupted
    # rotation would, and not as a rotation starting over would.
    assert picks == reference(12)
    assert picks[12:] != reference(6)
    pillars = [name for name, _ in picks]
    assert_follows_weights(pillars, WEIGHTS)
    assert Counter(pillars) in ({"city": 14, "beach": 10}, {"city": 15, "beach": 9})
    for name, listed in THEMES.items():
        assert_cycles([theme for pillar, theme in picks if pillar == name], listed)

    # Each prompt is about its theme (template path), and only the last plan's are still planned.
    rows = planner.prompts()
    assert all(r.source == "template" and r.theme in r.prompt for r in rows)
    assert [r.status for r in rows] == ["cancelled"] * 22 + ["planned"] * 2

    # The stored state is the rotation's, and the last plan records it with its prompts.
    states = planner.stored_states()
    expected: dict[str, RotationState] = {}
    for _ in range(12):
        for name in rotate_pillars(WEIGHTS, expected, 2, order=URGENCY):
            take_themes(THEMES[name], expected[name], 1, f"{SLUG}:{name}")
    assert states == expected
    record = rows[-1].gaps["rotation"]
    assert record["weights"] == {"city": 60.0, "beach": 40.0}
    assert record["after"] == {n: {"credit": s.credit, "round": s.round, "used": s.used} for n, s in states.items()}
    assert record["before"] != record["after"]


def test_the_rotation_table_in_the_metadata(tmp_path, db_url):
    planner = Planner(tmp_path, db_url)
    planner.plan()
    meta = metadata(planner.plan())
    table = {r.data["pillar"]: dict(r.data) for r in meta["rotation"].records}
    states = planner.stored_states()
    picked = Counter(name for name, _ in reference(2)[2:])
    for name in WEIGHTS:
        assert table[name] == {"pillar": name, "weight": float(WEIGHTS[name]), "picked": picked[name],
                               "credit": states[name].credit, "round": states[name].round,
                               "themes_used": f"{len(states[name].used)}/{len(THEMES[name])}"}
    assert meta["prompts"] == 2


def test_themes_from_the_guidelines_when_none_are_listed(tmp_path, db_url):
    pillars = [{"name": "city", "weight": 60, "priority": 1,
                "guidelines": "Rooftops at dusk, tram rides; old bookshops."},
               {"name": "beach", "weight": 40, "priority": 2, "guidelines": "Surf mornings. Sunset swims."}]
    planner = Planner(tmp_path, db_url, themes=None, pillars=pillars)
    for _ in range(5):
        planner.plan()
    derived = {"city": ["rooftops at dusk", "tram rides", "old bookshops"], "beach": ["surf mornings", "sunset swims"]}
    picks = planner.picks()
    assert picks == reference(5, derived)
    for name, listed in derived.items():
        assert_cycles([theme for pillar, theme in picks if pillar == name], listed)


def test_edited_themes_take_effect_at_the_next_plan(tmp_path, db_url):
    planner = Planner(tmp_path, db_url)
    planner.plan()
    planner.plan()
    city_used = planner.stored_states()["city"].used
    assert len(city_used) == 2  # two of four city themes had their turn this round
    removed, kept = city_used[0], city_used[1]
    edited = [t for t in THEMES["city"] if t != removed] + ["harbour at dusk"]
    planner.configure(themes={**THEMES, "city": edited})
    for _ in range(3):
        planner.plan()
    picks = planner.picks()
    after = [theme for pillar, theme in picks[4:] if pillar == "city"]
    assert removed not in after and "harbour at dusk" in after
    # The round that was under way finishes with the untaken and the new themes, so the kept
    # theme that was used comes back only in the next round, after all the others.
    rest_of_round = after[:len(edited) - 1]
    assert sorted([kept] + rest_of_round) == sorted(edited)
    assert removed not in planner.stored_states()["city"].used

    # A pillar's themes dropped from persona.yaml: the guideline phrase takes over.
    planner.configure(themes={"beach": THEMES["beach"]})
    planner.plan()
    planner.plan()
    assert {theme for pillar, theme in planner.picks()[10:] if pillar == "city"} == {"city days"}


def test_a_pillar_with_only_a_target_gets_its_turn(tmp_path, db_url):
    """A target_posts_per_week overrides the weight in the gap analysis, and so in the rotation:
    1 of 3 posts a week is the weight 33.3 beside 60 and 40 (a quarter of the picks)."""
    pillars = [{"name": "city", "weight": 60, "priority": 1, "guidelines": "City days."},
               {"name": "beach", "weight": 40, "priority": 2, "guidelines": "Beach days."},
               {"name": "studio", "weight": 0, "priority": 3, "guidelines": "Studio portraits.",
                "target_posts_per_week": 1}]
    planner = Planner(tmp_path, db_url, themes=None, pillars=pillars)
    for _ in range(4):
        planner.plan()
    pillars_picked = [name for name, _ in planner.picks()]
    assert_follows_weights(pillars_picked, {"city": 60, "beach": 40, "studio": 100 / 3})
    assert Counter(pillars_picked)["studio"] == 2


def test_gemini_is_asked_for_the_rotation_themes(tmp_path, db_url, fake, waits):
    planner = Planner(tmp_path, db_url)
    gemini = GeminiClient(api_key=fake.api_key, base_url=fake.url, max_retries=0)
    planner.plan(gemini)
    # A model that labels its ideas its own way: the stored theme is still the rotation's.
    fake.reply_prompts(lambda items: [{**item, "theme": f"my idea {i}"} for i, item in enumerate(items)])
    planner.plan(gemini)
    # A model that swaps a pillar's items: each prompt still lands on the slot of the theme it echoes.
    fake.reply_prompts(lambda items: list(reversed(items)))
    planner.plan(gemini)

    picks = planner.picks()
    assert picks == reference(3)
    requests = fake.content_requests()
    assert [(p, t) for r in requests for p, t in zip(r.slots(), r.slot_themes())] == picks
    instruction = requests[0].texts()[0]
    assert f'1. "{picks[0][0]}", theme "{picks[0][1]}"' in instruction
    assert "must be about" in instruction
    rows = planner.prompts()
    assert all(r.source == "gemini:gemini-2.5-flash" for r in rows)
    assert all(r.theme in r.prompt for r in rows)  # the fake writes the asked-for theme into its prompt


def test_a_failed_plan_does_not_move_the_rotation(tmp_path, db_url, fake, waits):
    planner = Planner(tmp_path, db_url)
    planner.plan()
    states = planner.stored_states()
    fake.fail(400, "API key not valid.")
    result = planner.plan(GeminiClient(api_key=fake.api_key, base_url=fake.url, max_retries=0),
                          raise_on_error=False)
    assert not result.success
    assert planner.stored_states() == states
    with session_scope(planner.url) as session:
        assert session.scalar(select(func.count()).select_from(models.ContentPrompt)) == 2
    planner.plan()
    assert planner.picks() == reference(2)  # the failed plan's picks were not lost
