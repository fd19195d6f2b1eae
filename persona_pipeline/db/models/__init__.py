"""SQLAlchemy 2 models of the application database (one schema for SQLite and PostgreSQL).

Files live under PERSONA_HOME; rows point at them by path + sha256. Every human (or auto-review)
decision is a `ReviewEvent` row, the one table the review sensor will read.

The tables live in one module per area; every model is importable from here
(`from persona_pipeline.db.models import Post`), and importing this package registers every table
on `Base.metadata`, which Alembic's env.py compares the migrations with.
"""

from persona_pipeline.db.models.base import NAMING, Base, UTCDateTime, utcnow
from persona_pipeline.db.models.personas import (
    ContentPillar,
    Dataset,
    LoraEvaluation,
    LoraModel,
    Persona,
    PersonaLora,
    PhotoCaption,
    SourcePhoto,
)
from persona_pipeline.db.models.generation import (
    Candidate,
    ContentPrompt,
    GenerationJob,
    GenerationRun,
    PairOffer,
    ReviewEvent,
    RunStep,
    Vote,
)
from persona_pipeline.db.models.library import Cluster, LibraryItem, PillarGapReport, TopicRotation
from persona_pipeline.db.models.posts import LIVE_SLOT, Post, PostAttempt, PostItem
from persona_pipeline.db.models.alerts import Alert
from persona_pipeline.db.models.insights import AccountInsight, InsightPoll, PostInsight
from persona_pipeline.db.models.dataset import DatasetCandidate

__all__ = [
    "NAMING", "Base", "UTCDateTime", "utcnow",
    "ContentPillar", "Dataset", "LoraEvaluation", "LoraModel", "Persona", "PersonaLora", "PhotoCaption", "SourcePhoto",
    "Candidate", "ContentPrompt", "GenerationJob", "GenerationRun", "PairOffer", "ReviewEvent", "RunStep", "Vote",
    "Cluster", "LibraryItem", "PillarGapReport", "TopicRotation",
    "LIVE_SLOT", "Post", "PostAttempt", "PostItem",
    "Alert",
    "AccountInsight", "InsightPoll", "PostInsight",
    "DatasetCandidate",
]
