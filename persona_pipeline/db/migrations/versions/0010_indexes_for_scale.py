"""indexes for a studio with years of history: the calendar's month of posts, open runs

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""
from alembic import op


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The calendar reads one month of posts by publication time or slot (bench/scale.py: without
    # these, every post the studio ever made is read); the review queue reads the open runs.
    op.create_index(op.f('ix_posts_scheduled_at'), 'posts', ['scheduled_at'], unique=False)
    op.create_index(op.f('ix_posts_published_at'), 'posts', ['published_at'], unique=False)
    op.create_index(op.f('ix_generation_runs_status'), 'generation_runs', ['status'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_generation_runs_status'), table_name='generation_runs')
    op.drop_index(op.f('ix_posts_published_at'), table_name='posts')
    op.drop_index(op.f('ix_posts_scheduled_at'), table_name='posts')
