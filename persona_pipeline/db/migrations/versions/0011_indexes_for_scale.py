"""indexes for a studio with years of history: the calendar's month of posts, open runs

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""
from alembic import op
import sqlalchemy as sa

TO_REVIEW = "status IN ('awaiting_approval', 'failed')"
TO_PUBLISH = "status IN ('scheduled', 'publishing')"


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The calendar reads one month of posts by publication time or slot (bench/scale.py: without
    # these, every post the studio ever made is read); the review queue reads the open runs.
    op.create_index(op.f('ix_posts_scheduled_at'), 'posts', ['scheduled_at'], unique=False)
    op.create_index(op.f('ix_posts_published_at'), 'posts', ['published_at'], unique=False)
    op.create_index(op.f('ix_generation_runs_status'), 'generation_runs', ['status'], unique=False)
    # The posts to review, a few among years of published ones (at 50,000 posts the planner read them all).
    op.create_index('ix_posts_to_review', 'posts', ['scheduled_at'], unique=False,
                    sqlite_where=sa.text(TO_REVIEW), postgresql_where=sa.text(TO_REVIEW))
    op.create_index('ix_posts_to_publish', 'posts', ['scheduled_at'], unique=False,
                    sqlite_where=sa.text(TO_PUBLISH), postgresql_where=sa.text(TO_PUBLISH))


def downgrade() -> None:
    op.drop_index('ix_posts_to_publish', table_name='posts')
    op.drop_index('ix_posts_to_review', table_name='posts')
    op.drop_index(op.f('ix_generation_runs_status'), table_name='generation_runs')
    op.drop_index(op.f('ix_posts_published_at'), table_name='posts')
    op.drop_index(op.f('ix_posts_scheduled_at'), table_name='posts')
