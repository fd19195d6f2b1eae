"""run_steps.ranked_signature: the rankings refresh refits only the steps whose inputs changed

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""
from alembic import op
import sqlalchemy as sa


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL on every existing step: the first refresh after the upgrade fits each step once.
    with op.batch_alter_table('run_steps') as batch:
        batch.add_column(sa.Column('ranked_signature', sa.String(length=40), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('run_steps') as batch:
        batch.drop_column('ranked_signature')
