"""candidates.video_path / video_sha256: a video step's clip, beside its first frame

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""
from alembic import op
import sqlalchemy as sa


revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('candidates', schema=None) as batch_op:
        batch_op.add_column(sa.Column('video_path', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('video_sha256', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('candidates', schema=None) as batch_op:
        batch_op.drop_column('video_sha256')
        batch_op.drop_column('video_path')
